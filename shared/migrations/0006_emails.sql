-- Emails: a row per email (its dedupe key), sent at least once and, in normal operation,
-- exactly once; a deterministic Message-ID lets mail clients drop a rare duplicate.
CREATE TABLE emails (
    id              bigserial PRIMARY KEY,
    dedupe_key      text NOT NULL UNIQUE,
    template        text NOT NULL,
    recipient       text NOT NULL,
    order_id        bigint REFERENCES orders (id),
    message_id      text NOT NULL,
    status          text NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'sending', 'sent', 'parked')),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    lease_until     timestamptz,
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    sent_at         timestamptz
);
CREATE INDEX emails_due_idx ON emails (next_attempt_at) WHERE status IN ('pending', 'sending');

CREATE FUNCTION emails_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('ordermill_emails', '');
    RETURN NULL;
END $$;

CREATE TRIGGER emails_notify AFTER INSERT ON emails
    FOR EACH STATEMENT EXECUTE FUNCTION emails_notify();
