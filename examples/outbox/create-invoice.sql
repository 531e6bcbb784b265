-- An application writing an invoice and announcing it: the business row and
-- its outbox row in one transaction, so both are there or neither is.
--   psql "$ERP_DATABASE_URL" -v invoice=INV-1001 -f examples/outbox/create-invoice.sql
BEGIN;

INSERT INTO invoices (id, customer, total)
VALUES (:'invoice', 'CUST-42', 129.90);

INSERT INTO outbox_events (aggregate_type, aggregate_id, event_type, payload_json, correlation_id)
SELECT 'invoice', id, 'invoice.created',
       jsonb_build_object('id', id, 'customer', customer, 'total', total, 'currency', currency),
       gen_random_uuid()::text
FROM invoices WHERE id = :'invoice';

COMMIT;
