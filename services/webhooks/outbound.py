"""Enqueueing deliveries: the webhooks worker's handler and the API other components use
(staff alerts), always inside the caller's transaction (its unit of work), so a delivery is
recorded if and only if what caused it is.

    await enqueue_to_subscribers(uow.conn, "order.placed", data, event_id=..., at=...)
    await enqueue(uow.conn, [Outbound("order.placed", data, event_id=..., at=...), ...])
    await enqueue_to_endpoint(uow.conn, endpoint_id, "alert.setup_parked", data, event_id=...)

Fan-out is set-based: one INSERT ... SELECT writes every subscribed endpoint's delivery of
every event given, the subscriptions read in that same statement (always current: nothing
cached that an added or disabled endpoint would have to wait out). A delivery's
`webhook-id` derives from the event id and the endpoint id (`webhook_id_for`, computed in
that statement: SQL and Python say the same), so the same event enqueued twice (a
redelivered message, a re-run handler) is one delivery."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg

from services.webhooks.sender import DELIVERIES
from shared.contracts import EVENTS
from shared.wakeup import heard_here

# The routing keys an integrator may subscribe to: every event on the exchange except the
# internal re-drives and commands (docs/contract.md section 10). `*` subscribes to them all.
INTERNAL_KEYS = frozenset({"fraud.redrive", "order.retry", "order.rescreen", "email.send"})
EVENT_TYPES: tuple[str, ...] = tuple(sorted(set(EVENTS) - INTERNAL_KEYS))
ALL = "*"
TEST_EVENT = "webhook.test"  # `ordermill webhooks test`: to one endpoint, never subscribed

# `msg_` and the first 32 hex digits of SHA-256("<event id>:<endpoint id>"): PostgreSQL
# computes it without an extension (uuid5 would need SHA-1: uuid-ossp or pgcrypto).
# Deliveries stored before this change keep the (uuid5) ids they were stored with.
_WEBHOOK_ID_SQL = ("'msg_' || left(encode(sha256(convert_to(v.event_id || ':' || e.id::text,"
                   " 'UTF8')), 'hex'), 32)")


def webhook_id_for(event_id: str, endpoint_id: int) -> str:
    """Stable: the same for every attempt and for a redelivered event (`msg_` and 32 hex)."""
    return "msg_" + hashlib.sha256(f"{event_id}:{endpoint_id}".encode()).hexdigest()[:32]


def envelope(event_type: str, data: dict[str, Any], at: datetime | None = None) -> str:
    """The body every attempt sends, byte for byte: `{"type", "timestamp", "data"}`."""
    moment = (at or datetime.now(UTC)).astimezone(UTC)
    return json.dumps({"type": event_type,
                       "timestamp": moment.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                       "data": data}, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True)
class Outbound:
    """One event to enqueue: its type, body, id (the webhook-ids derive from it) and time."""

    event_type: str
    data: dict[str, Any]
    event_id: str
    at: datetime | None = field(default=None)

    @property
    def body(self) -> str:
        return envelope(self.event_type, self.data, self.at)


# Every event's deliveries to every active endpoint subscribed to it, in one statement,
# none twice (webhook_id); in the events' order, then the endpoints'. Each body is sent once.
_TO_SUBSCRIBERS = (
    "INSERT INTO webhook_deliveries (endpoint_id, webhook_id, event_type, event_id, body)"
    f" SELECT e.id, {_WEBHOOK_ID_SQL}, v.event_type, v.event_id, v.body"
    " FROM unnest($1::text[], $2::text[], $3::text[]) WITH ORDINALITY AS v(event_type, event_id, body, n)"
    " JOIN webhook_endpoints e ON e.status <> 'disabled'"
    "  AND (v.event_type = ANY (e.events) OR '*' = ANY (e.events))"
    " WHERE (SELECT ordermill_heard_here($4::text))"
    " ORDER BY v.n, e.id"
    " ON CONFLICT (webhook_id) DO NOTHING")
# One event to one endpoint, subscribed or not (not to a disabled or missing one).
_TO_ENDPOINT = (
    "INSERT INTO webhook_deliveries (endpoint_id, webhook_id, event_type, event_id, body)"
    f" SELECT e.id, {_WEBHOOK_ID_SQL}, v.event_type, v.event_id, v.body"
    " FROM (VALUES ($2::text, $3::text, $4::text)) AS v(event_type, event_id, body)"
    " JOIN webhook_endpoints e ON e.id = $1 AND e.status <> 'disabled'"
    " ON CONFLICT (webhook_id) DO NOTHING")


# The routing keys some active endpoint is subscribed to (`*`: every one), for the worker's
# read before a batch's transaction (WorkerSpec.wanted): the same condition as _TO_SUBSCRIBERS.
_SUBSCRIBED_KEYS = ("SELECT coalesce(array_agg(DISTINCT k), '{}') FROM webhook_endpoints e,"
                    " unnest(e.events) AS k WHERE e.status <> 'disabled'")


async def subscribed(events: Sequence[tuple[str, Any]], conn: asyncpg.Connection) -> list[bool]:
    """Which of a batch's events (routing key, message) some active endpoint subscribes to: one
    read of the subscriptions for the batch. Most providers subscribe nothing: their events
    then cost the worker this read and no transaction."""
    keys = set(await conn.fetchval(_SUBSCRIBED_KEYS))
    if ALL in keys:
        return [True] * len(events)
    return [key in keys for key, _ in events]


def _count(status: str) -> int:
    return int(status.rpartition(" ")[2])


async def enqueue(conn: asyncpg.Connection, events: Sequence[Outbound]) -> int:
    """One delivery per event and active endpoint subscribed to its type, in one statement
    (a batch of events: still one); returns how many were new. As a unit of work's deferred
    write (`uow.defer(enqueue, event)`), the events of every message sharing the
    transaction go in together. The sender of this process, when it runs here, is woken in
    memory after the commit (wakeup.heard_here)."""
    if not events:
        return 0
    return _count(await conn.execute(
        _TO_SUBSCRIBERS, [e.event_type for e in events], [e.event_id for e in events],
        [e.body for e in events], heard_here(conn, DELIVERIES.channel)))


async def enqueue_to_subscribers(conn: asyncpg.Connection, event_type: str, data: dict[str, Any],
                                 *, event_id: str, at: datetime | None = None) -> int:
    """One delivery per active endpoint subscribed to `event_type`; returns how many were new."""
    return await enqueue(conn, [Outbound(event_type, data, event_id, at)])


async def enqueue_to_endpoint(conn: asyncpg.Connection, endpoint_id: int, event_type: str,
                              data: dict[str, Any], *, event_id: str,
                              at: datetime | None = None) -> int:
    """A delivery to one endpoint (staff alerts naming an endpoint, the CLI's test event),
    subscribed or not; nothing to a disabled or missing endpoint. Returns 1 if new, else 0."""
    return _count(await conn.execute(_TO_ENDPOINT, endpoint_id, event_type, event_id,
                                     envelope(event_type, data, at)))
