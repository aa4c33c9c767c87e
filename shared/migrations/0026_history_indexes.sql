-- Issue 15: the operator's reads stay on indexes as the history grows (tests/test_query_plans.py).
-- `failures` lists parked mails: a few rows among every mail ever sent.
CREATE INDEX emails_parked_idx ON emails (id) WHERE status = 'parked';
-- `show`: an invoice's lines, and an order's payments (by the invoice they name, or by the
-- order's ref while applied to none).
CREATE INDEX invoice_items_invoice_idx ON invoice_items (invoice_id, id);
CREATE INDEX payments_requested_invoice_idx ON payments (requested_invoice_id);
CREATE INDEX payments_unapplied_ref_idx ON payments (order_ref) WHERE invoice_id IS NULL;
