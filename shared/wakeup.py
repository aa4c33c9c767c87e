"""Wake a background loop when PostgreSQL says rows were committed (LISTEN/NOTIFY).

One dedicated connection per listener, reopened when lost; the loops keep their timers,
so nothing waits forever while LISTEN is down. With no URL (behind PgBouncer in transaction
pooling and no DATABASE_DIRECT_URL: a LISTEN there hears nothing) there is no listener: the
loops run on their timers alone (RELAY_SWEEP_SECONDS, JOB_POLL_SECONDS)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import asyncpg

log = logging.getLogger("ordermill.wakeup")


class Wakeup:
    def __init__(self, database_url: str | None, channel: str) -> None:
        self.database_url = database_url
        self.channel = channel
        self.event = asyncio.Event()
        self._conn: asyncpg.Connection | None = None
        self._said_none = False

    async def ensure(self) -> None:
        """Listen, if not listening already (and there is somewhere to)."""
        if self.database_url is None:
            if not self._said_none:
                log.info("no LISTEN behind PgBouncer without DATABASE_DIRECT_URL; the timer"
                         " wakes this loop", extra={"channel": self.channel})
                self._said_none = True
            return
        if self._conn is not None and not self._conn.is_closed():
            return
        try:
            self._conn = await asyncpg.connect(self.database_url)
            await self._conn.add_listener(self.channel, self._on_notify)
        except Exception as exc:  # whatever the cause, the timer does the listener's work
            log.warning("listener unavailable; the timer takes over",
                        extra={"channel": self.channel, "error": f"{type(exc).__name__}: {exc}"})
            self._conn = None

    def _on_notify(self, *_: Any) -> None:
        self.event.set()

    async def close(self) -> None:
        if self._conn is not None and not self._conn.is_closed():
            with contextlib.suppress(Exception):
                await self._conn.close()
        self._conn = None
