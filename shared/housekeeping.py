"""Keeps the outbox and inbox from growing without end: old published events and old
dedupe rows are deleted in small batches (several processes may do it at once)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import asyncpg

from shared import db
from shared.settings_parts import HousekeepingSettings

log = logging.getLogger("ordermill.housekeeping")

_BATCH = 5000


class Housekeeper:
    def __init__(self, settings: HousekeepingSettings) -> None:
        self.outbox_hours = settings.outbox_retention_hours
        self.inbox_days = settings.inbox_retention_days
        self.every_seconds = settings.every_seconds

    async def run(self, pool: asyncpg.Pool, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.every_seconds)
            if stop.is_set():
                return
            try:
                await self.once(pool)
            except db.TRANSIENT_DB_ERRORS as exc:
                log.warning("housekeeping failed; will retry", extra={"error": str(exc)})

    async def once(self, pool: asyncpg.Pool) -> dict[str, int]:
        deleted = {"outbox": 0, "inbox": 0}
        queries = {
            # Only published events: an unpublished one is never thrown away.
            "outbox": "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox"
                      " WHERE published_at < now() - $1::float * interval '1 hour'"
                      " LIMIT $2 FOR UPDATE SKIP LOCKED)",
            "inbox": "DELETE FROM inbox WHERE ctid IN (SELECT ctid FROM inbox"
                     " WHERE processed_at < now() - $1::float * interval '1 day'"
                     " LIMIT $2 FOR UPDATE SKIP LOCKED)",
        }
        ages = {"outbox": self.outbox_hours, "inbox": self.inbox_days}
        for table, query in queries.items():
            while True:
                status = await pool.execute(query, ages[table], _BATCH)
                count = int(status.split()[-1])
                deleted[table] += count
                if count < _BATCH:
                    break
        if any(deleted.values()):
            log.info("housekeeping done", extra=deleted)
        return deleted
