-- Storefronts are separate (design section 8). The storefront is the RabbitMQ user that
-- published the order (the broker-validated user_id); '' is the anonymous storefront (no
-- user_id: one shared storefront, what development with a single user gives).
--
-- order_ref is unique per storefront, not globally: two storefronts may use the same ref, and
-- each gets its own order. Existing orders keep working: each belongs to the user that placed
-- it (placed_by, already the validated user_id) or, without one, to the anonymous storefront.
ALTER TABLE orders ADD COLUMN storefront text;
UPDATE orders SET storefront = coalesce(placed_by, '');
ALTER TABLE orders ALTER COLUMN storefront SET DEFAULT '';
ALTER TABLE orders ALTER COLUMN storefront SET NOT NULL;
ALTER TABLE orders DROP CONSTRAINT orders_order_ref_key;
-- order_ref first: a payment naming only a ref looks it up across storefronts.
ALTER TABLE orders ADD CONSTRAINT orders_ref_storefront_key UNIQUE (order_ref, storefront);

-- Clients belong to the storefront that created them; another storefront reuses a client
-- (by email or by id) only when linked to it (client_storefronts). One client per email per
-- storefront: a storefront naming someone else's customer's email gets a client of its own.
ALTER TABLE clients ADD COLUMN storefront text;
UPDATE clients c SET storefront = coalesce(
    (SELECT o.storefront FROM orders o WHERE o.client_id = c.id ORDER BY o.id LIMIT 1), '');
ALTER TABLE clients ALTER COLUMN storefront SET DEFAULT '';
ALTER TABLE clients ALTER COLUMN storefront SET NOT NULL;
DROP INDEX clients_email_key;
CREATE UNIQUE INDEX clients_storefront_email_key ON clients (storefront, lower(email));
CREATE INDEX clients_email_idx ON clients (lower(email));

-- Which storefronts may use a client: its creator, and any an operator linked it to.
CREATE TABLE client_storefronts (
    storefront text NOT NULL,
    client_id  bigint NOT NULL REFERENCES clients (id),
    linked_by  text,                     -- the operator who linked it; NULL: the creator
    linked_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (storefront, client_id)
);
CREATE INDEX client_storefronts_client_idx ON client_storefronts (client_id);
-- Existing clients: linked to their creator and to every storefront that ordered for them,
-- so each storefront's existing customers stay its own.
INSERT INTO client_storefronts (storefront, client_id)
    SELECT storefront, id FROM clients
    UNION
    SELECT storefront, client_id FROM orders
ON CONFLICT DO NOTHING;

-- EPP transfer codes at rest: a stored code is now tagged with how it is kept, 'fernet:'
-- (encrypted with EPP_CODE_KEY) or 'plain:' (no key set: kept only until used). Existing
-- codes are plain; they are read as before and blanked once their transfer went through.
UPDATE domains SET epp_code = 'plain:' || epp_code WHERE epp_code IS NOT NULL;
