-- Issue 13's review, the console's list filtered on a product whose orders are all recent (a
-- product launched last month, filtered over ten years): the list walked every older order
-- probing each for the product (seconds at 1M) and counted "0+". A product's services in the
-- list's order let the list walk the product's own orders instead (console/order_list.py
-- chooses the side): a service's created_at is its order's, both written by placement in one
-- statement (services/placement/handlers.py _STORE_ORDER; DEFAULT now(), the transaction's
-- time), which tests/test_product_filter.py asserts.
--
-- Locks: a plain CREATE INDEX (in the migration's transaction) takes a SHARE lock on services
-- until this migration commits: reads go on, placements wait. About 2 s at a million services
-- on 2 cores (bench/console_pages.py's database). To keep placements going on a big table,
-- build it beforehand outside a transaction with the same definition:
--   CREATE INDEX CONCURRENTLY IF NOT EXISTS services_product_created_idx
--       ON services (product_id, created_at, order_id);
-- then `ordermill migrate` skips it (IF NOT EXISTS). Check first that none was left INVALID by
-- a failed concurrent build (psql \d services); drop such an index and build it again.
CREATE INDEX IF NOT EXISTS services_product_created_idx
    ON services (product_id, created_at, order_id);

-- 0017's services_product_order_idx (product_id, order_id) stays: the list's orders side
-- probes it, one order at a time.
