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
