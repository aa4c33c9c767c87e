"""The console's warm-up: when it starts, and whenever its pool connects to a database server
it has not warmed (the server restarted, or a failover moved the address to another one), it
reads in the background what the dashboard and the pending list's first page read, so the
operator's first visit after a restart finds those pages in PostgreSQL's shared buffers
instead of reading them from the disk (issue 13: ~220 reads for the list's first page at 1M
orders, 114 ms cold where it takes a few ms warm).

Why plain queries and not pg_prewarm: the extension is created by a superuser (it is not a
trusted extension) and reads whole relations or block ranges, while these pages need a few
hundred pages scattered over tables of hundreds of megabytes; running the pages' own
statements reads exactly those, with the console's read-only role. A server's own
`pg_prewarm.autoprewarm` (shared_preload_libraries) restores the whole of shared buffers after
a clean restart and is the DBA's complement to this (docs/performance.md, "The console at a million
orders").

Bounded: one warm-up at a time, on one pooled connection, in a read-only transaction whose
statements are stopped after WARM_UP_STATEMENT_MS, the whole stopped after WARM_UP_SECONDS;
a failure is one log line and changes nothing else (the pages read as they would have); it
is tried again on the pool's next new connection, WARM_UP_TRIES times a server at most. A
server is recognised by its start time (pg_postmaster_start_time()): a pool that reconnects to
the same server after a dropped connection finds its buffers as they were and does not warm
again."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import asyncpg

from console import order_list, queries

log = logging.getLogger("ordermill.console")

WARM_UP_STATEMENT_MS = 5_000
WARM_UP_SECONDS = 20.0
# Tries a server gets: a warm-up that keeps failing (a permission the console's role lacks,
# a disk too slow for WARM_UP_SECONDS) would otherwise run again, up to 20 s of reads on one
# of the console's connections, each time the pool opens one (idle ones close after 300 s).
WARM_UP_TRIES = 2
# What a warm-up may meet that is the database's or the network's doing, not the code's.
_EXPECTED = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)

# What identifies the server a new connection reached (its start time); a test may stand in.
ServerOf = Callable[[asyncpg.Connection], Awaitable[Any]]


async def server_started(conn: asyncpg.Connection) -> datetime:
    return await conn.fetchval("SELECT pg_postmaster_start_time()")


async def read_first_pages(conn: asyncpg.Connection) -> dict[str, int]:
    """What the dashboard and the pending list's first page read, read (their own statements,
    console/queries.py and console/order_list.py), in a read-only transaction whose statements
    stop after WARM_UP_STATEMENT_MS. Returns how many rows each showed (for the log)."""
    async with conn.transaction(readonly=True):
        await conn.execute(f"SET LOCAL statement_timeout = {WARM_UP_STATEMENT_MS}")
        dashboard = await queries.dashboard(conn)
        first = await order_list.order_list(conn, order_list.OrderFilters())
        await conn.fetch("SELECT slug FROM products ORDER BY slug")  # the list's filter choices
    return {"awaiting": len(dashboard["awaiting"]), "listed": len(first["orders"])}


class WarmUp:
    """Warms the console's first pages in the background (the module's docstring). `connected`
    is the pool's hook for each new connection (console/app.py); `start` begins listening,
    once the console's schema is checked; `close` stops it."""

    def __init__(self, enabled: bool = True, server_of: ServerOf = server_started) -> None:
        self.enabled = enabled
        self._server_of = server_of
        self._pool: asyncpg.Pool | None = None
        self._seen: Any = None  # the server the newest connection reached
        self._warmed: Any = None  # the server last warmed
        self._tries: dict[Any, int] = {}  # failed warm-ups per server
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.runs = 0  # warm-ups finished (read by tests)
        self.shown: dict[str, int] = {}  # what the last one read, rows per page
        self.done = asyncio.Event()  # set after each warm-up, whatever its outcome

    async def connected(self, conn: asyncpg.Connection) -> None:
        """A new pool connection: note its server, and wake the warm-up if it is a new one.
        Never fails the connection for the warm-up's sake (a warm-up is not worth refusing a
        page for): what the query meets is logged and the connection goes on."""
        if not self.enabled:
            return
        try:
            self._seen = await self._server_of(conn)
        except _EXPECTED as exc:
            log.warning("console warm-up: could not tell which server this is",
                        extra={"error": str(exc)})
            return
        if self._seen != self._warmed:
            self._wake.set()

    def start(self, pool: asyncpg.Pool) -> None:
        if not self.enabled:
            return
        self._pool = pool
        self._task = asyncio.create_task(self._run(), name="console warm-up")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task})  # not `await`: the caller's own cancel is kept
            self._task = None

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            server = self._seen
            if server is None or server == self._warmed:
                continue
            if self._tries.get(server, 0) >= WARM_UP_TRIES:
                continue  # given up on this server (logged when it was)
            self.done.clear()
            try:
                if await self._warm():
                    self._warmed = server  # a failed one is tried again on the next connection
                else:
                    self._tries[server] = self._tries.get(server, 0) + 1
                    if self._tries[server] >= WARM_UP_TRIES:
                        log.warning("console warm-up given up for this database server after"
                                    f" {WARM_UP_TRIES} tries: its first pages read from the"
                                    " disk")
            finally:
                self.runs += 1
                self.done.set()

    async def _warm(self) -> bool:
        assert self._pool is not None
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(WARM_UP_SECONDS):
                async with self._pool.acquire() as conn:
                    self.shown = await read_first_pages(conn)
        except _EXPECTED as exc:  # the pages read as they would have
            log.warning("console warm-up stopped: the first pages will read from the disk",
                        extra={"error": str(exc) or type(exc).__name__})
            return False
        except Exception:  # the code's mistake (a query changed): its traceback, never the page's
            log.exception("console warm-up failed: the first pages will read from the disk")
            return False
        log.info("console warm-up done", extra={
            "ms": round((time.monotonic() - t0) * 1000, 1), **self.shown})
        return True
