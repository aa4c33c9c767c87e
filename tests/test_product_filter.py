"""The console list's product filter on a skewed history (issue 13's review): a product
launched lately — thousands of recent orders and a few old ones — filtered over all time and
with the other filters. Its count is right (exact up to the cap, "1,000+" only when more truly
match; it was "0+"), its pages are the plain query's, and each way order_list reads it (the
orders side, the product side, both sides' keys intersected) reads through indexes."""

from __future__ import annotations

import asyncio
import html
import json
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing
from typing import Any

import asyncpg
import httpx
import pytest
from test_console import PASSWORD, csrf_of, password_hash
from test_query_plans import Analyzing, Explaining, orders_read, scans

from conftest import _test_settings, order_body, seeded_database
from console import order_list
from console.accounts import Role
from console.app import close_state, create_app, open_state
from console.exact_counts import AT_ONCE
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


async def _side(conn: asyncpg.Connection, f: OrderFilters) -> order_list._Plan:
    product_id = await conn.fetchval("SELECT id FROM products WHERE slug = $1", f.product)
    since = order_list._day(f.since, "from")
    return await order_list._side(conn, f, order_list._Range(since), product_id)


# Each filter, with the way order_list reads it: the side its pages walk, and its count
# (both sides' keys merged, or the page's side walked with a probe per row).
SKEWED = [
    (OrderFilters(status="all", product="launch"), order_list.PRODUCT_SIDE, order_list.WALK),
    (OrderFilters(status="Active", product="launch"), order_list.PRODUCT_SIDE, order_list.WALK),
    # 371 Fraud orders: the small side, walked whole.
    (OrderFilters(status="Fraud", product="launch"), order_list.ORDERS_SIDE, order_list.WALK),
    (OrderFilters(status="Cancelled", product="launch"), order_list.BOTH_SIDES,
     order_list.MERGE),
    (OrderFilters(status="all", flagged="1", product="launch"), order_list.ORDERS_SIDE,
     order_list.WALK),
    (OrderFilters(status="Active", product="common"), order_list.PRODUCT_SIDE, order_list.MERGE),
    (OrderFilters(status="Cancelled", product="common", since="2000-01-01"),
     order_list.ORDERS_SIDE, order_list.MERGE),
]


async def test_a_skewed_product_is_counted_and_paged_right(conn: asyncpg.Connection) -> None:
    """Walked from ten years ago, the orders side found no launched order among the first
    2,000 and said "0+"; every count is now the truth (capped at 1,000 only when more match:
    here no count runs out of its budget), and the pages, forwards and back, are the plain
    query's."""
    for f, side, count in SKEWED:
        plan = await _side(conn, f)
        assert (plan.side, plan.count) == (side, count), f
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


async def _keys(conn: asyncpg.Connection, sql: str, *args: Any) -> list[int]:
    return [r[0] for r in await conn.fetch(sql, *args)]


async def test_a_count_that_runs_out_of_its_budget_says_how_many_at_least(
    conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A count reads at most a budget of rows: a merged count COUNT_KEYS keys of each side, a
    walked one COUNT_WALK rows of its side. When the budget runs out before the range ends,
    the count says "N+", N the matches among what it read (never fewer than the first page
    shows), and never more than truly match."""
    monkeypatch.setattr(order_list, "COUNT_KEYS", 1_500)
    # Cancelled with the common product: 838 match among 2,770 Cancelled orders (merged).
    f = SKEWED[6][0]
    plan = await _side(conn, f)
    assert plan.count == order_list.MERGE and plan.start is not None
    truth = await _truth(conn, f)
    cancelled = await _keys(conn, "SELECT id FROM orders WHERE status = 'Cancelled' AND"
                            " (created_at, id) >= ($1, $2) ORDER BY created_at, id LIMIT 1500",
                            *plan.start)
    common = await _keys(conn, "SELECT s.order_id FROM services s JOIN products p ON"
                         " p.id = s.product_id WHERE p.slug = 'common' AND (s.created_at,"
                         " s.order_id) >= ($1, $2) ORDER BY s.created_at, s.order_id LIMIT 1500",
                         *plan.start)
    expected = len(set(cancelled) & set(common))
    assert 0 < expected < len(truth) == 838
    first = await order_list.order_list(conn, f)
    assert first["count"] == (expected, True)
    assert [o["id"] for o in first["orders"]] == truth[:order_list.PAGE_SIZE]  # pages: whole
    # Both sides' keys (Cancelled, launched): a first page's ids come with its count's merge,
    # unless the budget ran out before a page of them; the page is the truth either way.
    f = SKEWED[3][0]
    truth = await _truth(conn, f)
    for budget in (1_500, 30):
        monkeypatch.setattr(order_list, "COUNT_KEYS", budget)
        first = await order_list.order_list(conn, f)
        assert [o["id"] for o in first["orders"]] == truth[:order_list.PAGE_SIZE], budget
        assert first["count"][1] and order_list.PAGE_SIZE <= first["count"][0] < len(truth)
    # Walked: Active with the launched product, each of its first COUNT_WALK services' orders
    # probed (the orders side's pilot, from ten years ago, found none), once the merge of both
    # sides' last keys found too few (a budget of 30 keys here: it finds 1,001 otherwise).
    monkeypatch.setattr(order_list, "TAIL_KEYS", 30)
    monkeypatch.setattr(order_list, "COUNT_WALK", 250)
    f = SKEWED[1][0]
    assert (await _side(conn, f)).count == order_list.WALK
    truth = await _truth(conn, f)
    launched = await _keys(conn, "SELECT s.order_id FROM services s JOIN products p ON"
                           " p.id = s.product_id WHERE p.slug = 'launch'"
                           " ORDER BY s.created_at, s.order_id LIMIT 250")
    expected = len(set(launched) & set(truth))
    assert order_list.PAGE_SIZE < expected < 250  # some of them are not Active
    assert (await order_list.order_list(conn, f))["count"] == (expected, True)
    # A budget smaller than the first page's matches: the count is at least the page.
    monkeypatch.setattr(order_list, "COUNT_WALK", 40)
    first = await order_list.order_list(conn, f)
    assert len(first["orders"]) == order_list.PAGE_SIZE and first["more_after"]
    assert first["count"] == (order_list.PAGE_SIZE, True)


async def test_each_way_of_reading_a_product_uses_indexes(conn: asyncpg.Connection) -> None:
    """No statement of a product filter reads a growing table whole; the product side walks
    services_product_created_idx (migration 0033) and fetches orders by id; a merge of both
    sides' keys (a page's, a count's) reads each on its index alone."""
    wrong, used, merges = [], set(), set()
    for f, side, count in SKEWED:
        explaining = Explaining(conn)
        first = await order_list.order_list(explaining, f)
        if side == order_list.BOTH_SIDES:  # a later page: its ids merged (a first page's:
            await order_list.order_list(explaining, f, after=first["last_id"])  # the count's)
        for sql, plan in explaining.plans:
            nodes = scans(plan)
            if " JOIN (SELECT DISTINCT s.created_at" in sql or " JOIN (SELECT s.created_at" in sql:
                # Both sides' keys merged, each read on its index alone.
                assert "Merge Join" in _node_types(plan), plan
                assert {n for n, _, _ in nodes} == {"Index Only Scan"}, nodes
                assert {i for _, _, i in nodes} >= {"services_product_created_idx"}, nodes
                merges.add(("count" if sql.startswith("SELECT count") else "page", side, count))
            used |= {index for _, _, index in nodes if index}
            whole = [rel for node, rel, _ in nodes if node == "Seq Scan" and rel in FILLED]
            if whole:
                wrong.append(f"{f}: {' '.join(sql.split())[:200]} reads {whole} whole")
    assert not wrong, "\n".join(wrong)
    # A later page of both sides' keys, and each count that merges (a first page's ids are its
    # count's full merge).
    assert merges == {("page", order_list.BOTH_SIDES, order_list.MERGE),
                      ("count", order_list.BOTH_SIDES, order_list.MERGE),
                      ("count", order_list.PRODUCT_SIDE, order_list.MERGE),
                      ("count", order_list.ORDERS_SIDE, order_list.MERGE),
                      # A walked count's first try: both sides' last keys, backwards.
                      ("count", order_list.PRODUCT_SIDE, order_list.WALK)}, merges
    # The orders side probes services_product_created_idx too (one key: product, placed time,
    # order), no index of its own (migration 0036 dropped services_product_order_idx).
    assert {"services_product_created_idx", "orders_pkey"} <= used, used
    assert "services_product_order_idx" not in used, used


class Buffers(Explaining):
    """Runs each statement under EXPLAIN (ANALYZE, BUFFERS) first: the buffers it touched
    (shared hits and reads), which a busy machine does not change."""

    async def _plan(self, sql: str, args: tuple[Any, ...]) -> None:
        raw = await self.conn.fetchval("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + sql, *args)
        plan = (json.loads(raw) if isinstance(raw, str) else raw)[0]["Plan"]
        self.plans.append((sql, plan))

    def touched(self) -> list[tuple[int, str]]:
        return [(plan.get("Shared Hit Blocks", 0) + plan.get("Shared Read Blocks", 0),
                 " ".join(sql.split())[:160]) for sql, plan in self.plans]


# A request may touch: the sizes and the pilots (2 x PILOT probes, 3-4 buffers each), its page
# (51 rows and their clients, items and checks: here about 7 buffers a row), and its count.
PILOTS = 2 * order_list.PILOT * 4
PAGE = 51 * 8
COUNTED = 600  # a count: a few hundred index pages at most


async def test_the_costliest_filters_touch_a_bounded_number_of_buffers(
    conn: asyncpg.Connection,
) -> None:
    """Issue 13: a first visit whose pages are not in shared buffers pays for each page it
    touches. A common product with a rare status was counted by probing each order of the
    status (four buffers each) until 1,001 matched, or the range ended: Cancelled with the
    common product here, 838 of 2,770, was about 10,000 buffers (at 1M, Fraud and business
    since 2021: 15,900). Counted by merging both sides' keys, read on their indexes alone, it
    is a few hundred; and "Fraud and flagged" reads its keys and their status on the flagged
    orders' index (migration 0040), where it fetched each Fraud order from the heap."""
    for f in (SKEWED[6][0], OrderFilters(status="Cancelled", product="common"),
              OrderFilters(status="Fraud", product="common"),
              OrderFilters(status="all", flagged="1", product="common")):
        measured = Buffers(conn)
        first = await order_list.order_list(measured, f)
        assert first["count"][0] > order_list.PAGE_SIZE, f
        touched = measured.touched()
        assert sum(n for n, _ in touched) <= PILOTS + PAGE + COUNTED, (f, touched)
    measured = Buffers(conn)
    first = await order_list.order_list(measured, OrderFilters(status="Fraud", flagged="1"))
    assert first["count"] == (371, False)  # one order in 97, every one flagged
    (count_buffers, count_sql), = [t for t in measured.touched() if "count(*)" in t[1]]
    assert count_buffers <= 10, (count_buffers, count_sql)
    assert "Index Only Scan" in _node_types(measured.plans[-1][1]), measured.plans[-1]


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


async def test_budgeted_counts_never_claim_more_than_match_on_any_page(
    conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Whatever the budgets: a count without "+" is the truth; with it, no more than truly
    match; never fewer than the page on screen shows, on the first page or a later one (a
    later page counted its range with the same budget and said "36+" under 50 rows, the
    review found); and `partial` ("at least n") exactly when counting stopped short of the
    cap."""
    cap = order_list.LIST_COUNT_CAP
    for keys, walk in ((30, 40), (1_500, 250), (order_list.COUNT_KEYS, order_list.COUNT_WALK)):
        monkeypatch.setattr(order_list, "COUNT_KEYS", keys)
        monkeypatch.setattr(order_list, "COUNT_WALK", walk)
        for f, _, _ in SKEWED:
            truth = await _truth(conn, f)
            page = await order_list.order_list(conn, f)
            for _ in range(3):
                n, more = page["count"]
                assert n == len(truth) if not more else n <= len(truth), (f, keys, page["count"])
                assert page["partial"] == (more and n < cap), (f, keys)
                assert (n, more) >= (len(page["orders"]), page["more_after"]), (f, keys)
                if not page["more_after"]:
                    break
                page = await order_list.order_list(conn, f, after=page["last_id"])


async def test_an_order_holding_the_product_twice_is_counted_once(
    conn: asyncpg.Connection,
) -> None:
    """Both sides' keys merged: the product's are one per order. Read as they lay on the
    index, an order with two of the product's services matched twice and spent the merge's
    stop (LIST_COUNT_CAP + 1 joined rows) twice: 688 Active orders with the common product
    since a day, each holding it twice, were counted "501+" (the review)."""
    since = await conn.fetchval("SELECT created_at::date FROM orders"
                                " ORDER BY created_at, id OFFSET 20500 LIMIT 1")
    f = OrderFilters(status="Active", product="common", since=str(since))
    with pytest.raises(_RolledBack):  # the module's seeded database stays as it was
        async with conn.transaction():
            await conn.execute(
                "INSERT INTO services (order_id, product_id, billing_cycle, status, amount,"
                " created_at) SELECT order_id, product_id, billing_cycle, status, amount,"
                " created_at FROM services"
                " WHERE product_id = (SELECT id FROM products WHERE slug = 'common')")
            plan = await _side(conn, f)
            truth = await _truth(conn, f)
            assert plan.count == order_list.MERGE
            assert order_list.PAGE_SIZE < len(truth) <= order_list.LIST_COUNT_CAP
            first = await order_list.order_list(conn, f)
            assert first["count"] == (len(truth), False)
            assert [o["id"] for o in first["orders"]] == truth[:order_list.PAGE_SIZE]
            raise _RolledBack


class _RolledBack(Exception):
    pass


async def test_a_merge_whose_cut_side_outlasted_the_other_is_exact(
    conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A merged count read past its budget on one side (more keys than COUNT_KEYS) said "at
    least N" even when the other side's keys had all been read and ended before the cut one's
    reading stopped: no match can lie beyond, and the count is exact (stop 22's note). Both
    ways of merging: the full merge (sparse matches) and the dense one's recount. Counts that
    truly stopped early still say so."""
    monkeypatch.setattr(order_list, "SMALL_SIDE", 100)
    with pytest.raises(_RolledBack):
        async with conn.transaction():
            # A product on every third of the first 3,000 orders (1,000 services): its keys end
            # early in the range, long before either side's budget below is spent.
            await conn.execute(
                "INSERT INTO products (slug, name, type, module, auto_setup) VALUES"
                " ('early', 'Early', 'hosting', 'autorelease', 'never')")
            await conn.execute(
                "INSERT INTO services (order_id, product_id, billing_cycle, status, amount,"
                " created_at) SELECT o.id, (SELECT id FROM products WHERE slug = 'early'),"
                " 'monthly', 'Active', 10, o.created_at FROM orders o"
                " WHERE o.order_number - 1000000000 BETWEEN 1 AND 3000"
                " AND o.order_number % 3 = 0")
            for f, keys, dense in ((OrderFilters(status="Cancelled", product="early"), 1_500, False),
                                   (OrderFilters(status="Active", product="early"), 5_000, True)):
                monkeypatch.setattr(order_list, "COUNT_KEYS", keys)
                plan = await _side(conn, f)
                assert (plan.count, plan.dense) == (order_list.MERGE, dense), f
                truth = await _truth(conn, f)
                status_orders = await conn.fetchval(
                    "SELECT count(*) FROM orders WHERE status = $1", f.status)
                assert status_orders > keys > 1_000  # the orders side is cut, the product's not
                assert order_list.PAGE_SIZE < len(truth) < order_list.LIST_COUNT_CAP
                first = await order_list.order_list(conn, f)
                assert first["count"] == (len(truth), False), (f, len(truth))
                assert not first["partial"]
                # Its budget cut before the product's keys end: it did stop early.
                monkeypatch.setattr(order_list, "COUNT_KEYS", 120)
                short = await order_list.order_list(conn, f)
                assert short["count"][1] and short["partial"], short["count"]
                assert short["count"][0] < len(truth)
            raise _RolledBack


# -- the exact count, over HTTP ----------------------------------------------------------------


class _NoBroker:
    """The console's publisher, absent: these pages only read."""

    async def close(self) -> None:
        pass


@pytest.fixture
async def viewer(infra: Any, seeded_url: str,
                 conn: asyncpg.Connection) -> AsyncIterator[httpx.AsyncClient]:
    """The console on the seeded history, a viewer signed in (reading is all it needs)."""
    s = _test_settings(infra, 0, "unused").model_copy(update={"database_url": seeded_url})
    state = await open_state(s, publisher=_NoBroker())  # type: ignore[arg-type]
    try:
        await conn.execute("INSERT INTO operators (name, role, password_hash)"
                           " SELECT 'vera', $1, $2 WHERE NOT EXISTS"
                           " (SELECT 1 FROM operators WHERE name = 'vera')",
                           Role.VIEWER, await password_hash())
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(state)),
                                   base_url="http://console.test")
        async with aclosing(client):
            page = await client.get("/sign-in")
            signed = await client.post("/sign-in", data={
                "name": "vera", "password": PASSWORD, "csrf": csrf_of(page.text), "next": "/"})
            assert signed.status_code == 303, signed.text
            yield client
    finally:
        await close_state(state)


def _count_head(page: str) -> str:
    """The list head's count, as read (tags dropped, spaces joined)."""
    found = re.search(r'<span id="order-count".*?</span>\s*(?:</span>)?', page, re.S)
    assert found, page[:2000]
    return " ".join(re.sub(r"<[^>]+>", " ", html.unescape(found.group(0))).split())


async def test_a_partial_count_is_followed_by_the_exact_one(
    viewer: httpx.AsyncClient, conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 13 (an operator wants the real total): a list whose count stopped on its budget
    shows "at least N" at once and asks for the exact count itself (an htmx GET on load, the
    same filters); the fragment's number is the plain COUNT's, for every skewed filter. A
    capped count ("1,000+") offers the same on a click."""
    monkeypatch.setattr(order_list, "COUNT_KEYS", 30)
    f = SKEWED[3][0]  # Cancelled with the launched product: both sides' keys merged
    listed = await viewer.get("/orders", params=f.query())
    assert listed.status_code == 200
    head = _count_head(listed.text)
    assert head.startswith("at least ") and "counting them all" in head, head
    tag = re.search(r'<span id="order-count"[^>]*>', listed.text).group(0)
    assert 'hx-trigger="load"' in tag and "hx-preserve" in tag, tag
    fetch = html.unescape(re.search(r'hx-get="([^"]+)"', tag).group(1))
    assert fetch.startswith("/orders/count?")
    truth = await _truth(conn, f)
    answer = await viewer.get(fetch)
    assert answer.status_code == 200
    assert _count_head(answer.text).startswith(f"exactly {len(truth):,} orders match"), answer.text
    # The list's refreshes keep it (its span's hx-preserve), and do not count again.
    assert "hx-trigger" not in answer.text and "hx-preserve" not in answer.text
    # Every skewed filter: the exact count is the plain query's, capped or not in the list.
    for f, _, _ in SKEWED:
        truth = await _truth(conn, f)
        answer = await viewer.get("/orders/count", params=f.query())
        head = _count_head(answer.text)
        assert head.startswith(f"exactly {len(truth):,} order"), (f, head)
    # A count capped at 1,000 offers the exact one, on a click.
    listed = await viewer.get("/orders", params={"status": "all", "product": "launch"})
    head = _count_head(listed.text)
    assert head.startswith("1,000+ orders match") and "count them all" in head, head
    assert 'hx-trigger="load"' not in listed.text
    # No product: a plain count, the same.
    answer = await viewer.get("/orders/count", params={"status": "Cancelled"})
    cancelled = await conn.fetchval("SELECT count(*) FROM orders WHERE status = 'Cancelled'")
    assert _count_head(answer.text).startswith(f"exactly {cancelled:,} orders match")


async def test_an_exact_count_stopped_by_its_timeout_says_the_bound(
    viewer: httpx.AsyncClient, conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past its statement_timeout the exact count is cancelled by the server, and the fragment
    says what the list's budgeted count knows and how long it tried: never a traceback, never
    a number more than match."""
    monkeypatch.setattr(order_list, "EXACT_COUNT_SECONDS", 0.001)  # 1 ms: no count of 36,000
    for f, keys in ((SKEWED[3][0], 30), (OrderFilters(status="all", product="common"), 20_000)):
        monkeypatch.setattr(order_list, "COUNT_KEYS", keys)
        answer = await viewer.get("/orders/count", params=f.query())
        assert answer.status_code == 200
        (n, more), partial = await order_list.list_count(conn, f)
        # Stopped on its budget ("at least"), or at the cap ("1,000+"): one of each here.
        said = f"at least {n:,}" if partial else f"{n:,}+"
        assert (partial, more) == ((True, True) if keys == 30 else (False, True))
        assert _count_head(answer.text) == (
            f"{said} orders match (counting them all stopped after 0.001 s)")
        assert n <= len(await _truth(conn, f))
        assert "Traceback" not in answer.text


async def test_bad_filter_input_is_one_readable_error(viewer: httpx.AsyncClient) -> None:
    """The fragment validates its filters as the list does: a date that is none is refused in
    one line (400), the input escaped; a status it does not know reads as the review queue's,
    as the list reads it; a product nobody has counts none."""
    answer = await viewer.get("/orders/count", params={"since": "2021-13-01", "product": "common"})
    assert answer.status_code == 400
    assert _count_head(answer.text) == \
        "Could not count: from '2021-13-01' is not a date (YYYY-MM-DD)"
    hostile = await viewer.get("/orders/count", params={"until": "<script>x</script>"})
    assert hostile.status_code == 400 and "<script>" not in hostile.text
    assert "&lt;script&gt;" in hostile.text and "Traceback" not in hostile.text
    # The last day there is (no day after it to end a range) and a digit that is not 0-9.
    for params, line in (({"until": "9999-12-31"},
                          "Could not count: to '9999-12-31' is too far ahead (before 9999-01-01)"),
                         ({"since": "9999-01-01"},
                          "Could not count: from '9999-01-01' is too far ahead (before 9999-01-01)")):
        answer = await viewer.get("/orders/count", params=params)
        assert (answer.status_code, _count_head(answer.text)) == (400, line)
        listed = await viewer.get("/orders", params=params)
        assert listed.status_code == 200 and line.split(": ", 1)[1] in html.unescape(listed.text)
    answer = await viewer.get("/orders/count", params={"client": "\u00b2"})
    assert answer.status_code == 200 and _count_head(answer.text).startswith("exactly 0 orders match")
    listed = await viewer.get("/orders", params={"client": "\u00b2"})
    assert listed.status_code == 200
    answer = await viewer.get("/orders/count", params={"product": "no-such-thing"})
    assert _count_head(answer.text).startswith("exactly 0 orders match")
    answer = await viewer.get("/orders/count", params={"status": "bogus"})
    assert answer.status_code == 200 and "exactly" in answer.text


async def test_a_product_launched_lately_is_counted_from_the_ranges_end(
    conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 13 (b): a product launched lately, over all time, walked COUNT_WALK of its
    services probing each order to say "1,000+" (about 4,000 buffers at 1M: the pilot from
    the range's start found none of its orders). Its newest keys and the range's newest
    orders, merged backwards on their indexes alone, hold 1,001 matches within a few leaves;
    the count says the same "1,000+", true (more than 1,000 match), for a few dozen buffers.
    Too few there (a small budget), the walk counts as before."""
    for f in (SKEWED[0][0], SKEWED[1][0]):  # any status, Active: each with the launched one
        plan = await _side(conn, f)
        assert (plan.count, plan.tail) == (order_list.WALK, True), f
        truth = await _truth(conn, f)
        assert len(truth) > order_list.LIST_COUNT_CAP
        measured = Buffers(conn)
        first = await order_list.order_list(measured, f)
        assert first["count"] == (order_list.LIST_COUNT_CAP, True) and not first["partial"]
        tails = [(plan.get("Shared Hit Blocks", 0) + plan.get("Shared Read Blocks", 0), sql)
                 for sql, plan in measured.plans if "s.order_id DESC LIMIT" in sql]
        assert len(tails) == 1 and tails[0][0] <= 60, tails
        walk = f"LIMIT {order_list.COUNT_WALK + 1}"
        assert not any(walk in sql for sql, _ in measured.plans), "walked anyway"
        assert [o["id"] for o in first["orders"]] == truth[:order_list.PAGE_SIZE]
    monkeypatch.setattr(order_list, "TAIL_KEYS", 30)
    measured = Buffers(conn)
    first = await order_list.order_list(measured, SKEWED[1][0])
    assert first["count"] == (order_list.LIST_COUNT_CAP, True)  # the walk: 1,001 within 1,200
    assert any(f"LIMIT {order_list.COUNT_WALK + 1}" in " ".join(sql.split())
               for sql, _ in measured.plans)


async def test_exact_counts_take_turns_and_are_kept_a_minute(
    viewer: httpx.AsyncClient, conn: asyncpg.Connection,
) -> None:
    """Each exact count may hold one of the console's few connections for seconds, and any
    operator may ask: at most AT_ONCE run and AT_ONCE wait; one more is answered at once
    with the bound it has. A count made is said again for a minute, not made again."""
    counts = viewer._transport.app.state.console.counts  # type: ignore[attr-defined]
    cancelled = await conn.fetchval("SELECT count(*) FROM orders WHERE status = 'Cancelled'")
    fraud = await conn.fetchval("SELECT count(*) FROM orders WHERE status = 'Fraud'")
    for _ in range(AT_ONCE):
        await counts.running.acquire()  # as many counts as may run, running
    try:
        waiting = [asyncio.create_task(viewer.get("/orders/count", params={"status": status}))
                   for status in ("Cancelled", "Fraud")]
        await asyncio.sleep(0.3)
        assert not any(w.done() for w in waiting), "a count ran past the limit"
        busy = await asyncio.wait_for(viewer.get("/orders/count", params={"status": "Active"}), 10)
        assert busy.status_code == 200
        assert _count_head(busy.text).endswith(
            "orders match (other counts are running: reload to count them all)"), busy.text
        listed = await asyncio.wait_for(viewer.get("/orders", params={"status": "Cancelled"}), 10)
        assert listed.status_code == 200  # the pages do not wait for the counts
    finally:
        for _ in range(AT_ONCE):
            counts.running.release()
    answers = [await asyncio.wait_for(w, 10) for w in waiting]
    assert _count_head(answers[0].text).startswith(f"exactly {cancelled:,} orders match")
    assert _count_head(answers[1].text).startswith(f"exactly {fraud:,} orders match")
    # Counted once: said again with nothing left to run it (every turn taken, none waiting).
    for _ in range(AT_ONCE):
        await counts.running.acquire()
    try:
        again = await asyncio.wait_for(viewer.get("/orders/count", params={"status": "Cancelled"}), 10)
        assert _count_head(again.text) == _count_head(answers[0].text)
    finally:
        for _ in range(AT_ONCE):
            counts.running.release()
    # Past its minute it is counted again.
    counts.keep_seconds = 0.0
    await asyncio.sleep(0.01)
    fresh = await viewer.get("/orders/count", params={"status": "Cancelled"})
    assert _count_head(fresh.text).startswith(f"exactly {cancelled:,} orders match")


async def test_a_first_pages_merge_goes_on_from_where_its_count_stopped(
    conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Cancelled with the launched product (both sides' keys merged): its count reads
    COUNT_KEYS keys of each side from the trial's orders years ago and stops before the
    launched ones; the page's merge then read every Cancelled key again from the range's
    start (1M orders: 413 of that first visit's 1,045 pages read from the disk). It now goes
    on from where the count stopped, and from there starts where both sides have keys (the
    product's next order: the launch), so it reads a few pages' worth of orders; and the
    pages are the plain query's, whatever the budget."""
    f = SKEWED[3][0]
    truth = await _truth(conn, f)
    for keys in (30, 300):  # budgets that stop before the launched orders
        monkeypatch.setattr(order_list, "COUNT_KEYS", keys)
        analyzing = Analyzing(conn)
        first = await order_list.order_list(analyzing, f)
        assert [o["id"] for o in first["orders"]] == truth[:order_list.PAGE_SIZE], keys
        assert first["more_after"] and first["partial"], keys  # the count did stop
        merges = [orders_read(plan) for sql, plan in analyzing.plans
                  if sql.startswith("SELECT k.id")]  # the page's merge
        assert merges and max(merges) <= 6 * order_list.PAGE_SIZE, (keys, merges)
        second = await order_list.order_list(conn, f, after=first["last_id"])
        assert [o["id"] for o in second["orders"]] == truth[50:100], keys
