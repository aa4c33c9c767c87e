-- Who may publish what (shared/parties.py).
--
-- Events carry the service that wrote them: with a RabbitMQ user per service, a relay
-- publishes only its own services' events (its user may send no others). Rows written
-- before this migration have none and are published by any relay.
ALTER TABLE outbox ADD COLUMN source text;

-- A payment from a user that is not a gateway is kept (never dropped) but never applied,
-- and must not take the (gateway, transaction id) of the real payment that may follow it.
ALTER TABLE payments ADD COLUMN trusted boolean NOT NULL DEFAULT true;
DROP INDEX payments_transaction_key;
CREATE UNIQUE INDEX payments_transaction_key ON payments (gateway, transaction_id)
    WHERE gateway IS NOT NULL AND transaction_id IS NOT NULL AND trusted;
