//! return-credit-note: asks the ERP for a credit note for each approved CRM
//! return (`crm.return.*.return.approved`).
//!
//! The return's order must already be linked to an ERP sales order (by
//! order-sync). Until it is, the event fails `transient`, so a retry after
//! order-sync has run succeeds. Then it sends
//! `POST {erp_url}/credit-notes` with the ERP sales order id, links the
//! return to the credit note the ERP answers (`crm-return` ↔
//! `erp-credit-note` in `hook_mappings`) and emits
//! `erp.credit_note.created`. The ERP's answer is classified like
//! order-sync's; the host's `Idempotency-Key` makes a second run of the
//! event get the ERP's first answer back.

use hookmesh_guest::serde_json::json;
use hookmesh_guest::{
    Event, Guest, HandlerError, emit_json, export, http, log_info, mapping, payload_json,
    permanent, require_config, require_str, transient,
};

struct ReturnCreditNote;

impl Guest for ReturnCreditNote {
    fn handle(event: Event) -> Result<(), HandlerError> {
        let payload = payload_json(&event)?;
        let return_id = event.entity_id.as_str();
        let order_id = require_str(&payload, "/data/order_id")?;

        let Some(erp_order_id) = mapping::lookup("crm", &order_id, "erp")? else {
            return Err(transient(format!(
                "order {order_id} not synced to the ERP yet"
            )));
        };

        let erp_url = require_config("erp_url")?;
        let erp_url = erp_url.trim_end_matches('/');
        let data = &payload["data"];
        let answer = http::post_json(
            &format!("{erp_url}/credit-notes"),
            &json!({
                "sales_order_id": erp_order_id,
                "crm_order_id": order_id,
                "return_id": return_id,
                "amount": data["amount"],
                "reason": data["reason"],
            }),
        )?;
        let answer = http::classify(answer)?;
        let credit_note_id = require_str(&answer.json()?, "/id")
            .map_err(|_| permanent(format!("the ERP's answer has no id: {}", answer.text())))?;
        mapping::link("crm-return", return_id, "erp-credit-note", &credit_note_id)?;

        emit_json(
            "erp.credit_note.created",
            return_id,
            &json!({
                "erp_credit_note_id": credit_note_id,
                "erp_order_id": erp_order_id,
                "crm_order_id": order_id,
                "return_id": return_id,
                "amount": data["amount"],
                "reason": data["reason"],
            }),
        )?;
        log_info(&format!(
            "return {return_id}: ERP credit note {credit_note_id} for sales order {erp_order_id}"
        ));
        Ok(())
    }
}

export!(ReturnCreditNote);
