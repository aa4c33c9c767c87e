"""The alerts worker's sweep, for what no event announces: an order waiting for review longer
than a rule's `waiting_hours`, and dead letters (a dead-letter queue that was empty and is
not any more). Every ALERT_SWEEP_SECONDS, in every copy of the worker: the alerts' unique
(rule, cause) and a row lock on each watched queue keep two sweepers from alerting twice.

Dead letters are an **episode**: the queue going from empty to holding dead letters alerts
once (cause `dead:<queue>:<episode>`); it ends when the queue has read empty again (replayed
or purged) for QUIET_SECONDS, and the next dead letter after that starts a new one. One empty
read is not enough: a passive declare counts only the messages ready, and an operator listing
the dead letters (`ordermill dead-letters`, the console's page) holds them unacknowledged for
a moment, so the queue reads empty while nothing was resolved. Queue depths come from
passive declares (shared/queue_depths.py) on a connection of the sweep's own.

A **backlog** of waiting orders is one alert, not a flood: when a pass finds more than
SUMMARY_OVER orders a rule has not alerted on (the rule just loaded over a queue of old
Pending orders, or the worker back after a day away), it raises one summary alert (how many,
the oldest) and records each order as covered by it (`alerts.summary_id`, no message of its
own), so none of them alerts again. Orders crossing the line one by one afterwards alert one
by one, as before."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import UTC, datetime

import asyncpg

from services.alerts.facts import order_facts
from services.alerts.raising import Cause, Delivery, raise_alert
from services.alerts.rules import AlertRules, Rule
from services.alerts.store import RuleStore
from shared import broker, db
from shared.queue_depths import dead_queues, queue_depths
from shared.states import AlertTrigger
from shared.sweep import BrokerSweep
from shared.topology import Names

log = logging.getLogger("ordermill.alerts.sweep")

BATCH = 100  # orders alerted per rule and pass: a backlog is taken over a few passes
SUMMARY_OVER = 10  # more orders than this newly waiting for a rule in one pass: one summary
QUIET_SECONDS = 300.0  # a dead-letter queue empty this long ends its episode

# Orders awaiting review (as `ordermill pending` and the exporter count them), waiting longer
# than $1 seconds: the one condition the list, the summary and its covered orders share.
_WAITING_LONG = (
    " FROM orders o WHERE o.status = 'Pending' AND o.deleted_at IS NULL"
    " AND o.screening <> 'queued' AND o.created_at < now() - make_interval(secs => $1)")
# ... that rule $2 has not alerted on.
_NOT_ALERTED = (
    " AND NOT EXISTS (SELECT 1 FROM alerts a WHERE a.rule = $2 AND a.cause = 'review:' || o.id)")

_WAITING = f"SELECT o.id, o.created_at{_WAITING_LONG}{_NOT_ALERTED} ORDER BY o.created_at LIMIT $3"

# The same orders, all of them, for a summary: how many, the oldest, the highest id.
_BACKLOG = (
    "SELECT count(*) AS n, max(o.id) AS last_id,"
    " (array_agg(o.order_number ORDER BY o.created_at, o.id))[1] AS oldest_number,"
    f" min(o.created_at) AS oldest_at{_WAITING_LONG}{_NOT_ALERTED}")

# Each order of the summary, up to its highest id, recorded as covered by it: no message.
_COVERED = (
    "INSERT INTO alerts (rule_set_id, rule, trigger, cause, order_id, title, facts, summary_id)"
    " SELECT $3, $2, 'review_waiting', 'review:' || o.id, o.id,"
    " 'Order #' || o.order_number || ' waits for review (in alert ' || $4::bigint || ')',"
    f" '{{}}'::jsonb, $4{_WAITING_LONG}"
    " AND o.id <= $5 ON CONFLICT (rule, cause) DO NOTHING")


def _hours(since: datetime) -> str:
    hours = (datetime.now(UTC) - since).total_seconds() / 3600
    return f"{hours:.1f} h"


class Sweeper(BrokerSweep):
    log = log
    failed = "alerts sweep failed; will try again"
    transient = (*db.TRANSIENT_DB_ERRORS, *broker.TRANSIENT_BROKER_ERRORS)

    def __init__(self, store: RuleStore, delivery: Delivery, *, amqp_url: str, names: Names,
                 every_seconds: float, quiet_seconds: float = QUIET_SECONDS,
                 summary_over: int = SUMMARY_OVER) -> None:
        super().__init__(amqp_url, every_seconds)
        self.store, self.delivery = store, delivery
        self.quiet_seconds = quiet_seconds
        self.summary_over = summary_over
        self.names = names

    async def once(self, pool: asyncpg.Pool) -> int:
        """One pass; the alerts raised."""
        rules = await self.store.current(pool)
        raised = 0
        if rules.for_trigger(AlertTrigger.REVIEW_WAITING):
            raised += await self.review_waiting(pool, rules)
        if rules.for_trigger(AlertTrigger.DEAD_LETTER):
            rows = await queue_depths(await self.connection(), self.names, dead_queues(self.names))
            raised += await self.dead_letters(
                pool, rules, {r["queue"]: r["messages"] for r in rows if not r.get("missing")})
        return raised

    async def review_waiting(self, pool: asyncpg.Pool, rules: AlertRules) -> int:
        raised = 0
        for rule in rules.for_trigger(AlertTrigger.REVIEW_WAITING):
            assert rule.when.waiting_hours is not None
            seconds = float(rule.when.waiting_hours) * 3600
            orders = await pool.fetch(_WAITING, seconds, rule.name, BATCH)
            if len(orders) > self.summary_over:
                raised += await self.backlog(pool, rules, rule, seconds)
                continue
            for order in orders:
                async with pool.acquire() as conn, conn.transaction():
                    # Read again in this transaction: accepted or cancelled since the list
                    # was read, it is no longer waiting.
                    if not await conn.fetchval(
                            "SELECT true FROM orders WHERE id = $1 AND status = 'Pending'"
                            " AND deleted_at IS NULL", order["id"]):
                        continue
                    facts = await order_facts(conn, order["id"])
                    if facts is None:
                        continue
                    waited = _hours(order["created_at"])
                    cause = Cause(
                        AlertTrigger.REVIEW_WAITING, f"review:{facts.id}",
                        f"Order #{facts.number} has waited {waited} for review",
                        {"Waiting": waited, **facts.lines()}, facts.id)
                    if await raise_alert(conn, rules, rule, cause, self.delivery) is not None:
                        raised += 1
        return raised

    async def backlog(self, pool: asyncpg.Pool, rules: AlertRules, rule: Rule,
                      seconds: float) -> int:
        """One summary alert for every order this rule has not alerted on; 1 if raised. Two
        sweepers at once take turns on a lock per rule; the same highest id is the same cause
        (one alert), and a summary that covers no order is rolled back."""
        async with pool.acquire() as conn:
            transaction = conn.transaction()
            await transaction.start()
            try:
                # One sweeper at a time per rule: a second one reads after the first
                # committed, finds what is left (an order that crossed the line meanwhile)
                # and leaves it to the next pass, one by one, rather than summarising it.
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))",
                                   f"review-backlog:{rule.name}")
                row = await conn.fetchrow(_BACKLOG, seconds, rule.name)
                if row["n"] <= self.summary_over:
                    await transaction.rollback()
                    return 0
                hours = f"{float(rule.when.waiting_hours or 0):g} h"
                cause = Cause(
                    AlertTrigger.REVIEW_WAITING, f"review-backlog:{row['last_id']}",
                    f"{row['n']} orders have waited over {hours} for review",
                    {"Orders waiting": str(row["n"]),
                     "Oldest": f"#{row['oldest_number']}, waiting {_hours(row['oldest_at'])}",
                     "Look": "ordermill pending, or the console's pending list"})
                alert_id = await raise_alert(conn, rules, rule, cause, self.delivery)
                covered = 0 if alert_id is None else int((await conn.execute(
                    _COVERED, seconds, rule.name, rules.id, alert_id, row["last_id"])).split()[-1])
                if not covered:
                    await transaction.rollback()
                    return 0
            except BaseException:
                await transaction.rollback()
                raise
            await transaction.commit()
            log.info("review backlog summarised", extra={
                "rule": rule.name, "alert_id": alert_id, "orders": covered})
            return 1

    async def dead_letters(self, pool: asyncpg.Pool, rules: AlertRules,
                           depths: Mapping[str, int]) -> int:
        """Each dead-letter queue's depth against its watch: a new episode alerts every
        dead_letter rule once."""
        matching = rules.for_trigger(AlertTrigger.DEAD_LETTER)
        raised = 0
        for queue, depth in sorted(depths.items()):
            watch = f"dead:{queue}"
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute("INSERT INTO alert_watches (name) VALUES ($1)"
                                   " ON CONFLICT (name) DO NOTHING", watch)
                row = await conn.fetchrow(
                    "SELECT active, episode, empty_since,"
                    " empty_since <= now() - make_interval(secs => $2) AS quiet"
                    " FROM alert_watches WHERE name = $1 FOR UPDATE", watch, self.quiet_seconds)
                starts = depth > 0 and not row["active"]
                episode = row["episode"] + (1 if starts else 0)
                # Empty: the episode goes on until the queue has stayed empty QUIET_SECONDS.
                active = depth > 0 or (row["active"] and not (
                    row["quiet"] or (row["empty_since"] is None and self.quiet_seconds <= 0)))
                await conn.execute(
                    "UPDATE alert_watches SET active = $2::boolean, episode = $3, depth = $4::bigint,"
                    " empty_since = CASE WHEN $2 AND $4 = 0 THEN coalesce(empty_since, now())"
                    " END, updated_at = now() WHERE name = $1", watch, active, episode, depth)
                if not starts:
                    continue
                service = self.names.service_of(queue) or queue
                cause = Cause(
                    AlertTrigger.DEAD_LETTER, f"dead:{queue}:{episode}",
                    f"{depth} dead letter(s) in {queue}",
                    {"Queue": queue, "Dead letters": str(depth),
                     "Look": f"ordermill dead-letters {service}"})
                for rule in matching:
                    if await raise_alert(conn, rules, rule, cause, self.delivery) is not None:
                        raised += 1
        return raised
