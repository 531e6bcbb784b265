-- A later change of the same invoice. The UPDATE locks the invoice's row
-- until COMMIT, so a concurrent change of this invoice waits: its events
-- commit in the order of their ids, which is the order the relay keeps.
--   psql "$ERP_DATABASE_URL" -v invoice=INV-1001 -f examples/outbox/pay-invoice.sql
BEGIN;

UPDATE invoices SET status = 'paid', updated_at = now() WHERE id = :'invoice';

INSERT INTO outbox_events (aggregate_type, aggregate_id, event_type, payload_json, idempotency_key)
SELECT 'invoice', id, 'invoice.paid',
       jsonb_build_object('id', id, 'status', status, 'paid_at', updated_at),
       -- The application's own message id: writing this event twice stores it once.
       'erp:invoice.paid:' || id
FROM invoices WHERE id = :'invoice';

COMMIT;
