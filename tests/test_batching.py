"""Group commit in the runtime (issue 15, target 2): a worker batches what waits while it is
busy and stays prompt when idle; a batch keeps each message's effects atomic with its inbox
row, and a poison message in a batch fails alone (the others committed, it dead-lettered)."""

from __future__ import annotations

import asyncio
from typing import Any

from conftest import Harness, eventually, order_body
from services.fraud.worker import worker as fraud_worker
from services.placement.worker import worker as placement_worker
from shared.runtime import REASON_HEADER, Middleware, Runtime
from shared.runtime.batching import Busy, InFlight, batcher, take_batch
from shared.runtime.testing import InMemoryFlow, MemoryMessage, MemoryTransport
from shared.settings import Settings

LONG = 60.0  # a linger no test could wait out: a test that waited for it would time out


def poisoned(ref: str) -> dict[str, Any]:
    """Valid on the wire, refused by the handler (no such product): fails inside the batch's
    transaction, not at intake."""
    body = order_body(ref)
    body["items"][0]["product"] = "no-such-product"
    return body


async def test_an_idle_worker_takes_a_lone_message_at_once() -> None:
    waiting: asyncio.Queue[str] = asyncio.Queue()
    waiting.put_nowait("only")
    batch = await asyncio.wait_for(
        take_batch(waiting, 16, 0.0, busy=Busy(), busy_linger=LONG), timeout=5)  # type: ignore[arg-type]
    assert batch == ["only"]


async def test_a_busy_worker_gathers_what_arrives_into_one_batch() -> None:
    waiting: asyncio.Queue[str] = asyncio.Queue()
    waiting.put_nowait("first")

    async def arrive() -> None:
        for name in ("second", "third"):
            await asyncio.sleep(0.01)
            waiting.put_nowait(name)

    arriving = asyncio.create_task(arrive())
    batch = await asyncio.wait_for(  # full at three: no waiting out the linger
        take_batch(waiting, 3, 0.0, busy=Busy(handling=1), busy_linger=LONG), timeout=5)  # type: ignore[arg-type]
    await arriving
    assert batch == ["first", "second", "third"]


async def test_a_lingering_batch_starts_as_soon_as_the_worker_falls_idle() -> None:
    """Lingering is for company while another batch is in hand: when that batch ends, what has
    been gathered starts at once instead of waiting out the rest of the linger."""
    waiting: asyncio.Queue[str] = asyncio.Queue()
    waiting.put_nowait("alone")
    busy = Busy()
    busy.start()  # another batch of the worker is in hand

    async def finish_the_other_batch() -> None:
        await asyncio.sleep(0.05)
        busy.done()

    finishing = asyncio.create_task(finish_the_other_batch())
    batch = await asyncio.wait_for(
        take_batch(waiting, 16, 0.0, busy=busy, busy_linger=LONG), timeout=5)  # type: ignore[arg-type]
    await finishing
    assert batch == ["alone"]
    waiting.put_nowait("next")  # the queue still hands out what arrives after
    assert await asyncio.wait_for(waiting.get(), timeout=1) == "next"


async def test_batchers_take_turns_so_what_arrives_while_busy_shares_one_batch() -> None:
    """Three batchers: the first takes a message alone (idle) and holds it; what arrives
    meanwhile goes to one of the others as one batch, not a message to each."""
    waiting: asyncio.Queue[str] = asyncio.Queue()
    batches: list[list[str]] = []
    release = asyncio.Event()
    in_flight, busy = InFlight(), Busy()

    async def handle(batch: list[str]) -> None:
        batches.append(batch)
        if batch == ["a"]:
            await release.wait()

    async def nothing(batch: list[Any]) -> None:
        return None

    tasks = [asyncio.create_task(batcher(
        "test", waiting, limit=3, linger=0.0, handle=handle, requeue=nothing,  # type: ignore[arg-type]
        in_flight=in_flight, busy=busy, busy_linger=LONG)) for _ in range(3)]
    try:
        for name in "abcd":
            in_flight.enter()
            waiting.put_nowait(name)
            await asyncio.sleep(0.01)
        async def two() -> bool:
            return len(batches) == 2

        await eventually(two, timeout=5)
        assert batches == [["a"], ["b", "c", "d"]]
        release.set()
        await asyncio.wait_for(in_flight.idle.wait(), timeout=5)
    finally:
        for task in tasks:
            task.cancel()


def _flowing(gap: float) -> Busy:
    """A worker whose last messages arrived `gap` seconds apart, the last one just now."""
    busy = Busy()
    now = asyncio.get_running_loop().time()
    for n in (3, 2, 1, 0):
        busy.arrived(now - n * gap, LONG)
    return busy


async def test_a_flowing_idle_worker_waits_for_the_next_message() -> None:
    """Messages a steady half second apart: an idle worker's batch waits for the one due
    next instead of starting alone (busy alone would not have made it wait)."""
    waiting: asyncio.Queue[str] = asyncio.Queue()
    waiting.put_nowait("first")
    busy = _flowing(0.5)
    assert busy.flowing(LONG) and not busy

    async def arrive() -> None:
        await asyncio.sleep(0.1)
        waiting.put_nowait("second")

    arriving = asyncio.create_task(arrive())
    batch = await asyncio.wait_for(
        take_batch(waiting, 2, 0.0, busy=busy, busy_linger=LONG), timeout=5)  # type: ignore[arg-type]
    await arriving
    assert batch == ["first", "second"]


async def test_messages_further_apart_than_the_flow_gap_are_not_a_flow_whatever_the_linger(
) -> None:
    """The flow's threshold is its own (WORKER_FLOW_GAP_MS), not the busy linger: messages
    half a second apart with a threshold of a quarter second are no flow, so an idle worker
    starts its lone message at once, however long it would linger while busy; the same
    messages under a threshold of a second are a flow, and it waits for the next."""
    for flow_gap, waits in ((0.25, False), (1.0, True)):
        waiting: asyncio.Queue[str] = asyncio.Queue()
        waiting.put_nowait("first")
        busy = _flowing(0.5)

        async def arrive(queue: asyncio.Queue[str] = waiting) -> None:
            await asyncio.sleep(0.1)
            queue.put_nowait("second")

        arriving = asyncio.create_task(arrive())
        batch = await asyncio.wait_for(
            take_batch(waiting, 2, 0.0, busy=busy, busy_linger=LONG,  # type: ignore[arg-type]
                       flow_gap=flow_gap), timeout=5)
        await arriving
        assert batch == (["first", "second"] if waits else ["first"]), flow_gap


async def test_with_the_shipped_pair_a_pause_ends_a_flow_judged_by_the_flow_gap() -> None:
    """WORKER_FLOW_GAP_MS 25 beside WORKER_LINGER_MS 40 (as `Runtime._consume` passes them):
    a pause of 0.2 s (counted as four flow gaps) after a 10 ms flow leaves an average gap
    between the two, no flow by the flow gap (a flow by the linger), so the next lone
    message starts at once instead of waiting for the one due."""
    settings = Settings()
    gap, linger = settings.worker_flow_gap_ms / 1000, settings.worker_linger_ms / 1000
    assert gap < linger
    busy = Busy()
    now = asyncio.get_running_loop().time()
    for n in range(8):
        busy.arrived(now - 0.27 + n * 0.01, gap)  # a 10 ms flow that ended 0.2 s ago
    assert busy.flowing(gap)
    busy.arrived(now, gap)
    assert not busy.flowing(gap) and busy.flowing(linger)
    waiting: asyncio.Queue[str] = asyncio.Queue()
    waiting.put_nowait("lone")

    async def arrive() -> None:
        await asyncio.sleep(linger / 2)  # a message that waiting would have caught
        waiting.put_nowait("later")

    arriving = asyncio.create_task(arrive())
    batch = await asyncio.wait_for(take_batch(  # type: ignore[arg-type]
        waiting, 2, 0.0, busy=busy, busy_linger=linger, flow_gap=gap), timeout=5)
    await arriving
    assert batch == ["lone"]


async def test_a_flow_that_stops_lets_its_batch_start_when_the_next_is_overdue() -> None:
    """The wait lasts while a message is due (twice the average gap), not the whole linger."""
    waiting: asyncio.Queue[str] = asyncio.Queue()
    waiting.put_nowait("last")
    busy = _flowing(0.2)
    loop = asyncio.get_running_loop()
    started = loop.time()
    batch = await asyncio.wait_for(
        take_batch(waiting, 16, 0.0, busy=busy, busy_linger=LONG), timeout=5)  # type: ignore[arg-type]
    assert batch == ["last"]
    assert 0.3 <= loop.time() - started < 5  # waited for the one due (0.4 s), then started


def test_one_long_pause_ends_a_flow_and_no_linger_never_flows() -> None:
    busy = Busy()
    for t in range(6):
        busy.arrived(t * 0.01, 1.0)
    assert busy.flowing(1.0)
    busy.arrived(100.0, 1.0)  # counted as four lingers: the average goes over one
    assert not busy.flowing(1.0)
    steady = Busy()
    for t in range(6):
        steady.arrived(t * 0.01, 0.0)
    assert not steady.flowing(0.0)


async def test_an_idle_worker_whose_messages_came_long_ago_starts_at_once() -> None:
    """A stream that flowed (messages 5 ms apart) and stopped: the next message, long after,
    ends the flow as it arrives, and starts at once instead of waiting for company."""
    waiting: asyncio.Queue[str] = asyncio.Queue()
    waiting.put_nowait("lone")
    linger = 2.0
    busy = Busy()
    loop = asyncio.get_running_loop()
    now = loop.time()
    for n in range(8):
        busy.arrived(now - 10 + n * 0.005, linger)
    assert busy.flowing(linger)
    busy.arrived(now, linger)  # the lone message, ten seconds after the stream
    assert not busy.flowing(linger)
    started = loop.time()
    batch = await asyncio.wait_for(
        take_batch(waiting, 16, 0.0, busy=busy, busy_linger=linger), timeout=5)  # type: ignore[arg-type]
    assert batch == ["lone"]
    assert loop.time() - started < linger / 2  # not held for the linger (2 s)


async def test_a_poison_message_in_a_batch_fails_alone_in_the_harness(flow: InMemoryFlow) -> None:
    flow.add(placement_worker(flow.settings))
    messages = [flow.message("order.place", order_body("batch-1")),
                flow.message("order.place", poisoned("batch-poison")),
                flow.message("order.place", order_body("batch-2"))]
    await flow.deliver(messages)  # one delivery: a batch, as a busy worker takes it
    placed = await flow.pool.fetch("SELECT order_ref FROM orders ORDER BY order_ref")
    assert [r["order_ref"] for r in placed] == ["batch-1", "batch-2"]
    [dead] = flow.dead("placement")
    assert flow.body_of(dead)["order_ref"] == "batch-poison"
    assert "no-such-product" in dead.reason
    # Each good message's effects are committed with its inbox row; the poison has none.
    handled = {r["message_id"] for r in await flow.pool.fetch(
        "SELECT message_id FROM inbox WHERE consumer = 'placement'")}
    assert handled == {messages[0].message_id, messages[2].message_id}
    assert all(m.processed for m in messages)  # every delivery settled: acked or dead-lettered


class _SlowFirst(Middleware):
    """Holds the first delivery a while, so the worker is busy when the next ones arrive."""

    def __init__(self) -> None:
        self.first = True

    async def __call__(self, batch: Any, call_next: Any) -> None:
        if self.first:
            self.first = False
            await asyncio.sleep(0.5)
        await call_next(batch)


async def test_group_commit_on_the_broker_poison_alone_and_idle_prompt(harness: Harness) -> None:
    """On RabbitMQ, with a linger no test could wait out: a lone order on an idle worker is
    screened promptly; orders arriving while it is busy share a batch, and the poison among
    them is dead-lettered while the others are placed."""
    s = harness.settings.model_copy(update={"worker_linger_ms": LONG * 1000, "worker_batch": 3,
                                           "worker_concurrency": 2})
    runtime = Runtime(s, middleware=[_SlowFirst()])
    ready = asyncio.Event()
    task = asyncio.create_task(runtime.serve([placement_worker(s), fraud_worker(s)], ready=ready))
    await asyncio.wait_for(ready.wait(), timeout=30)
    try:
        await harness.publish("order.place", order_body("idle-1"))
        await harness.screened("idle-1", timeout=15)  # not held for the 60 s linger
        for ref in ("busy-1", "busy-2"):
            await harness.publish("order.place", order_body(ref))
        await harness.publish("order.place", poisoned("busy-poison"))
        await harness.publish("order.place", order_body("busy-3"))
        for ref in ("busy-1", "busy-2", "busy-3"):
            await harness.screened(ref, timeout=15)
        dead = await eventually(lambda: _dead(harness), timeout=15)
        assert len(dead) == 1 and b"busy-poison" in dead[0].body
        assert "no-such-product" in str(dead[0].headers[REASON_HEADER])
        assert await harness.order("busy-poison") is None
    finally:
        runtime.stop()
        await asyncio.wait_for(task, timeout=30)


async def _dead(harness: Harness) -> list[Any] | None:
    return await harness.dead_letters("placement") or None


class _AcksHeldUntilAllStarted(MemoryTransport):
    """An ack that does not finish until every ack of the batch has started: a pipeline that
    acks one after another never gets past the first."""

    def __init__(self, expected: int) -> None:
        super().__init__()
        self.expected, self.started = expected, 0
        self.all_started = asyncio.Event()

    async def ack(self, message: MemoryMessage) -> None:
        self.started += 1
        if self.started >= self.expected:
            self.all_started.set()
        await self.all_started.wait()
        await message.ack()


async def test_a_committed_batch_is_acked_together_not_one_by_one(flow: InMemoryFlow) -> None:
    """Each ack waits for its frame to be written: one after another, a batch paid a few
    turns of a busy event loop per message before the batcher could take the next one."""
    flow.transport = _AcksHeldUntilAllStarted(expected=4)
    flow.add(placement_worker(flow.settings))
    messages = [flow.message("order.place", order_body(f"acks-{n}")) for n in range(4)]
    await asyncio.wait_for(flow.deliver(messages), timeout=30)
    assert flow.transport.started == 4
    assert all(m.processed and m.outcome == "acked" for m in messages)
    assert await flow.pool.fetchval("SELECT count(*) FROM orders") == 4


async def test_a_steady_stream_to_an_idle_worker_shares_transactions(harness: Harness) -> None:
    """On RabbitMQ: orders published a steady 0.3 s apart to a placement worker that handles
    each in far less, with a 2 s linger and a 2 s flow gap (0.3 s apart is a flow). Idle
    between them, the worker used to give each its own transaction; flowing, it waits for the
    next: later orders share one (same xmin)."""
    s = harness.settings.model_copy(update={"worker_linger_ms": 2000.0, "worker_batch": 2,
                                           "worker_flow_gap_ms": 2000.0,
                                           "worker_concurrency": 1})
    runtime = Runtime(s)
    ready = asyncio.Event()
    task = asyncio.create_task(runtime.serve([placement_worker(s)], ready=ready))
    await asyncio.wait_for(ready.wait(), timeout=30)
    refs = [f"flow-{n}" for n in range(5)]
    try:
        for ref in refs:
            await harness.publish("order.place", order_body(ref))
            await asyncio.sleep(0.3)

        async def placed() -> list[Any] | None:
            rows = await harness.pool.fetch(
                "SELECT order_ref, xmin::text AS tx FROM orders WHERE order_ref = ANY($1)", refs)
            return rows if len(rows) == len(refs) else None

        rows = await eventually(placed, timeout=15)
        transactions = {r["tx"] for r in rows}
        # The first alone (no pace known yet), then two by two: three transactions.
        assert len(transactions) <= 3, rows
    finally:
        runtime.stop()
        await asyncio.wait_for(task, timeout=30)
