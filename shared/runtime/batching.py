"""Batching under load: a batcher takes what has arrived, up to a batch (one message when
idle, many under load), and hands it to the pipeline; in-flight deliveries are counted so a
stop can wait for them.

Group commit: while another batch of the same worker is being handled (the worker is busy),
a batcher that has taken a message waits up to `busy_linger` for more to join it before it
starts, so a steady stream shares transactions (one commit, one outbox insert and NOTIFY,
one relay pass for several messages) instead of paying for one each. With nothing else in
flight (idle) it starts at once: a lone message is never held for a timer.

A quick worker at a steady rate is idle between its messages most of the time, so "busy"
alone leaves each message its own transaction just when the stream is steady (issue 15,
target 2: a steady rate cost PostgreSQL 1.7 times a burst's CPU an order). So a worker also
lingers while its messages *flow*: `Busy` keeps a moving average of the gaps between their
arrivals, and while that average is under `flow_gap` (WORKER_FLOW_GAP_MS) a batcher that has
taken a message waits for the next, idle or not, as long as one is due (twice the average
gap) and up to `busy_linger` in all. A worker whose messages come further apart than that,
or whose last one came long ago (one long gap ends a flow), starts at once as before; 0
never waits. The two are apart (stop 31): a longer busy linger (40 ms) batches more at 80 %
of the burst's rate, but as the flow's threshold it made every hop of a 30/s stream (gaps
of 33 ms) wait for the next message, the median publish->screened 19 -> 86 ms."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aio_pika.abc import AbstractIncomingMessage

log = logging.getLogger("ordermill.runtime")


@dataclass
class InFlight:
    """Messages received and not yet settled. Counters chain: a worker's counts into the
    pipeline's (unless the worker gives way), which counts into the process's, so a stop
    waits for everything and background work can give way to the pipeline alone."""

    count: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    parent: InFlight | None = None
    busy_since: float = 0.0  # loop time at which the count last rose from 0

    def __post_init__(self) -> None:
        self.idle.set()

    def enter(self) -> None:
        if self.count == 0:
            self.busy_since = asyncio.get_running_loop().time()
        self.count += 1
        self.idle.clear()
        if self.parent is not None:
            self.parent.enter()

    def leave(self, n: int = 1) -> None:
        self.count -= n
        if self.count == 0:
            self.idle.set()
        if self.parent is not None:
            self.parent.leave(n)


@dataclass
class Busy:
    """Batches of one worker being handled now (by its batchers), and the turn to collect the
    next one: one batcher collects at a time, so what arrives while it lingers joins its batch
    instead of going to another batcher that would linger with it alone."""

    handling: int = 0
    collecting: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Set whenever no batch is in hand: a batcher lingering for company stops at once then,
    # rather than holding what it has for the rest of its linger with nothing else running.
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    # The moving average of the gaps between the worker's messages as they arrive (seconds;
    # None until two have), and when the last one did (loop time).
    gap: float | None = None
    last_arrival: float | None = None

    def __post_init__(self) -> None:
        if self.handling == 0:
            self.idle.set()

    def __bool__(self) -> bool:
        return self.handling > 0

    def start(self) -> None:
        self.handling += 1
        self.idle.clear()

    def done(self) -> None:
        self.handling -= 1
        if self.handling == 0:
            self.idle.set()

    def arrived(self, now: float, flow_gap: float) -> None:
        """A message of the worker arrived at loop time `now`. The newest gap weighs a quarter
        of the average, and counts as at most four `flow_gap`s (the flow's threshold): one
        long pause ends a flow (the average is then over it) and an old one is soon
        forgotten."""
        if self.last_arrival is not None:
            newest = min(max(now - self.last_arrival, 0.0), 4 * flow_gap)
            self.gap = newest if self.gap is None else self.gap + (newest - self.gap) / 4
        self.last_arrival = now

    def flowing(self, flow_gap: float) -> bool:
        """Messages arrive, on average, less than `flow_gap` apart: waiting for the next one
        gathers company for the price of about one gap."""
        return flow_gap > 0 and self.gap is not None and self.gap < flow_gap


async def take_batch(waiting: asyncio.Queue[AbstractIncomingMessage], limit: int,
                     linger: float, *, busy: Busy | None = None,
                     busy_linger: float = 0.0,
                     flow_gap: float = math.inf) -> list[AbstractIncomingMessage]:
    """The first message to arrive, then whatever else is waiting (or arrives within
    `linger` seconds; or `busy_linger` while another batch of the worker is in hand or its
    messages flow: arrive on average less than `flow_gap` apart, by default and at most
    `busy_linger`: a flow whose next message is due after the wait ends would only delay
    each one), up to `limit`."""
    loop = asyncio.get_running_loop()
    batch = [await waiting.get()]
    started = loop.time()
    gap = min(flow_gap, busy_linger)
    flowing = busy is not None and busy_linger > linger and busy.flowing(gap)
    lingering = busy is not None and busy_linger > linger and (bool(busy) or flowing)
    deadline = started + (busy_linger if lingering else linger)
    while len(batch) < limit:
        if not waiting.empty():
            batch.append(waiting.get_nowait())
            continue
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        if not lingering or (flowing and busy is not None and not busy):
            if lingering and busy is not None:  # flowing, idle: wait while the next is due
                due = 2 * (busy.gap or 0.0) - (loop.time() - (busy.last_arrival or started))
                if due <= 0:
                    break
                remaining = min(remaining, due)
            try:
                batch.append(await asyncio.wait_for(waiting.get(), remaining))
            except TimeoutError:
                break
            continue
        assert busy is not None
        # Busy: wait for another message or for the worker to fall idle, whichever first.
        get = asyncio.ensure_future(waiting.get())
        idle = asyncio.ensure_future(busy.idle.wait())
        done, _ = await asyncio.wait({get, idle}, timeout=remaining,
                                     return_when=asyncio.FIRST_COMPLETED)
        idle.cancel()
        if get in done:
            batch.append(get.result())
        else:
            get.cancel()  # asyncio.Queue.get gives its place to the next getter: nothing lost
            if idle in done and not flowing:  # nothing else in hand: only the idle linger left
                lingering = False
                deadline = started + linger
    return batch


async def batcher(service: str, waiting: asyncio.Queue[AbstractIncomingMessage], *, limit: int,
                  linger: float, handle: Callable[[list[AbstractIncomingMessage]], Awaitable[None]],
                  requeue: Callable[[list[AbstractIncomingMessage]], Awaitable[None]],
                  in_flight: InFlight, busy: Busy | None = None,
                  busy_linger: float = 0.0, flow_gap: float = math.inf) -> None:
    """One of a worker's batchers (they share `busy`): take a batch, handle it, again."""
    busy = busy if busy is not None else Busy()
    while True:
        async with busy.collecting:
            batch = await take_batch(waiting, limit, linger, busy=busy, busy_linger=busy_linger,
                                     flow_gap=flow_gap)
            busy.start()
        try:
            await handle(batch)
        except Exception:  # never lose the batcher: what is not settled goes back
            log.exception("batch handling failed", extra={"service": service})
            await requeue(batch)
        finally:
            busy.done()
            in_flight.leave(len(batch))
