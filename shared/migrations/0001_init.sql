-- Ordermill: the spine's schema. Money is numeric(12,2); times are timestamptz (UTC).

CREATE TABLE catalog_meta (
    key   text PRIMARY KEY,
    value text NOT NULL
);

CREATE TABLE servers (
    id           bigserial PRIMARY KEY,
    name         text NOT NULL UNIQUE,
    module       text NOT NULL,
    hostname     text,
    username     text,
    -- Name of the environment variable holding the API token: secrets never live here.
    token_env    text,
    max_accounts integer,
    active       boolean NOT NULL DEFAULT true
);

CREATE TABLE products (
    id         bigserial PRIMARY KEY,
    slug       text NOT NULL UNIQUE,
    name       text NOT NULL,
    type       text NOT NULL CHECK (type IN ('hosting', 'other')),
    module     text NOT NULL DEFAULT 'autorelease',
    server_id  bigint REFERENCES servers (id),
    auto_setup text NOT NULL CHECK (auto_setup IN ('on_order', 'on_payment', 'on_accept', 'never')),
    require_domain boolean NOT NULL DEFAULT false
);

CREATE TABLE product_prices (
    product_id    bigint NOT NULL REFERENCES products (id) ON DELETE CASCADE,
    currency      text NOT NULL,
    billing_cycle text NOT NULL CHECK (billing_cycle IN
        ('monthly', 'quarterly', 'semiannually', 'annually', 'biennially', 'triennially', 'onetime')),
    price         numeric(12, 2) NOT NULL CHECK (price >= 0),
    setup_fee     numeric(12, 2) NOT NULL DEFAULT 0 CHECK (setup_fee >= 0),
    PRIMARY KEY (product_id, currency, billing_cycle)
);

CREATE TABLE tlds (
    tld           text PRIMARY KEY,              -- without the leading dot: 'com', 'co.uk'
    registrar     text NOT NULL DEFAULT 'manual',
    auto_register boolean NOT NULL DEFAULT false
);

CREATE TABLE tld_prices (
    tld            text NOT NULL REFERENCES tlds (tld) ON DELETE CASCADE,
    currency       text NOT NULL,
    register_price numeric(12, 2) NOT NULL CHECK (register_price >= 0),
    transfer_price numeric(12, 2) NOT NULL CHECK (transfer_price >= 0),
    renew_price    numeric(12, 2) NOT NULL CHECK (renew_price >= 0),
    PRIMARY KEY (tld, currency)
);

CREATE TABLE promotions (
    code       text PRIMARY KEY,
    kind       text NOT NULL CHECK (kind IN ('percent', 'fixed')),
    value      numeric(12, 2) NOT NULL CHECK (value >= 0),
    products   text[] NOT NULL DEFAULT '{}',     -- product slugs; empty means every product
    expires_at timestamptz,
    max_uses   integer,
    uses       integer NOT NULL DEFAULT 0
);

CREATE TABLE clients (
    id         bigserial PRIMARY KEY,
    email      text NOT NULL,
    first_name text NOT NULL DEFAULT '',
    last_name  text NOT NULL DEFAULT '',
    company    text,
    country    text,
    credit     numeric(12, 2) NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX clients_email_key ON clients (lower(email));

CREATE TABLE orders (
    id                bigserial PRIMARY KEY,
    order_ref         text NOT NULL UNIQUE,
    order_number      bigint NOT NULL UNIQUE,
    client_id         bigint NOT NULL REFERENCES clients (id),
    client_named_by_id boolean NOT NULL DEFAULT false,
    status            text NOT NULL DEFAULT 'Pending'
        CHECK (status IN ('Pending', 'Active', 'Cancelled', 'Fraud')),
    screening         text NOT NULL DEFAULT 'queued'
        CHECK (screening IN ('queued', 'passed', 'failed', 'skipped', 'error')),
    screening_override boolean NOT NULL DEFAULT false,
    screening_redrives integer NOT NULL DEFAULT 0,
    screening_driven_at timestamptz NOT NULL DEFAULT now(),
    currency          text NOT NULL,
    payment_method    text,
    promo_code        text REFERENCES promotions (code),
    ip_address        inet,
    send_confirmation boolean NOT NULL,
    generate_invoice  boolean NOT NULL,
    total             numeric(12, 2) NOT NULL,
    accept_options    jsonb,
    placed_by         text,                     -- the broker-validated user_id, when there was one
    placed_message_id text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    deleted_at        timestamptz
);
CREATE INDEX orders_status_idx ON orders (status, created_at) WHERE deleted_at IS NULL;
CREATE INDEX orders_queued_idx ON orders (screening_driven_at) WHERE screening = 'queued';
CREATE INDEX orders_ip_idx ON orders (ip_address, created_at);
CREATE INDEX orders_client_idx ON orders (client_id, created_at);

CREATE TABLE services (
    id            bigserial PRIMARY KEY,
    order_id      bigint NOT NULL REFERENCES orders (id),
    product_id    bigint NOT NULL REFERENCES products (id),
    billing_cycle text NOT NULL,
    domain        text,
    status        text NOT NULL DEFAULT 'Pending'
        CHECK (status IN ('Pending', 'Active', 'Suspended', 'Terminated', 'Cancelled', 'Fraud')),
    amount        numeric(12, 2) NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX services_order_idx ON services (order_id);

CREATE TABLE domains (
    id         bigserial PRIMARY KEY,
    order_id   bigint NOT NULL REFERENCES orders (id),
    domain     text NOT NULL,
    tld        text NOT NULL REFERENCES tlds (tld),
    action     text NOT NULL CHECK (action IN ('register', 'transfer')),
    years      integer NOT NULL CHECK (years BETWEEN 1 AND 10),
    epp_code   text,                            -- a secret: never logged, never shown
    status     text NOT NULL DEFAULT 'Pending'
        CHECK (status IN ('Pending', 'Pending Registration', 'Pending Transfer', 'Active',
                          'Cancelled', 'Fraud')),
    amount     numeric(12, 2) NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX domains_order_idx ON domains (order_id);

CREATE TABLE invoices (
    id         bigserial PRIMARY KEY,
    order_id   bigint NOT NULL UNIQUE REFERENCES orders (id),
    client_id  bigint NOT NULL REFERENCES clients (id),
    status     text NOT NULL CHECK (status IN ('Unpaid', 'Paid', 'Cancelled')),
    currency   text NOT NULL,
    subtotal   numeric(12, 2) NOT NULL,
    discount   numeric(12, 2) NOT NULL DEFAULT 0,
    total      numeric(12, 2) NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    paid_at    timestamptz
);

CREATE TABLE invoice_items (
    id          bigserial PRIMARY KEY,
    invoice_id  bigint NOT NULL REFERENCES invoices (id),
    kind        text NOT NULL CHECK (kind IN ('service', 'setup', 'domain', 'promotion')),
    service_id  bigint REFERENCES services (id),
    domain_id   bigint REFERENCES domains (id),
    description text NOT NULL,
    amount      numeric(12, 2) NOT NULL
);

CREATE TABLE fraud_checks (
    id         bigserial PRIMARY KEY,
    order_id   bigint NOT NULL REFERENCES orders (id),
    provider   text NOT NULL,
    result     text NOT NULL CHECK (result IN ('passed', 'failed', 'skipped', 'error')),
    score      numeric(5, 2),
    threshold  numeric(5, 2) NOT NULL,
    reasons    jsonb NOT NULL DEFAULT '[]',
    raw        jsonb,
    error      text,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX fraud_checks_order_idx ON fraud_checks (order_id, id);

CREATE TABLE order_history (
    id          bigserial PRIMARY KEY,
    order_id    bigint NOT NULL REFERENCES orders (id),
    at          timestamptz NOT NULL DEFAULT now(),
    actor       text NOT NULL,
    action      text NOT NULL,
    from_status text,
    to_status   text,
    detail      jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX order_history_order_idx ON order_history (order_id, id);

-- Idempotent consumers: one row per (consumer, message) handled, written with its effects.
CREATE TABLE inbox (
    consumer     text NOT NULL,
    message_id   text NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, message_id)
);

-- Transactional outbox: events written with the change that causes them.
CREATE TABLE outbox (
    id             bigserial PRIMARY KEY,
    message_id     uuid NOT NULL UNIQUE,
    routing_key    text NOT NULL,
    body           jsonb NOT NULL,
    correlation_id text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    published_at   timestamptz,
    unroutable     boolean NOT NULL DEFAULT false
);
CREATE INDEX outbox_unpublished_idx ON outbox (id) WHERE published_at IS NULL;

CREATE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('ordermill_outbox', '');
    RETURN NULL;
END $$;

CREATE TRIGGER outbox_notify AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify();
