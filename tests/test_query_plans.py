"""The hot queries at scale (issue 15, target 1): on a history seeded with set-based SQL
(40,000 orders of 15,000 clients, with items, invoices, payments, fraud checks, jobs and
mails; a few Pending, Fraud, parked), each query the pipeline and the operator's commands
run — the fraud facts (velocity by IP and client, the existing-client check), the client
lookup by email at placement, the pending list, orders by client and by email, `show`, `failures`,
the console's order list with each of its filters — is planned on indexes, never a sequential
scan of orders, clients or the item tables; and a page of the console's list reads a page's
worth of orders, not every order before its range.

The code runs as it is, with its own SQL: it is handed a connection that plans (EXPLAIN,
same parameters) each statement it is given, then runs it. How fast the queries are is
measured in bench/, not here."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from cli import views
from conftest import seeded_database
from console import order_list, queries
from services.fraud.facts import lock_many_with_facts, lock_with_facts, read_facts
from services.placement.handlers import Publisher, _order_and_client
from services.provisioning.batch import LockedOrders
from services.provisioning.jobs import LOCK_OUTCOME_ORDERS
from services.provisioning.locks import lock_orders
from services.provisioning.reconcile import OrderState, reconcile_many
from shared import db
from shared.contracts import OrderEvent, PaymentReceived, PlaceOrder
from shared.states import ENDED

ORDERS = 40_000
CLIENTS = 15_000
# Tables that grow with the history: none of them may be read whole by a hot query.
GROWING = frozenset({"orders", "clients", "client_storefronts", "services", "domains",
                     "invoices", "invoice_items", "payments", "fraud_checks", "order_history",
                     "jobs", "emails"})

SEED = [
    # Clients of the anonymous storefront, with the creator's link row older databases hold
    # (placement now writes none: clients.storefront says it).
    "INSERT INTO clients (email, storefront, country, created_at)"
    " SELECT 'client' || g || '@seed.example', '', 'GB', now() - interval '10 years'"
    " FROM generate_series(1, {clients}) g",
    "INSERT INTO client_storefronts (storefront, client_id) SELECT '', id FROM clients",
    # One order every ~2 hours going back nine years; an IP shared by about ten orders;
    # mostly Active, 1 % Pending (the newest of them still queued, some with screening
    # errors), 0.5 % Fraud, 3 % Cancelled.
    "INSERT INTO orders (order_ref, order_number, client_id, status, screening, currency,"
    " send_confirmation, generate_invoice, total, ip_address, storefront, created_at)"
    " SELECT 'seed-' || g, 1000000000 + g, 1 + g % {clients},"
    "  CASE WHEN g % 200 = 0 THEN 'Fraud' WHEN g % 100 = 0 THEN 'Pending'"
    "       WHEN g % 33 = 0 THEN 'Cancelled' ELSE 'Active' END,"
    "  CASE WHEN g % 100 = 0 AND g > {orders} - 500 THEN 'queued'"
    "       WHEN g % 100 = 0 AND g % 700 = 0 THEN 'error' ELSE 'passed' END,"
    "  'USD', true, true, 10, ('10.' || (g / 2560) % 256 || '.' || (g / 10) % 256 || '.1')::inet,"
    "  '', now() - make_interval(mins => ({orders} - g) * 120)"
    " FROM generate_series(1, {orders}) g",
    "INSERT INTO services (order_id, product_id, billing_cycle, domain, status, amount, created_at)"
    # Half the orders have the first product, half the second; one in a thousand the third
    # (a product few orders have), none the others (the console's product filter).
    " SELECT o.id, (ARRAY(SELECT id FROM products ORDER BY id))"
    "  [CASE WHEN o.id % 1000 = 0 THEN 3 ELSE 1 + o.id % 2 END], 'monthly',"
    "  'seed' || o.id || '.example',"
    "  CASE o.status WHEN 'Active' THEN 'Active' WHEN 'Pending' THEN 'Pending' ELSE 'Cancelled' END,"
    "  10, o.created_at FROM orders o",
    "INSERT INTO domains (order_id, domain, tld, action, years, status, amount, created_at)"
    " SELECT o.id, 'seed' || o.id || '.com', 'com', 'register', 1, 'Active', 12, o.created_at"
    " FROM orders o WHERE o.id % 5 = 0 AND o.status = 'Active'",
    "INSERT INTO invoices (order_id, client_id, status, currency, subtotal, total, amount_paid,"
    " created_at, paid_at)"
    " SELECT id, client_id, CASE WHEN status = 'Active' THEN 'Paid' ELSE 'Unpaid' END, 'USD',"
    "  10, 10, CASE WHEN status = 'Active' THEN 10 ELSE 0 END, created_at,"
    "  CASE WHEN status = 'Active' THEN created_at END FROM orders",
    "INSERT INTO invoice_items (invoice_id, kind, service_id, description, amount)"
    " SELECT i.id, 'service', s.id, 'Hosting', 10 FROM invoices i JOIN services s USING (order_id)",
    "INSERT INTO payments (gateway, transaction_id, amount, raw_amount, currency, invoice_id,"
    " requested_invoice_id, status, message_id, received_at, applied_at)"
    " SELECT 'seed', 'tx' || id, 10, '10', 'USD', id, id, 'applied', 'm' || id, paid_at, paid_at"
    " FROM invoices WHERE status = 'Paid'",
    "INSERT INTO payments (gateway, transaction_id, raw_amount, order_ref, status, reason,"
    " message_id) SELECT 'seed', 'lost' || g, '5', 'nowhere-' || g, 'unapplied', 'no invoice',"
    " 'lost' || g FROM generate_series(1, 20) g",
    "INSERT INTO fraud_checks (order_id, provider, result, score, threshold, error, created_at)"
    " SELECT id, 'local', CASE screening WHEN 'error' THEN 'error' ELSE 'passed' END,"
    "  CASE WHEN screening = 'error' THEN NULL ELSE 5 END, 75,"
    "  CASE WHEN screening = 'error' THEN 'provider timed out' END, created_at"
    " FROM orders WHERE screening <> 'queued'",
    "INSERT INTO order_history (order_id, at, actor, action, to_status)"
    " SELECT id, created_at, 'placement', 'placed', 'Pending' FROM orders",
    "INSERT INTO jobs (order_id, service_id, kind, status, attempts, last_error, created_at,"
    " updated_at)"
    " SELECT s.order_id, s.id, 'create', CASE WHEN s.id % 5000 = 1 THEN 'parked' ELSE 'done' END,"
    "  1, CASE WHEN s.id % 5000 = 1 THEN 'server said no' END, s.created_at, s.created_at"
    " FROM services s WHERE s.status = 'Active'",
    "INSERT INTO emails (dedupe_key, template, recipient, order_id, message_id, status,"
    " attempts, last_error, created_at, sent_at)"
    " SELECT 'confirm:' || o.id, 'order_confirmation', 'client@seed.example', o.id,"
    "  '<' || o.id || '@seed>', CASE WHEN o.id % 7000 = 0 THEN 'parked' ELSE 'sent' END, 1,"
    "  CASE WHEN o.id % 7000 = 0 THEN 'mailbox full' END, o.created_at, o.created_at"
    " FROM orders o",
    "ANALYZE",
]


@pytest.fixture(scope="module")
def seeded_url(infra: Any) -> Iterator[str]:
    """One seeded database for the module's tests (seeding takes seconds; the tests read)."""
    with seeded_database(infra, SEED, orders=ORDERS, clients=CLIENTS) as url:
        yield url


class Explaining:
    """A connection that plans every statement it is given (EXPLAIN, the same parameters) and
    keeps the plan, then runs it: the code under test runs its own SQL."""

    def __init__(self, conn: asyncpg.Connection,
                 plans: list[tuple[str, dict[str, Any]]] | None = None) -> None:
        self.conn = conn
        self.plans: list[tuple[str, dict[str, Any]]] = [] if plans is None else plans

    async def _plan(self, sql: str, args: tuple[Any, ...]) -> None:
        plan = await self.conn.fetchval("EXPLAIN (FORMAT JSON) " + sql, *args)
        self.plans.append((sql, (json.loads(plan) if isinstance(plan, str) else plan)[0]["Plan"]))

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        await self._plan(sql, args)
        return await self.conn.fetch(sql, *args)

    async def fetchrow(self, sql: str, *args: Any) -> asyncpg.Record | None:
        await self._plan(sql, args)
        return await self.conn.fetchrow(sql, *args)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        await self._plan(sql, args)
        return await self.conn.fetchval(sql, *args)

    async def execute(self, sql: str, *args: Any) -> str:  # settings: nothing to plan
        return await self.conn.execute(sql, *args)

    def transaction(self) -> Any:
        return self.conn.transaction()


class Generic(Explaining):
    """Plans each statement both ways a pooled connection runs it: the custom plan of its
    first five executions (EXPLAIN with the parameters, as above) and then the generic plan,
    made once for any value, that PostgreSQL keeps for the connection once it looks no
    dearer (PREPARE, then EXPLAIN EXECUTE under plan_cache_mode = force_generic_plan). The
    batch statements take their ids through `db.planned_once` so that they keep it
    (test_a_batchs_statements_keep_a_generic_plan): both plans must use the indexes."""

    async def _plan(self, sql: str, args: tuple[Any, ...]) -> None:
        await super()._plan(sql, args)
        name = f"generic_{len(self.plans)}"
        await self.conn.execute(f"PREPARE {name} AS {sql}")
        try:
            types = await self.conn.fetchval("SELECT parameter_types::text[]"
                                             " FROM pg_prepared_statements WHERE name = $1", name)
            values = [await self.conn.fetchval(f"SELECT quote_literal($1::{t}) || '::{t}'", arg)
                      for t, arg in zip(types, args, strict=True)]
            await self.conn.execute("SET plan_cache_mode = force_generic_plan")
            plan = await self.conn.fetchval(
                f"EXPLAIN (FORMAT JSON) EXECUTE {name}({', '.join(values)})")
        finally:
            await self.conn.execute("RESET plan_cache_mode")
            await self.conn.execute(f"DEALLOCATE {name}")
        self.plans.append((sql, (json.loads(plan) if isinstance(plan, str) else plan)[0]["Plan"]))


def scans(plan: dict[str, Any]) -> list[tuple[str, str | None, str | None]]:
    """Every node of a plan that reads a relation: (node type, relation, index)."""
    found = []
    if "Relation Name" in plan or "Index Name" in plan:
        found.append((plan["Node Type"], plan.get("Relation Name"), plan.get("Index Name")))
    for child in plan.get("Plans", []):
        found += scans(child)
    return found


def assert_indexed(explaining: Explaining, *, expected: int) -> None:
    """No plan reads a growing table whole, and each reads at least one through an index."""
    assert len(explaining.plans) == expected, [sql for sql, _ in explaining.plans]
    wrong = []
    for sql, plan in explaining.plans:
        read = scans(plan)
        whole = [relation for node, relation, _ in read
                 if node == "Seq Scan" and relation in GROWING]
        indexed = [index for _, relation, index in read if index and relation in (GROWING | {None})]
        if whole or not indexed:
            wrong.append(f"{' '.join(sql.split())[:160]}: read whole {whole}, plan {read}")
    assert not wrong, "\n".join(wrong)


@pytest.fixture
async def conn(seeded_url: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(seeded_url)
    await db.init_connection(connection)  # jsonb as the pool reads it
    try:
        yield connection
    finally:
        await connection.close()


async def test_fraud_facts_velocity_and_existing_client_use_indexes(
    conn: asyncpg.Connection,
) -> None:
    explaining = Explaining(conn)
    # The newest order of a client with an earlier Active one (an existing client).
    latest = await conn.fetchval(
        "SELECT max(o.id) FROM orders o WHERE o.id % 100 <> 0 AND EXISTS (SELECT 1 FROM orders x"
        " WHERE x.client_id = o.client_id AND x.id < o.id AND x.status = 'Active')")
    found = await read_facts(explaining, latest, timedelta(hours=24))
    assert found is not None
    _, facts = found
    assert facts.orders_from_ip >= 1 and facts.orders_from_client >= 1
    assert not facts.client_is_new  # the client's earlier orders were found (and counted)
    generic = Generic(conn)
    async with conn.transaction():
        assert await lock_with_facts(explaining, latest - 1, timedelta(hours=24)) is not None
        # A batch's orders, locked and read together (the fraud routes' load step): its
        # custom plan and the generic plan it keeps.
        batch = [latest - 7, latest - 3, latest - 2]
        assert list(await lock_many_with_facts(generic, batch, timedelta(hours=24))) == batch
    assert_indexed(explaining, expected=2)
    assert_indexed(generic, expected=2)
    # Orders are read three times a screening: the order, its client's orders once for all five
    # counts, the IP's; the order's items once for the cart and the domain names. (Five scans of
    # the client's orders, one a bitmap AND over the primary key's range below the order, were
    # most of the screening's buffer accesses in bench/pipeline.py's burst.)
    for _, plan in explaining.plans + generic.plans:
        read = scans(plan)
        assert [relation for _, relation, _ in read].count("orders") == 3, read
        assert [relation for _, relation, _ in read].count("services") == 1, read
        assert [relation for _, relation, _ in read].count("domains") == 1, read
        assert ("Bitmap Index Scan", None, "orders_pkey") not in read, read


async def test_the_provisioning_batchs_order_locks_use_indexes(conn: asyncpg.Connection) -> None:
    """A batch's payments (by invoice id, by order ref) and order events lock their orders in
    one statement, on the primary key: never every order."""
    explaining = Generic(conn)
    newest = await conn.fetchval("SELECT max(id) FROM orders")
    invoice = await conn.fetchval("SELECT id FROM invoices WHERE order_id = $1", newest - 1)
    batch = [PaymentReceived(amount="10", invoice_id=invoice),
             PaymentReceived(amount="10", order_ref=f"seed-{newest - 2}"),
             OrderEvent(order_id=newest, order_ref=f"seed-{newest}")]
    async with conn.transaction():
        assert len(await lock_orders(batch, explaining)) == len(batch)  # one per message
        # A row this transaction locked carries its id (xmax): those three, no other.
        held = await conn.fetch("SELECT id FROM orders"
                                " WHERE xmax::text::bigint = txid_current() % 4294967296")
        assert sorted(r["id"] for r in held) == [newest - 2, newest - 1, newest]
    assert_indexed(explaining, expected=2)  # custom and generic
    for _, plan in explaining.plans:
        assert ("Seq Scan", "orders", None) not in scans(plan)


async def test_the_provisioning_batchs_reads_of_its_locked_orders_use_indexes(
    conn: asyncpg.Connection,
) -> None:
    """After the lock, the batch reads its orders, their invoices and waiting payments in one
    statement, and runs its reconcile steps in two (items, jobs): on indexes, never every
    order, payment, service or job."""
    explaining = Explaining(conn)
    newest = await conn.fetchval("SELECT max(id) FROM orders")
    ids = [newest - 2, newest - 1, newest]
    async with conn.transaction():
        locked = await LockedOrders.read(Generic(explaining.conn, explaining.plans), ids)
        assert sorted(locked.orders) == ids
        states = [OrderState.of(locked.order_state(i, ["order"]) or {}) for i in ids]
        steps = [(s.id, s, "plan") for s in states if s.status not in ENDED]
        assert len(steps) >= 2
        await reconcile_many(explaining, steps)
    assert_indexed(explaining, expected=len(explaining.plans))
    # read (custom and generic), items (and jobs, if any is wanted)
    assert len(explaining.plans) in (2, 3, 4)
    for _, plan in explaining.plans:
        assert not {r for node, r, _ in scans(plan) if node == "Seq Scan"} & {
            "orders", "payments", "services", "domains", "jobs", "invoices"}, scans(plan)


async def test_a_batchs_statements_keep_a_generic_plan(conn: asyncpg.Connection) -> None:
    """The statements that take a batch's ids as an array (fraud's facts, the provisioning
    batch's lock and read, the job outcome writer's lock) are planned once for the connection,
    not at every execution: after PostgreSQL's five custom plans, each runs its generic plan.
    With `ANY($1::bigint[])` the generic plan assumed ten ids where a custom plan counted a
    batch's one to three, always looked dearer, and was never used (0 generic plans): each
    execution was planned again, most of the facts read's CPU (docs/performance.md)."""
    newest = await conn.fetchval("SELECT max(id) FROM orders")
    invoices = [r["id"] for r in await conn.fetch(
        "SELECT id FROM invoices WHERE order_id > $1 ORDER BY id", newest - 20)]
    executed: list[str] = []

    class Recording(Explaining):
        async def _plan(self, sql: str, args: tuple[Any, ...]) -> None:
            executed.append(sql)

    recording = Recording(conn)
    async with conn.transaction():
        for n in range(8):  # one to three ids each time, as a batch at the steady rate has
            ids = list(range(newest - 3 * n, newest - 3 * n - 1 - n % 3, -1))[::-1]
            assert len(await lock_many_with_facts(recording, ids, timedelta(hours=24))) == len(ids)
            assert sorted((await LockedOrders.read(recording, ids)).orders) == ids
            messages = [OrderEvent(order_id=i, order_ref=f"seed-{i}") for i in ids[1:]]
            messages += [PaymentReceived(amount="10", invoice_id=invoices[n]),
                         PaymentReceived(amount="10", order_ref=f"seed-{ids[0]}")]
            await lock_orders(messages, recording)
            await recording.fetch(LOCK_OUTCOME_ORDERS, ids)
        plans = {r["statement"]: (r["generic_plans"], r["custom_plans"]) for r in await conn.fetch(
            "SELECT statement, generic_plans, custom_plans FROM pg_prepared_statements")}
    assert len(set(executed)) == 4, executed
    for sql in set(executed):
        generic, custom = plans[sql]
        assert (generic, custom) == (3, 5), (
            f"{' '.join(sql.split())[:120]}: {generic} generic, {custom} custom plans")


async def test_client_lookup_by_email_at_placement_uses_an_index(conn: asyncpg.Connection) -> None:
    explaining = Explaining(conn)
    for email in ("CLIENT123@seed.example", "someone-new@seed.example"):
        cmd = PlaceOrder.model_validate({
            "order_ref": f"plan-{len(email)}", "client": {"email": email},
            "items": [{"type": "product", "product": "starter", "billing_cycle": "monthly"}]})
        tx = conn.transaction()
        await tx.start()
        try:
            existing, client_id, shared = await _order_and_client(explaining, cmd, Publisher(""))
        finally:
            await tx.rollback()  # the new client is not kept
        assert existing is None and client_id is not None and not shared
    assert_indexed(explaining, expected=2)
    # The ref's orders are read once for both answers (this storefront's order, another's);
    # a new client is its storefront's by clients.storefront, with no link row written.
    for _, plan in explaining.plans:
        read = scans(plan)
        assert [relation for _, relation, _ in read].count("orders") == 1, read
        assert [relation for node, relation, _ in read if node == "ModifyTable"] in (
            [], ["clients"]), read


async def test_operator_reads_use_indexes(conn: asyncpg.Connection) -> None:
    explaining = Explaining(conn)
    pending = await views.pending_orders(explaining, limit=50)
    assert pending["pending"] and pending["more"] > 0
    by_client = await views.list_orders(explaining, client="123", limit=50)
    assert by_client and {o["client_id"] for o in by_client} == {123}
    by_email = await views.list_orders(explaining, client="Client123@seed.example", limit=50)
    assert [o["id"] for o in by_email] == [o["id"] for o in by_client]
    found = await views.failures(explaining, stuck_seconds=600)
    assert found["screening_errors"] and found["parked_setups"] and found["parked_emails"]
    assert found["unapplied_payments"]
    shown = await views.show_order(explaining, by_client[0]["id"])
    assert shown is not None and shown["invoice"] and shown["payments"] and shown["fraud"]
    assert_indexed(explaining, expected=3 + 5 + 7)


class Analyzing(Explaining):
    """Plans with EXPLAIN ANALYZE, so each plan says how many rows each node read."""

    async def _plan(self, sql: str, args: tuple[Any, ...]) -> None:
        plan = await self.conn.fetchval("EXPLAIN (ANALYZE, FORMAT JSON) " + sql, *args)
        self.plans.append((sql, (json.loads(plan) if isinstance(plan, str) else plan)[0]["Plan"]))


def orders_read(plan: dict[str, Any]) -> int:
    """Rows of orders a plan read: returned or removed by a filter, in every loop."""
    read = 0
    if plan.get("Relation Name") == "orders":
        read += (plan.get("Actual Rows", 0) + plan.get("Rows Removed by Filter", 0)
                 + plan.get("Rows Removed by Index Recheck", 0)) * plan.get("Actual Loops", 1)
    return read + sum(orders_read(child) for child in plan.get("Plans", []))


def heap_rows_read(plan: dict[str, Any]) -> int:
    """Rows of orders a plan fetched from the heap (an index-only count is not one)."""
    read = 0
    if plan.get("Relation Name") == "orders" and plan.get("Node Type") != "Index Only Scan":
        read += (plan.get("Actual Rows", 0) + plan.get("Rows Removed by Filter", 0)
                 + plan.get("Rows Removed by Index Recheck", 0)) * plan.get("Actual Loops", 1)
    return read + sum(heap_rows_read(child) for child in plan.get("Plans", []))


async def test_pending_and_orders_by_status_fetch_about_a_page(conn: asyncpg.Connection) -> None:
    """`ordermill pending` and `ordermill orders --status` fetch their page's orders, not every
    order of the status to sort them: Pending orders lie across the years (nothing cancels an
    unpaid order), and `pending` reads them on orders_pending_idx, in its own order
    (migration 0036 kept it on review); `orders` reads newest first on (status, created_at, id)."""
    analyzing = Analyzing(conn)
    pending = await views.pending_orders(analyzing, limit=20)
    assert pending["more"] > 100  # enough Pending orders that reading them all would show
    active = await views.list_orders(analyzing, status="Active", limit=20)
    assert len(active) == 20 and {o["status"] for o in active} == {"Active"}
    created = [o["created_at"] for o in active]
    assert created == sorted(created, reverse=True)
    fetched = [heap_rows_read(plan) for _, plan in analyzing.plans]
    assert len(fetched) == 2 and all(n <= 2 * 20 + 10 for n in fetched), fetched


def _ago(days: int) -> str:
    return (datetime.now(UTC) - timedelta(days=days)).date().isoformat()


# The console list's filters, alone and together (console/order_list.py OrderFilters): status,
# a product most orders have, one few have, one nobody has, dates, screening, flagged, client
# by id and by email, search.
CONSOLE_FILTERS: list[dict[str, str]] = [
    {},  # the review queue
    {"status": "Active", "product": "starter", "since": _ago(3 * 365)},
    {"status": "all", "product": "trial"},
    {"status": "Active", "product": "dedicated", "since": _ago(5 * 365)},
    {"status": "review", "product": "starter"},
    {"status": "Cancelled", "since": _ago(6 * 365), "until": _ago(4 * 365)},
    {"status": "all", "since": _ago(40), "until": _ago(10)},
    {"status": "Fraud", "until": _ago(5 * 365)},
    {"status": "all", "screening": "error"},
    {"status": "all", "screening": "passed", "since": _ago(365)},
    {"status": "all", "flagged": "1", "since": _ago(4 * 365)},
    {"status": "all", "client": "123"},
    {"status": "Active", "client": "Client123@seed.example", "product": "starter"},
    {"status": "all", "q": "seed-777", "since": _ago(9 * 365)},
    {"status": "all", "q": "seed778.example"},
]


BUDGETS = {order_list.COUNT_KEYS, order_list.COUNT_KEYS + 1, order_list.COUNT_WALK,
           order_list.COUNT_WALK + 1}


async def test_console_list_filters_read_a_page_on_an_index(conn: asyncpg.Connection) -> None:
    """Every statement of each filtered list (its page, its capped count, the product's
    lookups) reads orders through an index, never whole, and reads about a page of them: at
    most a few times the statement's LIMIT. Read in id order, a date filter walked every order
    of the status from the first one (tens of thousands here, a million in bench/console_pages.py)."""
    explaining = Analyzing(conn)
    pages = []
    for filters in CONSOLE_FILTERS:
        f = order_list.OrderFilters.of(filters)
        pages.append(first := await order_list.order_list(explaining, f))
        if first["more_after"]:  # the next page, and back
            second = await order_list.order_list(explaining, f, after=first["last_id"])
            assert second["orders"] and second["more_before"]
            back = await order_list.order_list(explaining, f, before=second["first_id"])
            assert [o["id"] for o in back["orders"]] == [o["id"] for o in first["orders"]]
    # Each filter found what it should (the seed has some of each but the unused product).
    empty = [CONSOLE_FILTERS[i] for i, page in enumerate(pages) if not page["orders"]]
    assert empty == [CONSOLE_FILTERS[3]], empty
    assert {o["client_id"] for o in pages[11]["orders"]} == {123}
    read = [sql for sql, plan in explaining.plans if orders_read(plan)]
    assert len(read) > 2 * len(CONSOLE_FILTERS)
    wrong = []
    for sql, plan in explaining.plans:
        nodes = scans(plan)
        whole = [relation for node, relation, _ in nodes
                 if node == "Seq Scan" and relation in GROWING]
        n = orders_read(plan)
        # A count's budget (the keys or rows it may read at most) is not what it reads: it
        # stops at LIST_COUNT_CAP + 1 matches, which these filters reach within a few times.
        limits = [int(x) for x in re.findall(r"LIMIT (\d+)", sql) if int(x) not in BUDGETS]
        bound = 5 * max(limits, default=20) + 100
        by_index = any((index or "").startswith("orders_") for _, _, index in nodes)
        if whole or (n and not by_index) or n > bound:
            wrong.append(f"{' '.join(sql.split())[-200:]}: read whole {whole}, {n} orders read"
                         f" (at most {bound}), plan {nodes}")
    assert not wrong, "\n".join(wrong)


def rows_read(plan: dict[str, Any], relation: str) -> int:
    """Rows of `relation` a plan read, in every loop (returned or removed by a filter)."""
    read = 0
    if plan.get("Relation Name") == relation:
        read += (plan.get("Actual Rows", 0) + plan.get("Rows Removed by Filter", 0)
                 ) * plan.get("Actual Loops", 1)
    return read + sum(rows_read(child, relation) for child in plan.get("Plans", []))


async def test_console_dashboard_counts_on_indexes_and_joins_only_the_rows_it_shows(
        conn: asyncpg.Connection) -> None:
    """The dashboard (issue 13, first visits from the disk): its counts by status read the
    status's index (Active, most of the table, was read in a sequential scan: 261 heap pages
    at 1M orders), and its lists of ten join each order's client and invoice for those ten
    only (the flagged list joined every errored Pending order, then kept ten: 293 pages)."""
    analyzing = Analyzing(conn)
    data = await queries.dashboard(analyzing)
    assert data["counts"]["Active"] == (10_000, True)
    assert len(data["awaiting"]) == 10 and len(data["flagged"]) == 10
    assert data["flagged_count"][0] > 20  # more errored orders than the list shows
    whole = [(sql[:80], relation) for sql, plan in analyzing.plans
             for node, relation, _ in scans(plan) if node == "Seq Scan" and relation in GROWING]
    assert not whole
    joined = {" ".join(sql.split())[:60]: rows_read(plan, "clients")
              for sql, plan in analyzing.plans}
    assert max(joined.values()) <= 10, joined
