-- Issue 15: the operator's reads stay on indexes as the history grows (tests/test_query_plans.py).
-- `failures` lists parked mails: a few rows among every mail ever sent.
CREATE INDEX emails_parked_idx ON emails (id) WHERE status = 'parked';
-- `show`'s invoice lines and an order's payments (by the invoice they name, or by the order's
-- ref while applied to none) are read through 0019's indexes, which the console needed first.
