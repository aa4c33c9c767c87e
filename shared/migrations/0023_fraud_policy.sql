-- Issue 16, the fraud policy: a review band, operator rules, every screening kept.

-- `review`: scored in the review band (FRAUD_REVIEW_THRESHOLD), sent to review by an operator
-- rule, or by the provider (FraudLabs Pro's REVIEW). The order stays Pending; like `error`, it
-- is not cleared (nothing is set up automatically) until an operator accepts it.
ALTER TABLE orders DROP CONSTRAINT orders_screening_check;
ALTER TABLE orders ADD CONSTRAINT orders_screening_check
    CHECK (screening IN ('queued', 'passed', 'failed', 'skipped', 'error', 'review'));
ALTER TABLE fraud_checks DROP CONSTRAINT fraud_checks_result_check;
ALTER TABLE fraud_checks ADD CONSTRAINT fraud_checks_result_check
    CHECK (result IN ('passed', 'failed', 'skipped', 'error', 'review'));

-- Needs review, as a column every reader (CLI, console) can filter and sort on: a Pending
-- order whose screening is `review` that no operator has decided yet. Generated, so an accept
-- (Active), a deny or an override clears it wherever it happens.
ALTER TABLE orders ADD COLUMN needs_review boolean GENERATED ALWAYS AS (
    status = 'Pending' AND screening = 'review' AND NOT screening_override
    AND deleted_at IS NULL) STORED;
CREATE INDEX orders_needs_review_idx ON orders (id) WHERE needs_review;
-- The pending list, those needing review first: read in its own order, a small partial index
-- whatever the size of the table.
CREATE INDEX orders_pending_idx ON orders (needs_review DESC, id)
    WHERE status = 'Pending' AND deleted_at IS NULL;

-- Operator rules (`ordermill fraud rules load FILE`): each load is a new set, the latest in
-- force; the sets are kept so a screening names the set it ran under.
CREATE TABLE fraud_rule_sets (
    id        bigserial PRIMARY KEY,
    source    text NOT NULL,            -- the file's name, as given
    rules     jsonb NOT NULL,           -- the rules, validated and normalised
    loaded_by text NOT NULL,
    loaded_at timestamptz NOT NULL DEFAULT now()
);

-- Every screening is a fraud_checks row (re-screens add rows; the latest is the order's):
-- with the operator rules that matched (by name), the rule set, the review band and why the
-- order was sent to review.
ALTER TABLE fraud_checks
    ADD COLUMN rule_set_id bigint REFERENCES fraud_rule_sets (id),
    ADD COLUMN rule_matches jsonb NOT NULL DEFAULT '[]',
    ADD COLUMN review_threshold numeric(5, 2),
    ADD COLUMN review_reasons jsonb NOT NULL DEFAULT '[]',
    ADD COLUMN rescreen boolean NOT NULL DEFAULT false;

-- The rules' facts at a million orders: a client's earlier Fraud or Cancelled orders by index
-- (orders_client_idx holds every order of a client; this one only the ended ones).
CREATE INDEX orders_client_ended_idx ON orders (client_id, id) WHERE status IN ('Fraud', 'Cancelled');
