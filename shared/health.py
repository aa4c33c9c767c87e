"""Whether this worker can work: the database answering (waited for when it does not, so an
outage holds messages instead of dead-lettering them) and the heartbeat file a container's
health check reads."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
from aio_pika.abc import AbstractRobustConnection

from shared import db

log = logging.getLogger("ordermill.runtime")


class DatabaseWatch:
    """One per process: every batcher that meets an outage waits on the same probe."""

    def __init__(self, database_url: str, stop: asyncio.Event, *,
                 statement_cache_size: int = 100) -> None:
        self._url = database_url
        self._statement_cache_size = statement_cache_size
        self._stop = stop
        self._outage: asyncio.Task[bool] | None = None
        # Set once a probe failed, until one succeeds: a stopping worker then requeues what it
        # has not handled instead of retrying it against a database that is away.
        self.down = False

    async def answers(self) -> bool:
        """Whether the database takes writes, which every worker needs: a standby reached after a
        failover answers queries but is no better than a server that is down. Asked on a
        connection of its own: a pool busy with long transactions is no outage."""
        try:
            conn = await asyncpg.connect(self._url, timeout=5,
                                         statement_cache_size=self._statement_cache_size)
        except Exception:  # refused, unreachable, starting up, shutting down: not answering
            return False
        try:
            return await conn.fetchval(
                "SELECT current_setting('transaction_read_only') = 'off'", timeout=5)
        except Exception:
            return False
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), timeout=2)

    async def outlasted(self, service: str, exc: BaseException, in_flight: int) -> bool:
        """After a transient error outlived its retries: True once the database, which did not
        answer (a restart, a failover), answers again. The message was not at fault: it waits,
        and the few others this worker holds with it, rather than being dead-lettered and its
        storefront told the order was refused. False if the database answers (the error is
        the message's own) or the worker stops first (`down` then stays set)."""
        if not isinstance(exc, db.TRANSIENT_DB_ERRORS):
            return False
        if not self.down:
            if await self.answers():
                return False
            self.down = True
        if self._outage is None or self._outage.done():
            self._outage = asyncio.create_task(self._until_it_answers(service, exc, in_flight))
        return await self.through()

    async def through(self) -> bool:
        """Wait out an outage already seen: True once the database answers (at once if it is
        not away), False if the worker stops first."""
        while self.down:
            outage = self._outage
            if self._stop.is_set() or outage is None or outage.done():
                return False  # stopping; or the probe ended without the database back
            stopping = asyncio.create_task(self._stop.wait())
            try:
                await asyncio.wait({outage, stopping}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopping.cancel()
        return True

    async def _until_it_answers(self, service: str, exc: BaseException, in_flight: int) -> bool:
        started = asyncio.get_running_loop().time()
        log.error("database not answering: messages wait until it does", extra={
            "service": service, "in_flight": in_flight, "error": f"{type(exc).__name__}: {exc}"})
        delay = 0.5
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)
            if not self._stop.is_set() and await self.answers():
                self.down = False
                log.warning("database answering again: messages resume", extra={
                    "outage_seconds": round(asyncio.get_running_loop().time() - started, 1)})
                return True
            delay = min(delay * 2, 5.0)
        return False


async def heartbeat(path: Path, every: float, stop: asyncio.Event,
                    connection: AbstractRobustConnection, database: DatabaseWatch) -> None:
    """Touch `path` while this process can work: its broker connected (a robust connection
    reconnecting is not closed, only not connected) and its database answering. A health
    check reads the file's age; a stopped worker removes it. A failed beat is logged and the
    next one tried: the heartbeat itself never dies."""
    failing = False
    try:
        while not stop.is_set():
            try:
                if connection.connected.is_set() and await database.answers():
                    await asyncio.to_thread(
                        path.write_text, datetime.now(UTC).isoformat(timespec="seconds") + "\n")
                failing = False
            except Exception as exc:
                if not failing:
                    log.warning("heartbeat not written", extra={
                        "path": str(path), "error": f"{type(exc).__name__}: {exc}"})
                failing = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every)
    finally:
        with contextlib.suppress(OSError):
            await asyncio.to_thread(path.unlink, missing_ok=True)
