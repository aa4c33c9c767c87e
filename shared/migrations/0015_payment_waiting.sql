-- What an unapplied payment waits for, as a column (shared/states.py WaitingFor), no longer
-- read from its reason's text: 'order' (its order or invoice is not there yet: applied when
-- it arrives), 'review' (its order was Cancelled or Fraud: applied if an operator sets the
-- order back to Pending), NULL (nothing that comes by itself: a person must look). Set by
-- provisioning where it decides the reason (services/provisioning/payments.py).
ALTER TABLE payments ADD COLUMN waiting_for text
    CHECK (waiting_for IN ('order', 'review')),
    ADD CONSTRAINT payments_waiting_unapplied CHECK (waiting_for IS NULL OR status = 'unapplied');

-- Existing rows, from the reason patterns the code matched until now. A payment from a
-- publisher that is not a gateway (not trusted) waits for nothing.
UPDATE payments SET waiting_for = 'order'
    WHERE status = 'unapplied' AND trusted
    AND (reason LIKE 'order not placed yet%' OR reason LIKE 'unknown invoice%');
UPDATE payments SET waiting_for = 'review'
    WHERE status = 'unapplied' AND trusted
    AND (reason LIKE 'order % is Cancelled' OR reason LIKE 'order % is Fraud'
         OR reason LIKE 'invoice % is Cancelled');

-- The payments waiting for an order, found by its ref or its invoice (one index each: the
-- lookup is `order_ref = ... OR requested_invoice_id = ...`). Small: only waiting rows.
CREATE INDEX payments_waiting_ref_idx ON payments (order_ref)
    WHERE waiting_for IS NOT NULL;
CREATE INDEX payments_waiting_invoice_idx ON payments (requested_invoice_id)
    WHERE waiting_for IS NOT NULL;
