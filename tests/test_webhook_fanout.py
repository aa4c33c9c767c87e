"""The webhooks worker's fan-out is set-based: a batch of events (as the runtime hands one
under load) becomes every subscribed endpoint's deliveries in one INSERT ... SELECT, counted
here statement by statement on a real database; subscriptions are read in that statement
(and once before the batch's transaction, which a batch nothing subscribes to does not
get), so an endpoint added or disabled a moment ago counts at once; the webhook-ids computed by
PostgreSQL are those `webhook_id_for` gives. And the unit of work's deferred writes, which
the handler uses: one call per writer for the whole transaction, before the events."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import asyncpg

from conftest import order_body
from services.fraud.worker import worker as fraud_worker
from services.placement.worker import worker as placement_worker
from services.webhooks.outbound import webhook_id_for
from services.webhooks.sealing import Sealer
from services.webhooks.worker import worker as webhooks_worker
from shared.runtime.testing import InMemoryFlow
from shared.uow import MessageContext, UnitOfWork, flush_events


async def add(pool: asyncpg.Pool, events: list[str], status: str = "active") -> int:
    return await pool.fetchval(
        "INSERT INTO webhook_endpoints (url, events, secret, status) VALUES ($1, $2, $3, $4)"
        " RETURNING id", "http://127.0.0.1:9/hook", events, Sealer().seal("whsec_x"), status)


# asyncpg reads a type it has not met yet once per connection (jit off, the type tree, jit
# back): not Ordermill's statements, and not one per batch.
INTROSPECTION = ("SELECT current_setting('jit')", "WITH RECURSIVE typeinfo_tree",
                 "SELECT set_config('jit'")


class Statements:
    """Every statement sent on the pool's connections (all of them opened first)."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def log(self, query: Any) -> None:
        text = " ".join(query.query.split())
        if not text.startswith(INTROSPECTION):
            self.seen.append(text)

    async def watch(self, pool: asyncpg.Pool) -> None:
        held = [await pool.acquire() for _ in range(pool.get_max_size())]
        for conn in held:
            conn.add_query_logger(self.log)
        for conn in held:
            await pool.release(conn)

    def count(self, fragment: str) -> int:
        return sum(fragment in q for q in self.seen)


async def _events_of_orders(flow: InMemoryFlow, prefix: str, n: int) -> list[Any]:
    """`n` orders placed and screened; the events they published that the webhooks worker
    (added now) takes."""
    s = flow.settings
    flow.add(placement_worker(s), fraud_worker(s))
    for i in range(n):
        await flow.send("order.place", order_body(f"{prefix}-{i}"))
    events = await flow.run()
    flow.add(webhooks_worker(s))
    return [e for e in events if flow.routed(e.routing_key)]


async def test_a_batch_of_events_is_fanned_out_in_one_statement(flow: InMemoryFlow) -> None:
    pool = flow.pool
    taken = await _events_of_orders(flow, "fan", 3)
    assert {e.routing_key for e in taken} == {"order.placed", "order.screened"} and len(taken) == 6

    everything = await add(pool, ["*"])
    placed = await add(pool, ["order.placed"])
    await add(pool, ["*"], status="disabled")
    statements = Statements()
    await statements.watch(pool)
    batch = [flow.as_delivery(e) for e in taken]
    await flow.deliver(batch, to="webhooks")

    assert [m.outcome for m in batch] == ["acked"] * len(batch)
    # The subscriptions read once for the batch (which events have one), then one
    # transaction: one INSERT for every delivery of the six events, and no inbox row
    # (WorkerSpec.inbox=False: the webhook-ids make a redelivery write nothing twice).
    assert statements.count("INSERT INTO webhook_deliveries") == 1
    assert statements.count("webhook_endpoints") == 2  # the batch's read; inside that INSERT
    assert statements.count("INSERT INTO inbox") == 0 and statements.count("BEGIN") == 1
    assert len(statements.seen) == 4, statements.seen  # read, BEGIN, deliveries, COMMIT
    rows = await pool.fetch("SELECT endpoint_id, event_id, event_type, webhook_id, body"
                            " FROM webhook_deliveries ORDER BY id")
    expected = [(e.message_id, endpoint) for e in taken for endpoint in (everything, placed)
                if endpoint == everything or e.routing_key == "order.placed"]
    assert [(r["event_id"], r["endpoint_id"]) for r in rows] == expected  # events' order
    by_id = {e.message_id: e for e in taken}
    for r in rows:
        assert r["webhook_id"] == webhook_id_for(r["event_id"], r["endpoint_id"])
        body = json.loads(r["body"])
        assert (body["type"], body["data"]) == (r["event_type"], by_id[r["event_id"]].body)

    # An endpoint added now gets the next events at once (nothing cached to wait out), and
    # the same events delivered again (a redelivery) write nothing twice.
    before = await pool.fetchval("SELECT max(id) FROM webhook_deliveries")
    late = await add(pool, ["order.screened"])
    await flow.deliver([flow.as_delivery(e) for e in taken], to="webhooks")
    new = await pool.fetch("SELECT endpoint_id, event_type FROM webhook_deliveries"
                           " WHERE id > $1", before)
    assert sorted((r["endpoint_id"], r["event_type"]) for r in new) == [
        (late, "order.screened")] * 3


async def test_with_no_endpoint_subscribed_the_webhooks_worker_writes_nothing(
    flow: InMemoryFlow,
) -> None:
    """Most providers subscribe no endpoint: then a batch of events costs the webhooks
    worker one read of the subscriptions and no transaction at all (no BEGIN, no inbox row,
    no delivery), and its events are acked; delivered twice, still none. An endpoint
    subscribed to one key leaves the others' batches so too."""
    pool = flow.pool
    taken = await _events_of_orders(flow, "none", 2)
    assert len(taken) == 4
    await add(pool, ["*"], status="disabled")  # one endpoint, disabled: none to deliver to
    await add(pool, ["invoice.paid"])  # one about another event
    statements = Statements()
    await statements.watch(pool)
    for _ in range(2):
        batch = [flow.as_delivery(e) for e in taken]
        await flow.deliver(batch, to="webhooks")
        assert [m.outcome for m in batch] == ["acked"] * len(batch)
    assert len(statements.seen) == 2 and statements.count("FROM webhook_endpoints") == 2, \
        statements.seen  # one read a batch, nothing else
    assert await pool.fetchval("SELECT count(*) FROM webhook_deliveries") == 0
    assert await pool.fetchval("SELECT count(*) FROM inbox WHERE consumer = 'webhooks'") == 0


async def test_an_endpoint_subscribed_while_running_gets_the_very_next_event(
    flow: InMemoryFlow,
) -> None:
    """The worker, having taken events with nothing subscribed, gets an endpoint: the very
    next event is delivered to it (read before each batch: nothing cached to wait out)."""
    pool = flow.pool
    taken = await _events_of_orders(flow, "next", 2)
    first, *rest = [e for e in taken if e.routing_key == "order.placed"]
    await flow.deliver([flow.as_delivery(first)], to="webhooks")
    endpoint = await add(pool, ["order.placed"])
    await flow.deliver([flow.as_delivery(e) for e in rest], to="webhooks")
    rows = await pool.fetch("SELECT endpoint_id, event_id FROM webhook_deliveries")
    assert [(r["endpoint_id"], r["event_id"]) for r in rows] == [
        (endpoint, e.message_id) for e in rest]


async def test_deferred_writes_are_one_call_per_writer_before_the_events(
    flow: InMemoryFlow,
) -> None:
    calls: list[tuple[str, list[Any]]] = []

    async def first(conn: asyncpg.Connection, items: Any) -> None:
        calls.append(("first", list(items)))
        assert await conn.fetchval("SELECT count(*) FROM outbox") == 0  # events come after

    async def second(conn: asyncpg.Connection, items: Any) -> None:
        calls.append(("second", list(items)))

    async with flow.pool.acquire() as conn, conn.transaction():
        uows = []
        for n in range(3):
            uow = UnitOfWork(conn, MessageContext(consumer="c", message_id=f"m{n}",
                                                  routing_key="k", received_at=datetime.now(UTC)))
            uow.defer(first, n)
            if n != 1:
                uow.defer(second, f"s{n}")
            uow.emit("x.y", {"n": n})
            uows.append(uow)
        await flush_events(conn, uows)
        await flush_events(conn, uows)  # taken: nothing deferred is written twice
    assert calls == [("first", [0, 1, 2]), ("second", ["s0", "s2"])]
    assert await flow.pool.fetchval("SELECT count(*) FROM outbox") == 3
