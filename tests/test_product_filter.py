"""The console list's product filter on a skewed history (issue 13's review): a product
launched lately — thousands of recent orders and a few old ones — filtered over all time and
with the other filters. Its count is right (exact up to the cap, "1,000+" only when more truly
match; it was "0+"), its pages are the plain query's, and each way order_list reads it (the
orders side, the product side, both sides' keys intersected) reads through indexes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import pytest
from test_query_plans import Explaining, scans

from conftest import order_body, seeded_database
from console import order_list
from console.order_list import OrderFilters
from services.placement.worker import worker as placement_worker
from shared import db
from shared.runtime.testing import InMemoryFlow

ORDERS = 36_000
LAUNCHED = 22_000  # orders after this one have the launched product: 14,000 of them

SEED = [
    "INSERT INTO products (slug, name, type, module, auto_setup) VALUES"
    " ('common', 'Common', 'hosting', 'autorelease', 'never'),"
    " ('other', 'Other', 'hosting', 'autorelease', 'never'),"
    " ('launch', 'Launch', 'hosting', 'autorelease', 'never') ON CONFLICT (slug) DO NOTHING",
    "INSERT INTO clients (email, storefront, country)"
    " SELECT 'c' || g || '@seed.example', '', 'GB' FROM generate_series(1, 20000) g",
    # One order every 2.4 hours over ten years, oldest first; 1 in 97 Fraud, 1 in 13 Cancelled.
    "INSERT INTO orders (order_ref, order_number, client_id, status, screening, currency,"
    " send_confirmation, generate_invoice, total, storefront, created_at)"
    " SELECT 'seed-' || g, 1000000000 + g, (SELECT min(id) FROM clients) + g % 20000,"
    "  CASE WHEN g % 97 = 0 THEN 'Fraud' WHEN g % 13 = 0 THEN 'Cancelled' ELSE 'Active' END,"
    "  CASE WHEN g % 97 = 0 THEN 'failed' ELSE 'passed' END, 'USD', true, true, 10, '',"
    "  now() - make_interval(mins => ({orders} - g) * 144) FROM generate_series(1, {orders}) g",
    # A service per order, written with it (same created_at, as placement writes them): the
    # common product on every other order until the launch, then the launched one on every
    # order, and on ten orders years before (a trial).
    "INSERT INTO services (order_id, product_id, billing_cycle, status, amount, created_at)"
    " SELECT o.id, (SELECT id FROM products WHERE slug = CASE"
    "   WHEN o.order_number - 1000000000 > {launched}"
    "     OR o.order_number - 1000000000 BETWEEN 5001 AND 5010 THEN 'launch'"
    "   WHEN o.order_number % 2 = 0 THEN 'common' ELSE 'other' END),"
    "  'monthly', 'Active', 10, o.created_at FROM orders o",
    # As autovacuum leaves a table that has lived: statistics and the visibility map.
    "VACUUM ANALYZE",
]
# The tables this seed fills (the others stay empty here, and are read whole as such).
FILLED = frozenset({"orders", "clients", "services"})


@pytest.fixture(scope="module")
def seeded_url(infra: Any) -> Iterator[str]:
    with seeded_database(infra, SEED, orders=ORDERS, launched=LAUNCHED) as url:
        yield url


@pytest.fixture
async def conn(seeded_url: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(seeded_url)
    await db.init_connection(connection)
    try:
        yield connection
    finally:
        await connection.close()


async def _truth(conn: asyncpg.Connection, f: OrderFilters) -> list[int]:
    """Every matching order's id in the list's order, by the plain query."""
    conds, args = ["o.deleted_at IS NULL"], [f.product]
    if f.status != order_list.ALL:
        args.append(f.status)
        conds.append(f"o.status = ${len(args)}")
    if f.flagged:
        conds.append("o.screening IN ('error', 'failed')")
    if f.since:
        args.append(order_list._day(f.since, "from"))
        conds.append(f"o.created_at >= ${len(args)}")
    return [r["id"] for r in await conn.fetch(
        f"SELECT o.id FROM orders o WHERE {' AND '.join(conds)} AND EXISTS (SELECT 1"
        " FROM services s JOIN products p ON p.id = s.product_id WHERE s.order_id = o.id"
        " AND p.slug = $1) ORDER BY o.created_at, o.id", *args)]


async def _side(conn: asyncpg.Connection, f: OrderFilters) -> str:
    product_id = await conn.fetchval("SELECT id FROM products WHERE slug = $1", f.product)
    since = order_list._day(f.since, "from")
    return await order_list._side(conn, f, order_list._Range(since), product_id)


# Each filter, with the way order_list reads it.
SKEWED = [
    (OrderFilters(status="all", product="launch"), order_list.PRODUCT_SIDE),
    (OrderFilters(status="Active", product="launch"), order_list.PRODUCT_SIDE),
    (OrderFilters(status="Fraud", product="launch"), order_list.ORDERS_SIDE),  # 371 Fraud
    (OrderFilters(status="Cancelled", product="launch"), order_list.BOTH_SIDES),
    (OrderFilters(status="all", flagged="1", product="launch"), order_list.ORDERS_SIDE),
    (OrderFilters(status="Active", product="common"), order_list.PRODUCT_SIDE),
    (OrderFilters(status="Cancelled", product="common", since="2000-01-01"),
     order_list.ORDERS_SIDE),
]


async def test_a_skewed_product_is_counted_and_paged_right(conn: asyncpg.Connection) -> None:
    """Walked from ten years ago, the orders side found no launched order among the first
    2,000 and said "0+"; every count is now the truth (capped at 1,000 only when more match),
    and the pages, forwards and back, are the plain query's."""
    for f, side in SKEWED:
        assert await _side(conn, f) == side, f
        truth = await _truth(conn, f)
        first = await order_list.order_list(conn, f)
        cap = order_list.LIST_COUNT_CAP
        assert first["count"] == (min(len(truth), cap), len(truth) > cap), (f, len(truth))
        assert [o["id"] for o in first["orders"]] == truth[:order_list.PAGE_SIZE], f
    launched = (await _truth(conn, SKEWED[0][0]))
    assert len(launched) == ORDERS - LAUNCHED + 10  # the seed: 14,000 and the trial's ten
    # Every page of a filter with a thousand, forwards; then back from the last.
    f = SKEWED[3][0]  # Cancelled, launched: both sides' keys
    truth = await _truth(conn, f)
    seen, page = [], await order_list.order_list(conn, f, limit=200)
    pages = [page]
    while True:
        seen += [o["id"] for o in page["orders"]]
        if not page["more_after"]:
            break
        page = await order_list.order_list(conn, f, after=page["last_id"], limit=200)
        pages.append(page)
    assert seen == truth and len(pages) > 2
    back = await order_list.order_list(conn, f, before=pages[-1]["first_id"], limit=200)
    assert [o["id"] for o in back["orders"]] == [o["id"] for o in pages[-2]["orders"]]


async def test_each_way_of_reading_a_product_uses_indexes(conn: asyncpg.Connection) -> None:
    """No statement of a product filter reads a growing table whole; the product side walks
    services_product_created_idx (migration 0033) and fetches orders by id."""
    wrong, used, merged = [], set(), 0
    for f, side in SKEWED:
        explaining = Explaining(conn)
        await order_list.order_list(explaining, f)
        for sql, plan in explaining.plans:
            nodes = scans(plan)
            if side == order_list.BOTH_SIDES and "JOIN (SELECT DISTINCT" in sql:
                # Both sides' keys merged, each read on its index alone.
                assert "Merge Join" in _node_types(plan), plan
                assert {(n, i) for n, _, i in nodes} == {
                    ("Index Only Scan", "orders_status_created_idx"),
                    ("Index Only Scan", "services_product_created_idx")}, nodes
                merged += 1
            used |= {index for _, _, index in nodes if index}
            whole = [rel for node, rel, _ in nodes if node == "Seq Scan" and rel in FILLED]
            if whole:
                wrong.append(f"{f}: {' '.join(sql.split())[:200]} reads {whole} whole")
    assert not wrong, "\n".join(wrong)
    # A first page's keys and its count are one merge (up to LIST_COUNT_CAP + 1 keys).
    assert merged == 1
    # The orders side probes services_product_created_idx too (one key: product, placed time,
    # order), no index of its own (migration 0036 dropped services_product_order_idx).
    assert {"services_product_created_idx", "orders_pkey"} <= used, used
    assert "services_product_order_idx" not in used, used


def _node_types(plan: dict[str, Any]) -> list[str]:
    return [plan["Node Type"], *(t for child in plan.get("Plans", []) for t in _node_types(child))]


async def test_placement_writes_a_service_with_its_orders_time(flow: InMemoryFlow) -> None:
    """The product side reads a service's created_at as its order's (migration 0033): both are
    written by placement in one statement."""
    flow.add(placement_worker(flow.settings))
    body = order_body("same-time")
    body["items"].append({"type": "product", "product": "business", "billing_cycle": "monthly",
                          "domain": "second.example"})
    await flow.send("order.place", body)
    await flow.run()
    rows = await flow.pool.fetch(
        "SELECT o.created_at AS placed, s.created_at FROM orders o JOIN services s"
        " ON s.order_id = o.id WHERE o.order_ref = 'same-time'")
    assert len(rows) == 2 and all(r["placed"] == r["created_at"] for r in rows)
