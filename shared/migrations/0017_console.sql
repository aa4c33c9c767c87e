-- The operator console (issue 13): operator accounts, sign-in attempts, operator notes, and
-- the indexes its pages read by (every list is a keyset page on an index, never a scan).

CREATE TABLE operators (
    id                  bigserial PRIMARY KEY,
    name                text NOT NULL CHECK (name ~ '^[A-Za-z0-9_.@-]{1,100}$'),
    role                text NOT NULL CHECK (role IN ('reviewer', 'viewer')),
    password_hash       text NOT NULL,            -- argon2id, never the password
    created_at          timestamptz NOT NULL DEFAULT now(),
    password_changed_at timestamptz NOT NULL DEFAULT now(),  -- sessions from before end
    disabled            boolean NOT NULL DEFAULT false
);
CREATE UNIQUE INDEX operators_name_key ON operators (lower(name));

-- Failed sign-ins, per account name (as typed, lower-cased, whether or not it exists) and
-- per address: CONSOLE_SIGNIN_MAX_FAILURES in the window and further attempts are refused.
CREATE TABLE sign_in_failures (
    id      bigserial PRIMARY KEY,
    name    text NOT NULL,
    address text NOT NULL,
    at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX sign_in_failures_name_idx ON sign_in_failures (name, at);
CREATE INDEX sign_in_failures_address_idx ON sign_in_failures (address, at);

-- Operator notes on an order: written by the review service (action `note`), as history is.
CREATE TABLE order_notes (
    id         bigserial PRIMARY KEY,
    order_id   bigint NOT NULL REFERENCES orders (id),
    operator   text NOT NULL,
    note       text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX order_notes_order_idx ON order_notes (order_id, id);

-- The console's lists, oldest first by id (keyset pages): per status, and the review queue
-- (Pending, screening finished); flagged (screening error) apart.
CREATE INDEX orders_status_id_idx ON orders (status, id) WHERE deleted_at IS NULL;
CREATE INDEX orders_review_idx ON orders (id)
    WHERE status = 'Pending' AND deleted_at IS NULL AND screening <> 'queued';
CREATE INDEX orders_screening_id_idx ON orders (screening, id) WHERE deleted_at IS NULL;
CREATE INDEX orders_created_id_idx ON orders (created_at, id) WHERE deleted_at IS NULL;
-- Search by domain, and the product filter.
CREATE INDEX services_domain_idx ON services (lower(domain));
CREATE INDEX domains_domain_idx ON domains (lower(domain));
CREATE INDEX services_product_order_idx ON services (product_id, order_id);
-- The dashboard's parked setups.
CREATE INDEX jobs_parked_idx ON jobs (id) WHERE status = 'parked';
