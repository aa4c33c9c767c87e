-- Provisioning: setup, termination and registration jobs (design rules 4, 5, 9).

ALTER TABLE products ADD COLUMN plan text;            -- the package name on the server
ALTER TABLE services ADD COLUMN server_id bigint REFERENCES servers (id);
ALTER TABLE services ADD COLUMN username text;        -- deterministic, saved before the first call
ALTER TABLE services ADD COLUMN live boolean NOT NULL DEFAULT false;  -- an account exists on a server
ALTER TABLE services ADD COLUMN terminated_at timestamptz;
ALTER TABLE domains ADD COLUMN registered_at timestamptz;

CREATE TABLE jobs (
    id              bigserial PRIMARY KEY,
    order_id        bigint NOT NULL REFERENCES orders (id),
    service_id      bigint REFERENCES services (id),
    domain_id       bigint REFERENCES domains (id),
    kind            text NOT NULL CHECK (kind IN ('create', 'terminate', 'register', 'transfer')),
    status          text NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'running', 'done', 'parked', 'cancelled')),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    lease_until     timestamptz,
    leased_by       text,
    last_error      text,
    detail          jsonb NOT NULL DEFAULT '{}',
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CHECK ((service_id IS NULL) <> (domain_id IS NULL))
);
-- At most one open job of a kind per item: reconcile can run any number of times.
CREATE UNIQUE INDEX jobs_open_key ON jobs (coalesce(service_id, -domain_id), kind)
    WHERE status IN ('pending', 'running', 'parked');
CREATE INDEX jobs_due_idx ON jobs (next_attempt_at) WHERE status IN ('pending', 'running');
CREATE INDEX jobs_order_idx ON jobs (order_id);

CREATE FUNCTION jobs_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('ordermill_jobs', '');
    RETURN NULL;
END $$;

CREATE TRIGGER jobs_notify AFTER INSERT OR UPDATE OF next_attempt_at ON jobs
    FOR EACH STATEMENT EXECUTE FUNCTION jobs_notify();
