-- The demo application's own table: invoices of an ERP.
-- (The outbox table comes from `hookmesh outbox init --notify`.)
CREATE TABLE IF NOT EXISTS invoices (
    id         text PRIMARY KEY,
    customer   text        NOT NULL,
    total      numeric     NOT NULL,
    currency   text        NOT NULL DEFAULT 'EUR',
    status     text        NOT NULL DEFAULT 'open',
    updated_at timestamptz NOT NULL DEFAULT now()
);
