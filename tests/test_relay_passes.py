"""The outbox relay's passes at a steady stream: one statement to claim and mark a pass's rows,
and the events committed while a pass waits for its confirms going out together in the next
pass, not a pass each (issue 15, target 2: 1.2 passes an order at a steady rate, 0.24 in a
burst). Real PostgreSQL and RabbitMQ; the broker's confirm is held back by a gate."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from test_webhook_fanout import Statements

from conftest import Harness, eventually
from shared import broker
from shared.outbox import OutboxRelay
from shared.uow import event_id, write_event

KEY = "relay.pass.event"


async def _write(harness: Harness, n: int) -> None:
    async with harness.pool.acquire() as conn:  # outside a unit of work: its commit notifies
        await write_event(conn, KEY, {"n": n}, message_id=event_id("pass", n),
                          correlation_id=None)


async def _unpublished(harness: Harness) -> list[int]:
    return [r["n"] for r in await harness.pool.fetch(
        "SELECT (body ->> 'n')::int AS n FROM outbox WHERE published_at IS NULL ORDER BY id")]


def _relay(harness: Harness, **update: Any) -> OutboxRelay:
    settings = harness.settings.model_copy(update={"relay_sweep_seconds": 30.0, **update})
    return OutboxRelay(harness.pool, harness.exchange, settings.database_url, settings.relay)


class Passes:
    """The relay's passes: how many rows each that found some published or marked, and how
    many found nothing."""

    def __init__(self, relay: OutboxRelay) -> None:
        self.handled: list[int] = []
        self.empty = 0
        self.ran = asyncio.Event()  # a first pass has run: the relay is listening
        drain = relay.drain_once

        async def counted() -> int:
            handled = await drain()
            if handled:
                self.handled.append(handled)
            else:
                self.empty += 1
            self.ran.set()
            return handled
        relay.drain_once = counted  # type: ignore[method-assign]


class Gate:
    """The broker's confirm of event 1 waits until the gate opens (a slow quorum write);
    `entered` says the pass holding it has got there."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.open, self.entered = asyncio.Event(), asyncio.Event()
        real = broker.publish_queued

        async def gated(exchange: Any, routing_key: str, message: Any) -> None:
            if message.message_id == str(event_id("pass", 1)):
                self.entered.set()
                await self.open.wait()
            await real(exchange, routing_key, message)
        monkeypatch.setattr(broker, "publish_queued", gated)


@asynccontextmanager
async def _gated_relay(harness: Harness, monkeypatch: pytest.MonkeyPatch,
                       linger_ms: float) -> AsyncIterator[tuple[Gate, Passes]]:
    """The relay's loop, event 1's confirm held by a gate, once its first pass (at start,
    before any event) has run: its LISTEN is in place by then. Stopped at the end."""
    gate = Gate(monkeypatch)
    relay = _relay(harness, relay_linger_ms=0, worker_linger_ms=linger_ms)
    passes = Passes(relay)
    stop = asyncio.Event()
    running = asyncio.create_task(relay.run(stop))
    try:
        await asyncio.wait_for(passes.ran.wait(), 10)
        yield gate, passes
    finally:
        gate.open.set()
        stop.set()
        await running


async def test_a_pass_claims_and_marks_its_rows_in_one_statement(harness: Harness) -> None:
    store = await harness.listen(KEY)
    for n in range(5):
        await _write(harness, n)
    statements = Statements()
    await statements.watch(harness.pool)  # every connection of the pool: the pass takes any
    relay = _relay(harness)
    assert await relay.drain_once() == 5
    await store.wait_for(KEY, lambda b: b["n"] == 4)
    assert [b["n"] for b in store.bodies(KEY)] == [0, 1, 2, 3, 4]  # oldest first
    assert await _unpublished(harness) == []
    seen = statements.seen
    between = seen[seen.index("BEGIN;") + 1:seen.index("COMMIT;")]
    assert len(between) == 1, between  # before: the claim, then the mark


async def test_what_the_broker_did_not_take_is_left_for_a_later_pass(
        harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rows are marked when claimed; the ones whose publish failed are unmarked again."""
    await harness.listen(KEY)
    real = broker.publish_queued

    async def refusing(exchange: Any, routing_key: str, message: Any) -> None:
        if message.message_id == str(event_id("pass", 2)):
            raise ConnectionError("channel closed")
        await real(exchange, routing_key, message)
    monkeypatch.setattr(broker, "publish_queued", refusing)
    for n in range(4):
        await _write(harness, n)
    relay = _relay(harness)
    assert await relay.drain_once() == 3
    assert relay.last_failed == 1
    assert await _unpublished(harness) == [2]
    monkeypatch.setattr(broker, "publish_queued", real)
    assert await relay.drain_once() == 1
    assert await _unpublished(harness) == []


async def test_events_committed_while_a_pass_waits_for_its_confirms_go_out_together(
        harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    store = await harness.listen(KEY)
    async with _gated_relay(harness, monkeypatch, 1000) as (gate, passes):
        empty = passes.empty
        await _write(harness, 1)
        await asyncio.wait_for(gate.entered.wait(), 10)  # a pass holds event 1
        for n in (2, 3, 4):
            await _write(harness, n)
            await asyncio.sleep(0.05)  # each commit heard on its own
        assert passes.handled == []  # before: a pass for each of 2, 3 and 4
        gate.open.set()
        await store.wait_for(KEY, lambda b: b["n"] == 4, timeout=10)
        await eventually(lambda: asyncio.sleep(0, len(passes.handled) == 2), timeout=10)
        assert passes.handled == [1, 3]
        assert passes.empty == empty  # the wake-ups answered by the pass that took 2 to 4


async def test_the_next_pass_waits_for_one_in_flight_no_longer_than_its_linger(
        harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    store = await harness.listen(KEY)
    loop = asyncio.get_running_loop()
    async with _gated_relay(harness, monkeypatch, 300) as (gate, passes):
        await _write(harness, 1)
        await asyncio.wait_for(gate.entered.wait(), 10)
        written = loop.time()
        await _write(harness, 2)
        # Event 1's confirm is still held: event 2 goes out once the linger (0.3 s) is over.
        await store.wait_for(KEY, lambda b: b["n"] == 2, timeout=10)
        assert loop.time() - written < 3  # not held until the gate opens
        await eventually(lambda: asyncio.sleep(0, passes.handled == [1]), timeout=10)
        assert await _unpublished(harness) == [1]  # its pass has not committed
        gate.open.set()
        await eventually(lambda: asyncio.sleep(0, len(passes.handled) == 2), timeout=10)
        assert await _unpublished(harness) == []
