-- Outbound webhooks (services/webhooks/, docs/contract.md section 10): endpoints that
-- integrators subscribe to event types, one delivery per (event, endpoint) on the leased
-- queue (shared/leased_queue.py), and a log row per attempt.

CREATE TABLE webhook_endpoints (
    id            bigserial PRIMARY KEY,
    url           text NOT NULL,
    events        text[] NOT NULL,              -- routing keys, or '*' for every event type
    -- Signing secrets (whsec_...), sealed: `fernet:<token>` with WEBHOOK_SECRET_KEY, or
    -- `plain:<secret>` without one. The previous secret is signed with too until it expires.
    secret        text NOT NULL,
    previous_secret text,
    previous_secret_until timestamptz,
    status        text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'failing', 'disabled')),
    status_reason text,
    description   text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE webhook_deliveries (
    id              bigserial PRIMARY KEY,
    endpoint_id     bigint NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    -- The Standard Webhooks `webhook-id`: derived from the event and the endpoint, so a
    -- redelivered event writes no second delivery, and the same for every attempt.
    webhook_id      text NOT NULL UNIQUE,
    event_type      text NOT NULL,
    event_id        text NOT NULL,
    body            text NOT NULL,              -- the exact bytes every attempt sends
    status          text NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'sending', 'delivered', 'parked', 'cancelled')),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    lease_until     timestamptz,
    leased_by       text,
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    delivered_at    timestamptz
);
CREATE INDEX webhook_deliveries_due_idx ON webhook_deliveries (next_attempt_at)
    WHERE status IN ('pending', 'sending');
CREATE INDEX webhook_deliveries_endpoint_idx ON webhook_deliveries (endpoint_id, id);
-- What is not delivered yet, by state (the metrics' gauge, `ordermill webhooks list`).
CREATE INDEX webhook_deliveries_open_idx ON webhook_deliveries (status)
    WHERE status IN ('pending', 'sending', 'parked');

CREATE TABLE webhook_attempts (
    id           bigserial PRIMARY KEY,
    delivery_id  bigint NOT NULL REFERENCES webhook_deliveries (id) ON DELETE CASCADE,
    attempt      integer NOT NULL,
    outcome      text NOT NULL CHECK (outcome IN ('delivered', 'failed', 'gone', 'refused')),
    status_code  integer,
    duration_ms  integer NOT NULL,
    response     text,                          -- the answer's first bytes, as received
    error        text,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_attempts_delivery_idx ON webhook_attempts (delivery_id, id);

CREATE FUNCTION webhook_deliveries_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('ordermill_webhooks', '');
    RETURN NULL;
END $$;

CREATE TRIGGER webhook_deliveries_notify AFTER INSERT OR UPDATE OF next_attempt_at
    ON webhook_deliveries FOR EACH STATEMENT EXECUTE FUNCTION webhook_deliveries_notify();
