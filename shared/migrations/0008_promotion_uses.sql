-- A promotion's uses are its orders, counted, not a counter every order updates: the counter's
-- row lock, held until each placement committed, made every order with a popular code wait for
-- the one before it. Only a promotion with max_uses still serializes its orders (placement
-- locks it and counts), and the count is an index scan over at most max_uses orders.
-- promotions.uses stays for now, unused: placement workers of the previous release, still
-- running while a deploy migrates, update it. A later release drops it.
CREATE INDEX orders_promo_code ON orders (promo_code) WHERE promo_code IS NOT NULL;
