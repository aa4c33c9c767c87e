-- Issue 12's Keep and issue 13's console: the indexes on orders that do not pay for their writes.
--
-- Every index on orders gets an entry when placement inserts an order, and again when the
-- fraud service sets its screening (`screening` is indexed, so that UPDATE is never HOT: the
-- new row version is entered in every index whose predicate holds), and again on each status
-- change. By migration 0035 orders had 17 indexes (520e86b: 8); placement + fraud did about
-- a quarter more buffer accesses per order (bench/README.md). Each index dropped here is one
-- a kept index serves as well, for every query that read it (README, "The console at a
-- million orders"; tests/test_query_plans.py, tests/test_fraud_indexes.py):
--
-- - orders_status_id_idx (status, id): orders_status_created_idx (status, created_at, id)
--   holds the same status ranges (the dashboard's capped counts read it alone; `ordermill
--   orders --status` and the re-screen selection read a status's rows on it).
-- - orders_screening_id_idx (screening, id): orders_screening_created_idx (screening,
--   created_at, id), in the list's order (the dashboard's flagged orders, oldest first).
-- - orders_review_idx (id) WHERE Pending, screened; orders_pending_idx (needs_review DESC, id)
--   WHERE Pending; orders_needs_review_idx (id) WHERE needs_review: Pending orders are the
--   Pending range of orders_status_created_idx, in placed order; the review queue, `ordermill
--   pending`, the exporter's and the alerts' waiting orders read that range (the newest
--   orders: a few heap pages) and check the screening on the row.
-- - orders_client_ended_idx (client_id, id) WHERE Fraud or Cancelled: the fraud facts count a
--   client's earlier Fraud and Cancelled orders on orders_client_idx (client_id, created_at),
--   which holds every order of the client (a handful) and is read for the other counts too.
-- - services_product_order_idx (product_id, order_id): the console list's orders side probes
--   services_product_created_idx (product_id, created_at, order_id) instead, with the order's
--   placed time (a service is written with its order, in one statement: migration 0033).
--
-- `screening` stays indexed (orders_screening_created_idx, orders_flagged_created_idx,
-- orders_queued_idx): a HOT screening update needs no index on orders to name it, and the
-- console's screening filters and the fraud sweeper's stuck orders would then read every
-- order of a range. Measured without them (fillfactor 90): 63 % of the screening updates
-- were HOT, about 10 fewer buffer accesses per order, within the bench's run-to-run noise.
--
-- Locks: DROP INDEX takes an ACCESS EXCLUSIVE lock on its table (orders, services) until this
-- migration commits: reads wait too, but only for the drops themselves (milliseconds; no
-- build, no scan). To keep them shorter on a busy database, drop the indexes beforehand
-- outside a transaction, one at a time:
--   DROP INDEX CONCURRENTLY IF EXISTS orders_status_id_idx;   -- and so on for each below
-- then `ordermill migrate` finds them gone (IF EXISTS).
DROP INDEX IF EXISTS orders_status_id_idx;
DROP INDEX IF EXISTS orders_screening_id_idx;
DROP INDEX IF EXISTS orders_review_idx;
DROP INDEX IF EXISTS orders_pending_idx;
DROP INDEX IF EXISTS orders_needs_review_idx;
DROP INDEX IF EXISTS orders_client_ended_idx;
DROP INDEX IF EXISTS services_product_order_idx;
