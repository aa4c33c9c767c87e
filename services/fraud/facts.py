"""Read what a fraud provider looks at: with the order locked (in the handler's transaction) or
not (before it, for a remote provider)."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import asyncpg

from services.fraud.providers.base import CartLine, OrderFacts
from shared import db

# One round trip: the order (locked), its client, the counts the rules use, and the cart.
# Amounts travel as text so they stay Decimal.
#
# The client's counts come from one pass over its orders (orders_client_idx), not one scan
# each: the five counts cost one index scan and the client's rows, where five subqueries cost
# five scans, and the earlier-orders one was planned as a bitmap AND with the primary key's
# whole range below the order (about 18 buffer accesses an order in the bench's burst). A
# client with many orders is read once as before (the Active count always read them all).
# The cart and the domain names are read from the order's items once. The order's storefront
# may use its client when it created it (clients.storefront, never unlinked) or an operator
# linked it: the link table is read only in the second case.
_SELECT_FACTS = """
SELECT o.*, c.email, c.first_name, c.last_name, c.company, c.country,
  c.address1, c.address2, c.city, c.state, c.postcode, c.phone,
  k.earlier, k.earlier_fraud, k.earlier_cancelled, k.from_client, k.active_orders,
  items.cart, items.domain_names,
  (SELECT max(id) FROM fraud_rule_sets) AS rule_set_id,
  (SELECT value FROM catalog_meta WHERE key = 'default_currency') AS default_currency,
  (SELECT count(*) FROM orders x WHERE x.ip_address = o.ip_address
     AND x.created_at > o.created_at - $2::interval AND x.id <= o.id) AS from_ip,
  c.storefront = o.storefront OR EXISTS (SELECT 1 FROM client_storefronts l
     WHERE l.storefront = o.storefront AND l.client_id = o.client_id) AS own_client
FROM orders o JOIN clients c ON c.id = o.client_id
CROSS JOIN LATERAL (
  SELECT
    count(*) FILTER (WHERE x.id < o.id AND (x.status = 'Active' OR (x.status = 'Pending'
      AND x.screening IN ('passed', 'skipped') AND EXISTS (SELECT 1 FROM invoices i
        WHERE i.order_id = x.id AND i.status = 'Paid' AND i.total > 0)))) AS earlier,
    count(*) FILTER (WHERE x.id < o.id AND x.status = 'Fraud') AS earlier_fraud,
    count(*) FILTER (WHERE x.id < o.id AND x.status = 'Cancelled') AS earlier_cancelled,
    count(*) FILTER (WHERE x.created_at > o.created_at - $2::interval AND x.id <= o.id)
      AS from_client,
    count(*) FILTER (WHERE x.status = 'Active') AS active_orders
  FROM orders x WHERE x.client_id = o.client_id
) k
CROSS JOIN LATERAL (
  SELECT coalesce(json_agg(json_build_array(kind, name, amount) ORDER BY kind DESC, id), '[]')
      AS cart,
    coalesce(array_agg(DISTINCT domain) FILTER (WHERE domain IS NOT NULL), '{}')
      AS domain_names
  FROM (SELECT 'product' AS kind, s.id, p.slug AS name, s.amount::text AS amount, s.domain
          FROM services s JOIN products p ON p.id = s.product_id WHERE s.order_id = o.id
        UNION ALL
        SELECT 'domain', d.id, d.domain, d.amount::text, d.domain
          FROM domains d WHERE d.order_id = o.id
       ) item
) items
"""
_FACTS = _SELECT_FACTS + "WHERE o.id = $1"
_LOCK_WITH_FACTS = _FACTS + " FOR NO KEY UPDATE OF o"
# A batch's orders, locked in the order of their ids (as any two batches lock them). The ids
# go through `db.planned_once`: with `ANY($1::bigint[])` every execution was planned anew
# (0.6 ms of the 0.8 a batch of two cost the backend, on 50,000 orders).
_LOCK_MANY_WITH_FACTS = (_SELECT_FACTS + "WHERE o.id = ANY(" + db.planned_once("$1", "bigint[]")
                         + ") ORDER BY o.id FOR NO KEY UPDATE OF o")


async def lock_with_facts(
    conn: asyncpg.Connection, order_id: int, velocity_window: timedelta
) -> tuple[asyncpg.Record, OrderFacts] | None:
    return _facts(await conn.fetchrow(_LOCK_WITH_FACTS, order_id, velocity_window))


async def lock_many_with_facts(
    conn: asyncpg.Connection, order_ids: list[int], velocity_window: timedelta
) -> dict[int, tuple[asyncpg.Record, OrderFacts]]:
    """`lock_with_facts` for several orders in one statement, by order id (a missing order is
    missing)."""
    found = {}
    for row in await conn.fetch(_LOCK_MANY_WITH_FACTS, order_ids, velocity_window):
        found[row["id"]] = _facts(row)
    return found


async def read_facts(
    conn: asyncpg.Connection | asyncpg.Pool, order_id: int, velocity_window: timedelta
) -> tuple[asyncpg.Record, OrderFacts] | None:
    return _facts(await conn.fetchrow(_FACTS, order_id, velocity_window))


# The orders of the client and of the IP in each window a rule counts in (minutes), by the
# orders_client_idx and orders_ip_idx indexes.
_VELOCITY = """
SELECT w.minutes,
  (SELECT count(*) FROM orders x WHERE x.client_id = o.client_id
     AND x.created_at > o.created_at - make_interval(mins => w.minutes) AND x.id <= o.id)
     AS per_client,
  (SELECT count(*) FROM orders x WHERE x.ip_address = o.ip_address
     AND x.created_at > o.created_at - make_interval(mins => w.minutes) AND x.id <= o.id)
     AS per_ip
FROM orders o, unnest($2::int[]) AS w(minutes) WHERE o.id = $1
"""


async def velocity(conn: asyncpg.Connection | asyncpg.Pool, order_id: int,
                   windows: list[int]) -> tuple[dict[int, int], dict[int, int]]:
    """Orders per client and per IP in each window, this one included."""
    if not windows:
        return {}, {}
    rows = await conn.fetch(_VELOCITY, order_id, windows)
    return ({r["minutes"]: r["per_client"] for r in rows},
            {r["minutes"]: r["per_ip"] for r in rows})


def _facts(row: asyncpg.Record | None) -> tuple[asyncpg.Record, OrderFacts] | None:
    if row is None:
        return None
    facts = OrderFacts(
        order_id=row["id"], order_number=row["order_number"], order_ref=row["order_ref"],
        client_id=row["client_id"], email=row["email"], first_name=row["first_name"],
        last_name=row["last_name"], company=row["company"], country=row["country"],
        ip_address=str(row["ip_address"]) if row["ip_address"] else None,
        total=row["total"], currency=row["currency"], payment_method=row["payment_method"],
        cart=tuple(CartLine(kind, name, Decimal(amount)) for kind, name, amount in row["cart"]),
        client_is_new=row["earlier"] == 0,
        orders_from_ip=row["from_ip"] if row["ip_address"] else 0,
        orders_from_client=row["from_client"],
        earlier_fraud_orders=row["earlier_fraud"], default_currency=row["default_currency"],
        earlier_cancelled_orders=row["earlier_cancelled"],
        domains=tuple(sorted(row["domain_names"])),
        placed_at=row["created_at"], address1=row["address1"], address2=row["address2"],
        city=row["city"], state=row["state"], postcode=row["postcode"], phone=row["phone"],
    )
    return row, facts
