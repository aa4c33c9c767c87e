"""The list's exact counts (GET /orders/count): how many run at once, how many may wait, and
how long a count is kept. Each may hold one of the console's few connections for seconds
(order_list.EXACT_COUNT_SECONDS), and any signed-in operator may ask for one: a few operators
paging through filters, or a script, must neither leave the other pages waiting for a
connection nor keep the database counting for the workers' time."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime

AT_ONCE = 2  # of the pool's POOL_SIZE (5) connections
KEEP_SECONDS = 60.0  # a filter counted again within a minute (its pages, a reload) is not recounted
MOST_KEPT = 256

Key = tuple[tuple[str, str], ...]


class ExactCounts:
    def __init__(self, at_once: int = AT_ONCE, keep_seconds: float = KEEP_SECONDS) -> None:
        self.running = asyncio.Semaphore(at_once)
        self.at_once = at_once
        self.keep_seconds = keep_seconds
        self._waiting = 0
        self._kept: OrderedDict[Key, tuple[float, datetime, int]] = OrderedDict()

    @staticmethod
    def key(query: dict[str, str]) -> Key:
        return tuple(sorted(query.items()))

    def kept(self, key: Key) -> tuple[int, datetime] | None:
        """The count of these filters made within KEEP_SECONDS, and when."""
        found = self._kept.get(key)
        if found is None or time.monotonic() - found[0] > self.keep_seconds:
            return None
        return found[2], found[1]

    def keep(self, key: Key, count: int) -> datetime:
        at = datetime.now(UTC)
        self._kept[key] = (time.monotonic(), at, count)
        self._kept.move_to_end(key)
        while len(self._kept) > MOST_KEPT:
            self._kept.popitem(last=False)
        return at

    @asynccontextmanager
    async def turn(self) -> AsyncIterator[bool]:
        """A turn to count (True), after at most AT_ONCE others waiting ahead; False at once
        when that many already wait: the caller says the bound it has instead."""
        if self.running.locked() and self._waiting >= self.at_once:
            yield False
            return
        self._waiting += 1
        try:
            await self.running.acquire()
        finally:
            self._waiting -= 1
        try:
            yield True
        finally:
            self.running.release()
