//! return-credit-note: asks the ERP for a credit note for each approved CRM
//! return (`crm.return.*.return.approved`).
//!
//! The return's order must already be linked to an ERP sales order (by
//! order-sync). Until it is, the event fails `transient`, so a retry after
//! order-sync has run succeeds.

use hookmesh_guest::serde_json::json;
use hookmesh_guest::{
    Event, Guest, HandlerError, emit_json, export, log_info, mapping, payload_json, require_str,
    transient,
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

        let data = &payload["data"];
        emit_json(
            "erp.credit_note.requested",
            return_id,
            &json!({
                "erp_order_id": erp_order_id,
                "crm_order_id": order_id,
                "return_id": return_id,
                "amount": data["amount"],
                "reason": data["reason"],
            }),
        );
        log_info(&format!(
            "return {return_id}: credit note requested for ERP sales order {erp_order_id}"
        ));
        Ok(())
    }
}

export!(ReturnCreditNote);
