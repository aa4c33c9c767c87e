"""Keeps the tables that fill with every message from growing without end: the outbox, the
inbox, finished jobs, sent mails and finished webhook deliveries hold only their retention
window (issue 15, target 3).

Each table is pruned in small batches, one short transaction each (rows locked with SKIP
LOCKED: several processes may prune at once, and none waits for a worker's row), with a
pause between batches so a large backlog of old rows never holds locks or the disk for
long. Only finished rows are ever deleted: an unpublished event, a pending, running or
parked job, a mail not sent yet (or parked), a webhook not delivered yet (or parked) stay
whatever their age. Each query reads its rows by an index on the time it prunes by
(migrations 0027 and 0031), never the whole table."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

import asyncpg

from shared import db
from shared.settings_parts import HousekeepingSettings

log = logging.getLogger("ordermill.housekeeping")


@dataclass(frozen=True)
class Retention:
    """A table's rule: `query` deletes up to $2 rows finished before now() - $1 (seconds)."""

    table: str
    query: str
    keep_seconds: float


def _delete(table: str, key: str, finished: str, *, only: str = "") -> str:
    """Up to $2 rows of `table` (`only` those) whose `finished` time is over $1 seconds ago."""
    where = f"{only} AND " if only else ""
    return (f"DELETE FROM {table} WHERE {key} IN (SELECT {key} FROM {table} WHERE {where}"
            f"{finished} < now() - make_interval(secs => $1) LIMIT $2 FOR UPDATE SKIP LOCKED)")


def retention_rules(settings: HousekeepingSettings) -> list[Retention]:
    hour, day = 3600.0, 86400.0
    return [
        # Only published events: an unpublished one is never thrown away.
        Retention("outbox", _delete("outbox", "id", "published_at"),
                  settings.outbox_retention_hours * hour),
        # Dedupe rows: a redelivery older than this would be handled again.
        Retention("inbox", _delete("inbox", "ctid", "processed_at"),
                  settings.inbox_retention_days * day),
        # Finished setups (done, cancelled); parked and open ones stay for the operator.
        Retention("jobs", _delete("jobs", "id", "updated_at",
                                  only="status IN ('done', 'cancelled')"),
                  settings.job_retention_days * day),
        # Sent mails (and their dedupe keys); pending, sending and parked ones stay.
        Retention("emails", _delete("emails", "id", "sent_at", only="status = 'sent'"),
                  settings.email_retention_days * day),
        # Staff alerts (their dedupe rows) with their Slack messages, once none of those waits
        # or is parked: an alert whose message is not delivered stays for the operator.
        Retention("alerts", _delete(
            "alerts", "id", "created_at", only="NOT EXISTS (SELECT 1 FROM alert_deliveries d"
            " WHERE d.alert_id = alerts.id AND d.status <> 'delivered')"),
                  settings.alert_retention_days * day),
        # Delivered or cancelled webhooks, their attempts with them (ON DELETE CASCADE);
        # pending, sending and parked ones stay.
        Retention("webhook_deliveries",
                  _delete("webhook_deliveries", "id", "updated_at",
                          only="status IN ('delivered', 'cancelled')"),
                  settings.webhook_retention_days * day),
    ]


class Housekeeper:
    def __init__(self, settings: HousekeepingSettings) -> None:
        self.rules = retention_rules(settings)
        self.every_seconds = settings.every_seconds
        self.batch = settings.batch
        self.pause_seconds = settings.pause_seconds

    async def run(self, pool: asyncpg.Pool, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.every_seconds)
            if stop.is_set():
                return
            try:
                await self.once(pool, stop)
            except db.TRANSIENT_DB_ERRORS as exc:
                log.warning("housekeeping failed; will retry", extra={"error": str(exc)})

    async def once(self, pool: asyncpg.Pool, stop: asyncio.Event | None = None) -> dict[str, int]:
        """One pass over every table, a batch at a time until what is past retention is gone
        (or the process stops). Returns the rows deleted per table."""
        deleted = dict.fromkeys((rule.table for rule in self.rules), 0)
        for rule in self.rules:
            while stop is None or not stop.is_set():
                status = await pool.execute(rule.query, rule.keep_seconds, self.batch)
                count = int(status.split()[-1])
                deleted[rule.table] += count
                if count < self.batch:
                    break
                await asyncio.sleep(self.pause_seconds)  # let the workers' transactions in
        if any(deleted.values()):
            log.info("housekeeping done", extra=deleted)
        return deleted
