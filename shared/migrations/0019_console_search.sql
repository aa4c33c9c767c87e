-- The console's client search (Add New Order: a prefix of an email, a name, a full name or a
-- company, case-insensitive) and its list of unapplied payments, each on an index: with
-- 300,000 clients and a million payments neither may scan (bench/console.py).
CREATE INDEX clients_email_prefix_idx ON clients (lower(email) text_pattern_ops);
CREATE INDEX clients_first_prefix_idx ON clients (lower(first_name) text_pattern_ops);
CREATE INDEX clients_last_prefix_idx ON clients (lower(last_name) text_pattern_ops);
CREATE INDEX clients_full_prefix_idx
    ON clients (lower(first_name || ' ' || last_name) text_pattern_ops);
CREATE INDEX clients_company_prefix_idx ON clients (lower(company) text_pattern_ops)
    WHERE company IS NOT NULL;
CREATE INDEX payments_unapplied_idx ON payments (id) WHERE status = 'unapplied';
-- An order's page (the console's and `ordermill show`): its invoice lines, and its payments
-- found three ways (applied to its invoice, waiting for its ref, naming its invoice), each by
-- an index instead of a scan of every line and every payment.
CREATE INDEX invoice_items_invoice_idx ON invoice_items (invoice_id, id);
CREATE INDEX payments_requested_invoice_idx ON payments (requested_invoice_id);
CREATE INDEX payments_ref_unapplied_idx ON payments (order_ref) WHERE invoice_id IS NULL;
