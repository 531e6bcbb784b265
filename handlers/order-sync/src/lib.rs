//! order-sync: keeps an ERP sales order in step with each CRM order.
//!
//! For every `crm.order.>` event it validates the order, ignores it when a
//! newer version is already stored, sends it to the ERP —
//! `POST {erp_url}/sales-orders` with `crm_order_id`, `customer_id`,
//! `payment_terms`, `total`, `currency` and `version`, which creates the
//! sales order or updates it — links the CRM order id to the id the ERP
//! answers (`{"id": "SO-…"}`, create-only, in `hook_mappings`), stores the
//! order under `order/<order id>` with the revision it read, and emits
//! `erp.sales_order.upserted` about the ERP id.
//!
//! The ERP's answer decides the outcome (`http::classify`): 5xx, 408, 429
//! and timeouts retry (after the ERP's `Retry-After` when it sends one),
//! other 4xx are dead letters at once with the ERP's status and message.
//!
//! Safe to run twice for one event: the host sends the same
//! `Idempotency-Key` on every run of the event, so the ERP answers a
//! repeat with its first answer; the same version goes through again, the
//! link is a no-op, the write replaces the revision just read, and the
//! host deduplicates the re-emit.

use hookmesh_guest::serde_json::{self, Value, json};
use hookmesh_guest::{
    Event, Guest, HandlerError, emit_json, export, http, log_info, log_warn, mapping, needs_human,
    payload_json, permanent, require_config, require_str, state, str_at,
};
use serde::{Deserialize, Serialize};

/// What is kept per order in the handler's state.
#[derive(Serialize, Deserialize)]
struct StoredOrder {
    version: u64,
    customer_id: String,
    total: String,
    currency: Option<String>,
    erp_id: String,
}

struct OrderSync;

impl Guest for OrderSync {
    fn handle(event: Event) -> Result<(), HandlerError> {
        let payload = payload_json(&event)?;
        let order_id = event.entity_id.as_str();

        let customer_id = require_str(&payload, "/data/customer/id")?;
        let total = require_str(&payload, "/data/total")?;
        let Some(payment_terms) = str_at(&payload, "/data/customer/payment_terms") else {
            return Err(needs_human(format!(
                "customer {customer_id} has no payment terms"
            )));
        };
        let currency = str_at(&payload, "/data/currency");
        let version = version(&event, &payload)?;

        let key = format!("order/{order_id}");
        let stored = state::get(&key)?;
        if let Some(entry) = &stored {
            match serde_json::from_slice::<StoredOrder>(&entry.value) {
                Ok(prev) if prev.version > version => {
                    log_info(&format!(
                        "stale event: version {version} < stored {}, ignored",
                        prev.version
                    ));
                    return Ok(());
                }
                Ok(_) => {}
                // Our own key, so replacing it is the repair.
                Err(err) => log_warn(&format!("{key} holds no valid order ({err}); replacing it")),
            }
        }

        let erp_url = require_config("erp_url")?;
        let erp_url = erp_url.trim_end_matches('/');
        let answer = http::post_json(
            &format!("{erp_url}/sales-orders"),
            &json!({
                "crm_order_id": order_id,
                "customer_id": customer_id,
                "payment_terms": payment_terms,
                "total": total,
                "currency": currency,
                "version": version,
            }),
        )?;
        let answer = http::classify(answer)?;
        let erp_id = require_str(&answer.json()?, "/id")
            .map_err(|_| permanent(format!("the ERP's answer has no id: {}", answer.text())))?;
        // Create-only: the ERP answering another id for this order is a
        // conflict a person must look at (permanent).
        mapping::link("crm", order_id, "erp", &erp_id)?;

        let record = StoredOrder {
            version,
            customer_id,
            total,
            currency,
            erp_id,
        };
        let value = serde_json::to_vec(&record).expect("a StoredOrder always serialises");
        // `stale-revision` (someone wrote since we read) → transient
        // "concurrent update"; the retry reads again.
        state::put(&key, &value, stored.map(|entry| entry.revision))?;

        emit_json(
            "erp.sales_order.upserted",
            &record.erp_id,
            &json!({
                "erp_order_id": record.erp_id,
                "crm_order_id": order_id,
                "version": record.version,
                "customer_id": record.customer_id,
                "payment_terms": payment_terms,
                "total": record.total,
                "currency": record.currency,
                "correlation_id": event.correlation_id,
            }),
        )?;
        log_info(&format!(
            "order {order_id} version {version} synced to ERP sales order {}",
            record.erp_id
        ));
        Ok(())
    }
}

/// The order's version: the event's entity version when it is a number, else
/// the payload's `data.version`.
fn version(event: &Event, payload: &Value) -> Result<u64, HandlerError> {
    if let Some(v) = event
        .entity_version
        .as_deref()
        .and_then(|v| v.trim().parse::<u64>().ok())
    {
        return Ok(v);
    }
    let from_payload = match payload.pointer("/data/version") {
        Some(Value::Number(n)) => n.as_u64(),
        Some(Value::String(s)) => s.trim().parse().ok(),
        _ => None,
    };
    from_payload.ok_or_else(|| {
        permanent("missing data.version (and the event's entity version is not a number)")
    })
}

export!(OrderSync);
