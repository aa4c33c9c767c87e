"""A batch's shared reads (`route(load=...)`, shared/runtime/middleware/load.py): placement's
catalog rows and fraud's facts are read once for a transaction's messages, and each message is
still handled as it would be alone: its own prices, its own client's facts, what an earlier
screening of the batch wrote, the rule set in force when the transaction began."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest

from conftest import order_body
from services.fraud.operator_rules import parse_toml
from services.fraud.rule_store import store
from services.fraud.worker import worker as fraud_worker
from services.placement import pricing
from services.placement.worker import worker as placement_worker
from shared import db
from shared.contracts import OrderPlaced, OrderRejected, PlaceOrder
from shared.runtime import WorkerSpec, route
from shared.runtime.testing import InMemoryFlow, Published
from shared.settings import Settings
from shared.uow import UnitOfWork

# -- the runtime's load step ---------------------------------------------------------------


async def test_a_load_step_runs_once_per_transaction_with_its_messages_in_order(
    flow: InMemoryFlow,
) -> None:
    loads: list[list[str]] = []
    seen: list[tuple[str, Any]] = []

    async def load(events: list[OrderRejected], conn: asyncpg.Connection) -> list[str | None]:
        loads.append([e.order_ref for e in events])
        n = len(loads)
        return [None if e.order_ref == "own" else f"{e.order_ref}@{n}" for e in events]

    async def handle(event: OrderRejected, uow: UnitOfWork) -> None:
        seen.append((event.order_ref, uow.loaded))
        if event.order_ref == "bad":
            raise ValueError("refused")

    async def plain(event: OrderRejected, uow: UnitOfWork) -> None:
        seen.append((event.order_ref, uow.loaded))

    flow.add(WorkerSpec(service="placement", routes={
        "order.place": route(handle, load=load), "order.other": route(handle, load=load),
        "order.plain": route(plain)}))
    batch = [flow.message("order.place", {"order_ref": "a", "reason": "x"}),
             flow.message("order.plain", {"order_ref": "p", "reason": "x"}),
             flow.message("order.other", {"order_ref": "b", "reason": "x"}),
             flow.message("order.place", {"order_ref": "own", "reason": "x"})]
    await flow.deliver(batch, to="placement")
    assert [m.outcome for m in batch] == ["acked"] * 4
    # One load for the two routes sharing it, in the handlers' order; none for the plain route.
    assert loads == [["a", "b", "own"]]
    assert seen == [("a", "a@1"), ("p", None), ("b", "b@1"), ("own", None)]

    # A message alone is not loaded: its handler reads for itself.
    loads.clear()
    seen.clear()
    await flow.deliver([flow.message("order.place", {"order_ref": "lone", "reason": "x"})])
    assert loads == [] and seen == [("lone", None)]


async def test_what_a_rolled_back_batch_loaded_never_reaches_a_handler(
    flow: InMemoryFlow,
) -> None:
    loads: list[int] = []
    seen: list[tuple[str, Any]] = []

    async def load(events: list[OrderRejected], conn: asyncpg.Connection) -> list[int]:
        loads.append(await conn.fetchval("SELECT txid_current()"))
        return [loads[-1]] * len(events)

    async def handle(event: OrderRejected, uow: UnitOfWork) -> None:
        seen.append((event.order_ref, uow.loaded))
        if event.order_ref == "bad":
            raise ValueError("refused")
        if len(seen) == 1:
            raise asyncpg.DeadlockDetectedError("deadlock detected (test)")

    flow.add(WorkerSpec(service="placement", routes={"order.place": route(handle, load=load)}))
    batch = [flow.message("order.place", {"order_ref": r, "reason": "x"})
             for r in ("x", "y", "bad")]
    await flow.deliver(batch)
    assert [m.outcome for m in batch] == ["acked", "acked", "dead"]
    # The batch's transaction loaded and rolled back; one by one, each handler reads alone.
    assert len(loads) == 1 and seen[0] == ("x", loads[0])
    assert {value for _, value in seen[1:]} == {None}
    assert [ref for ref, _ in seen[1:3]] == ["x", "y"]


# -- placement: the catalog, once per batch --------------------------------------------------

def _orders() -> list[dict[str, Any]]:
    """Orders that price differently: products, cycles, currencies (the default included),
    domains under different TLDs (co.uk, not uk), a transfer, a promotion."""
    return [
        order_body("p-starter"),
        order_body("p-business", promo_code="welcome10", items=[
            {"type": "product", "product": "business", "billing_cycle": "biennially",
             "domain": "biz.example"},
            {"type": "domain", "domain": "shop.co.uk", "action": "register", "years": 3}]),
        order_body("p-eur", currency="EUR", items=[
            {"type": "product", "product": "starter", "billing_cycle": "annually",
             "domain": "eur.example"},
            {"type": "domain", "domain": "eur.com", "action": "transfer", "years": 4}]),
        order_body("p-default", currency=None, items=[
            {"type": "domain", "domain": "www.default.net", "action": "register", "years": 1}]),
        order_body("p-welcome", promo_code="Welcome10"),
    ]


async def _priced(flow: InMemoryFlow, prefix: str) -> dict[str, tuple[Any, ...]]:
    rows = await flow.pool.fetch(
        "SELECT o.order_ref, o.currency, o.total, o.promo_code, i.subtotal, i.discount,"
        " ARRAY(SELECT ROW(l.kind, l.description, l.amount) FROM invoice_items l"
        "  WHERE l.invoice_id = i.id ORDER BY l.kind, l.description)::text AS lines,"
        " ARRAY(SELECT ROW(d.domain, d.tld, d.amount) FROM domains d WHERE d.order_id = o.id"
        "  ORDER BY d.id)::text AS domains"
        " FROM orders o JOIN invoices i ON i.order_id = o.id WHERE o.order_ref LIKE $1",
        prefix + "%")
    return {r["order_ref"].removeprefix(prefix): tuple(r)[1:] for r in rows}


async def test_a_batch_of_orders_is_priced_as_each_alone_with_one_catalog_read(
    flow: InMemoryFlow, monkeypatch: pytest.MonkeyPatch,
) -> None:
    flow.add(placement_worker(flow.settings))
    reads: list[int] = []
    read = pricing._read

    async def counting(conn: asyncpg.Connection, orders: list[Any]) -> pricing.Catalog:
        reads.append(len(orders))
        return await read(conn, orders)

    monkeypatch.setattr(pricing, "_read", counting)
    for body in _orders():  # one at a time: each reads its own catalog rows
        await flow.send("order.place", body | {"order_ref": "alone-" + body["order_ref"]})
    assert reads == [1] * 5
    reads.clear()
    batch = [flow.message("order.place", body | {"order_ref": "batch-" + body["order_ref"]})
             for body in _orders()]
    await flow.deliver(batch)
    assert [m.outcome for m in batch] == ["acked"] * 5
    assert reads == [5]  # one read for the batch
    alone, together = await _priced(flow, "alone-"), await _priced(flow, "batch-")
    assert len(alone) == 5 and together == alone
    assert alone["p-default"][0] == "USD" and alone["p-eur"][0] == "EUR"
    assert alone["p-welcome"][2] == "WELCOME10" and alone["p-business"][4] > 0  # discounted
    assert "co.uk" in alone["p-business"][6]


async def test_the_catalog_read_keeps_a_generic_plan_on_tables_never_analyzed(
    db_settings: Settings,
) -> None:
    """The catalog read is planned once for a connection, not for every batch, even where
    the catalog's tables have no statistics (a new database; autovacuum analyzes a table only
    after 50 of its rows changed, which a small catalog may never see; the bench's database):
    after PostgreSQL's five custom plans it runs its generic plan. Given its arrays as they
    are, the custom plans looked cheaper there and every execution was planned again (20
    custom plans of 20 in bench/sustained.py's conditions: 0.35 ms of backend CPU a read
    against 0.10; docs/performance.md)."""
    conn = await asyncpg.connect(db_settings.database_url)
    try:
        await db.init_connection(conn)
        assert await conn.fetchval(  # never analyzed, as in a new database
            "SELECT bool_and(reltuples < 0) FROM pg_class WHERE relname IN"
            " ('products', 'product_prices', 'tlds', 'tld_prices', 'promotions')")
        # The bench's orders: a product, no domain, no promotion (empty arrays, which a
        # custom plan sees as nothing to read).
        orders = [PlaceOrder.model_validate(order_body(f"g-{n}", items=[
            {"type": "product", "product": "starter", "billing_cycle": "monthly"}]))
            for n in range(3)]
        for n in range(8):  # one order or two, as batches at a steady rate are
            catalog = await pricing.read_catalog(conn, orders[:1 + n % 2])
            assert catalog.default_currency == "USD" and list(catalog.products) == ["starter"]
        plans = await conn.fetchrow("SELECT generic_plans, custom_plans FROM pg_prepared_statements"
                                    " WHERE statement = $1", pricing._CATALOG)
    finally:
        await conn.close()
    assert tuple(plans) == (3, 5)


async def test_an_order_the_catalog_refuses_is_refused_alone_in_a_batch(
    flow: InMemoryFlow,
) -> None:
    flow.add(placement_worker(flow.settings))
    refused = {
        "no-product": ({"items": [{"type": "product", "product": "platinum-unicorn",
                                   "billing_cycle": "monthly", "domain": "u.example"}]},
                       "unknown product 'platinum-unicorn'"),
        "no-price": ({"currency": "EUR", "items": [
            {"type": "product", "product": "business", "billing_cycle": "monthly",
             "domain": "b.example"}]}, "product 'business' has no monthly price in EUR"),
        "no-tld": ({"items": [{"type": "domain", "domain": "shop.org"}]},
                   "TLD of 'shop.org' is not sold"),
        "no-code": ({"promo_code": "nope"}, "unknown promotion code 'nope'"),
    }
    batch = [flow.message("order.place", order_body("ok-1"))]
    batch += [flow.message("order.place", order_body(ref, **body))
              for ref, (body, _) in refused.items()]
    batch.append(flow.message("order.place", order_body("ok-2", currency="EUR")))
    await flow.deliver(batch)
    assert [m.outcome for m in batch] == ["acked"] + ["dead"] * 4 + ["acked"]
    for message, (_, reason) in zip(batch[1:5], refused.values(), strict=True):
        assert reason in message.dead.reason
    assert sorted(r["order_ref"] for r in await flow.pool.fetch("SELECT order_ref FROM orders")) \
        == ["ok-1", "ok-2"]


# -- fraud: the facts, once per batch --------------------------------------------------------

async def _place(flow: InMemoryFlow, *bodies: dict[str, Any]) -> list[Published]:
    """Place the orders (one placement batch) and return their order.placed events, not yet
    delivered to fraud."""
    batch = [flow.message("order.place", body) for body in bodies]
    await flow.deliver(batch, to="placement")
    assert [m.outcome for m in batch] == ["acked"] * len(bodies)
    return [e for e in await flow.drain() if e.routing_key == "order.placed"]


async def _screen(flow: InMemoryFlow, events: list[Published]) -> None:
    """The order.placed events as one delivery to fraud: one transaction for all."""
    batch = [flow.as_delivery(e) for e in events]
    await flow.deliver(batch, to="fraud")
    assert [m.outcome for m in batch] == ["acked"] * len(events)
    await flow.drain()


async def _checks(flow: InMemoryFlow) -> dict[str, tuple[str, str, list[str]]]:
    rows = await flow.pool.fetch(
        "SELECT o.order_ref, o.status, c.result, c.reasons FROM fraud_checks c"
        " JOIN orders o ON o.id = c.order_id ORDER BY c.id")
    return {r["order_ref"]: (r["status"], r["result"], [x["code"] for x in r["reasons"]])
            for r in rows}


@pytest.fixture
def shop(flow: InMemoryFlow) -> InMemoryFlow:
    return flow.add(placement_worker(flow.settings), fraud_worker(flow.settings))


async def test_orders_of_different_clients_in_one_batch_each_get_their_own_facts(
    shop: InMemoryFlow,
) -> None:
    # Client A has an earlier Fraud order (a banned IP).
    await _screen(shop, await _place(shop, order_body(
        "a-1", client={"email": "a@shop.example"}, ip_address="192.0.2.66")))
    events = await _place(
        shop,
        order_body("b-1", client={"email": "b@shop.example"}, ip_address="203.0.113.20"),
        order_body("a-2", client={"email": "a@shop.example"}, ip_address="203.0.113.21"),
        order_body("c-1", client={"email": "c@banned.example"}, ip_address="203.0.113.22"),
        order_body("d-1", client={"email": "d@gmail.com"}, ip_address="203.0.113.23"),
    )
    await _screen(shop, events)
    checks = await _checks(shop)
    assert checks["a-1"] == ("Fraud", "failed", ["banned_ip"])
    assert checks["b-1"] == ("Pending", "passed", [])
    assert checks["a-2"] == ("Fraud", "failed", ["earlier_fraud"])  # its own client's past
    assert checks["c-1"] == ("Fraud", "failed", ["banned_email_domain"])
    assert checks["d-1"] == ("Pending", "passed", ["free_email_new_client"])
    screened = {e["order_ref"] for e in shop.events("order.screened")}
    assert screened == {"b-1", "d-1"}


async def test_a_later_order_of_a_client_in_the_batch_sees_what_the_earlier_one_was_given(
    shop: InMemoryFlow,
) -> None:
    """The first order of the client is made Fraud in the batch's transaction; the second,
    screened after it in that transaction, counts it (as two transactions would have): a
    read shared before the first screening wrote would have let it through."""
    client = {"email": "twice@shop.example"}
    events = await _place(shop, order_body("t-1", client=client, ip_address="192.0.2.66"),
                          order_body("t-2", client=client, ip_address="203.0.113.30"))
    await _screen(shop, events)
    checks = await _checks(shop)
    assert checks == {"t-1": ("Fraud", "failed", ["banned_ip"]),
                      "t-2": ("Fraud", "failed", ["earlier_fraud"])}


async def test_an_order_twice_in_one_batch_is_screened_once(shop: InMemoryFlow) -> None:
    [placed] = await _place(shop, order_body("dup-1"))
    redrive = shop.message("fraud.redrive", placed.body)  # the sweeper's, another message id
    batch = [shop.as_delivery(placed), redrive]
    await shop.deliver(batch, to="fraud")
    assert [m.outcome for m in batch] == ["acked", "acked"]
    await shop.drain()
    assert await shop.pool.fetchval("SELECT count(*) FROM fraud_checks") == 1
    assert len(shop.events("order.screened")) == 1


async def test_a_rule_set_loaded_between_batches_applies_to_the_next_batch(
    shop: InMemoryFlow,
) -> None:
    async def load(toml: str) -> int:
        async with shop.pool.acquire() as conn:
            return await store(conn, parse_toml(toml), source="t.toml", loaded_by="test")

    review = await load('[[rules]]\nname = "watch"\naction = "review"\n'
                        'when = { client_country = ["GB"] }\n')
    await _screen(shop, await _place(shop, order_body("r-1"), order_body("r-2")))
    # Loaded (committed) after that batch and before the next one began: the next batch is
    # screened under it, though the worker's rule store holds the previous set.
    fraud = await load('[[rules]]\nname = "stop"\naction = "fraud"\n'
                       'when = { client_country = ["GB"] }\n')
    await _screen(shop, await _place(shop, order_body("r-3"), order_body("r-4")))
    rows = await shop.pool.fetch(
        "SELECT o.order_ref, o.status, c.rule_set_id, c.rule_matches FROM fraud_checks c"
        " JOIN orders o ON o.id = c.order_id ORDER BY o.order_ref")
    assert [(r["order_ref"], r["status"], r["rule_set_id"], [m["name"] for m in r["rule_matches"]])
            for r in rows] == [
        ("r-1", "Pending", review, ["watch"]), ("r-2", "Pending", review, ["watch"]),
        ("r-3", "Fraud", fraud, ["stop"]), ("r-4", "Fraud", fraud, ["stop"])]


async def test_a_batchs_orders_are_locked_by_their_screening_transaction(
    shop: InMemoryFlow,
) -> None:
    """The batch's read locks its orders (FOR UPDATE, as each handler's own read did): an
    operator's change waits for the screening to commit, and is not overwritten by it."""
    events = await _place(shop, order_body("lk-1"), order_body("lk-2"))
    ids = [e.body["order_id"] for e in events]
    screener = shop.pipelines["fraud"].spec.routes["order.placed"].load
    assert screener is not None
    async with shop.pool.acquire() as conn, conn.transaction():
        loaded = await screener([_placed(e) for e in events], conn)
        assert [f[0]["id"] for f in loaded] == ids  # type: ignore[index]
        async with shop.pool.acquire() as other:
            with pytest.raises(asyncpg.LockNotAvailableError):
                await other.execute("SET lock_timeout = '100ms'; SELECT 1 FROM orders"
                                    f" WHERE id = {ids[1]} FOR UPDATE")


def _placed(event: Published) -> OrderPlaced:
    return OrderPlaced.model_validate(event.body)
