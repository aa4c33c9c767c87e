-- Payments: recorded once per gateway transaction; never dropped (unapplied ones are kept
-- with their reason, matched later when they can be, and shown to operators).

ALTER TABLE invoices ADD COLUMN amount_paid numeric(12, 2) NOT NULL DEFAULT 0;

CREATE TABLE payments (
    id                   bigserial PRIMARY KEY,
    gateway              text,
    transaction_id       text,
    amount               numeric(12, 2),
    raw_amount           text NOT NULL,           -- as received, when it could not be read
    currency             text,
    requested_invoice_id bigint,                  -- as the message named them
    order_ref            text,
    invoice_id           bigint REFERENCES invoices (id),  -- the invoice it was applied to
    publisher            text,                    -- the broker-validated user_id
    status               text NOT NULL CHECK (status IN ('applied', 'unapplied')),
    reason               text,                    -- why it is unapplied
    credit               numeric(12, 2) NOT NULL DEFAULT 0,  -- the part that became client credit
    message_id           text NOT NULL,
    received_at          timestamptz NOT NULL DEFAULT now(),
    applied_at           timestamptz
);
CREATE UNIQUE INDEX payments_transaction_key ON payments (gateway, transaction_id)
    WHERE gateway IS NOT NULL AND transaction_id IS NOT NULL;
CREATE INDEX payments_invoice_idx ON payments (invoice_id);
CREATE INDEX payments_waiting_idx ON payments (order_ref, requested_invoice_id)
    WHERE status = 'unapplied';

CREATE TABLE client_credit (
    id         bigserial PRIMARY KEY,
    client_id  bigint NOT NULL REFERENCES clients (id),
    amount     numeric(12, 2) NOT NULL,
    currency   text NOT NULL,
    payment_id bigint REFERENCES payments (id),
    reason     text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
