"""Batching under load: a batcher takes what has arrived, up to a batch (one message when
idle, many under load), and hands it to the pipeline; in-flight deliveries are counted so a
stop can wait for them."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aio_pika.abc import AbstractIncomingMessage

log = logging.getLogger("ordermill.runtime")


@dataclass
class InFlight:
    count: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.idle.set()

    def enter(self) -> None:
        self.count += 1
        self.idle.clear()

    def leave(self, n: int = 1) -> None:
        self.count -= n
        if self.count == 0:
            self.idle.set()


async def take_batch(waiting: asyncio.Queue[AbstractIncomingMessage], limit: int,
                     linger: float) -> list[AbstractIncomingMessage]:
    """The first message to arrive, then whatever else is waiting (or arrives within
    `linger` seconds), up to `limit`."""
    loop = asyncio.get_running_loop()
    batch = [await waiting.get()]
    deadline = loop.time() + linger
    while len(batch) < limit:
        if not waiting.empty():
            batch.append(waiting.get_nowait())
            continue
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        try:
            batch.append(await asyncio.wait_for(waiting.get(), remaining))
        except TimeoutError:
            break
    return batch


async def batcher(service: str, waiting: asyncio.Queue[AbstractIncomingMessage], *, limit: int,
                  linger: float, handle: Callable[[list[AbstractIncomingMessage]], Awaitable[None]],
                  requeue: Callable[[list[AbstractIncomingMessage]], Awaitable[None]],
                  in_flight: InFlight) -> None:
    while True:
        batch = await take_batch(waiting, limit, linger)
        try:
            await handle(batch)
        except Exception:  # never lose the batcher: what is not settled goes back
            log.exception("batch handling failed", extra={"service": service})
            await requeue(batch)
        finally:
            in_flight.leave(len(batch))
