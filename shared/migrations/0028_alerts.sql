-- Staff alerts (services/alerts/, README "Staff alerts"): the rule sets loaded with
-- `ordermill notify load` (the latest is in force), one alert per (rule, cause) so that a
-- redelivered event or a second sweep never alerts twice, and the Slack messages on the
-- leased queue (shared/leased_queue.py). Email alerts go through `emails`, webhook alerts
-- through `webhook_deliveries`.

CREATE TABLE alert_rule_sets (
    id         bigserial PRIMARY KEY,
    source     text NOT NULL,                  -- the file's name
    rules      jsonb NOT NULL,
    channels   jsonb NOT NULL,                 -- a Slack channel's URL only as scheme://host/
    -- The Slack URLs by channel name, sealed (`fernet:` with WEBHOOK_SECRET_KEY, or `plain:`):
    -- read only by the sender, never shown.
    secrets    jsonb NOT NULL DEFAULT '{}',
    loaded_by  text NOT NULL,
    loaded_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE alerts (
    id           bigserial PRIMARY KEY,
    rule_set_id  bigint NOT NULL REFERENCES alert_rule_sets (id),
    rule         text NOT NULL,                -- the rule's name
    trigger      text NOT NULL CHECK (trigger IN ('new_order', 'fraud', 'screening_error',
        'setup_parked', 'payment_unapplied', 'dead_letter', 'review_waiting')),
    cause        text NOT NULL,                -- what it is about: an order, an event, a queue
    order_id     bigint,                       -- no foreign key: an alert outlives nothing
    title        text NOT NULL,
    facts        jsonb NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (rule, cause)
);
CREATE INDEX alerts_created_idx ON alerts (created_at);

CREATE TABLE alert_deliveries (
    id              bigserial PRIMARY KEY,
    alert_id        bigint NOT NULL REFERENCES alerts (id) ON DELETE CASCADE,
    channel         text NOT NULL,             -- the channel's name in the rule set
    body            text NOT NULL,             -- the exact JSON every attempt sends
    status          text NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'sending', 'delivered', 'parked')),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    lease_until     timestamptz,
    leased_by       text,
    last_error      text,
    status_code     integer,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    delivered_at    timestamptz,
    UNIQUE (alert_id, channel)
);
CREATE INDEX alert_deliveries_due_idx ON alert_deliveries (next_attempt_at)
    WHERE status IN ('pending', 'sending');
CREATE INDEX alert_deliveries_parked_idx ON alert_deliveries (id) WHERE status = 'parked';

-- What a sweep watches between passes: a dead-letter queue's episode (empty -> some dead
-- letters is a new episode, one alert; it ends when the queue is empty again).
CREATE TABLE alert_watches (
    name        text PRIMARY KEY,
    active      boolean NOT NULL DEFAULT false,
    episode     integer NOT NULL DEFAULT 0,
    depth       bigint NOT NULL DEFAULT 0,
    -- Since when the queue has read empty in an episode (NULL: not empty at the last read).
    empty_since timestamptz,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE FUNCTION alert_deliveries_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('ordermill_alerts', '');
    RETURN NULL;
END $$;

CREATE TRIGGER alert_deliveries_notify AFTER INSERT ON alert_deliveries
    FOR EACH STATEMENT EXECUTE FUNCTION alert_deliveries_notify();
