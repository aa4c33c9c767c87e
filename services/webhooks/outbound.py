"""Enqueueing deliveries: the webhooks worker's handler and the API other components use
(staff alerts), always inside the caller's transaction (its unit of work), so a delivery is
recorded if and only if what caused it is.

    await enqueue_to_subscribers(uow.conn, "order.placed", data, event_id=..., at=...)
    await enqueue_to_endpoint(uow.conn, endpoint_id, "alert.setup_parked", data, event_id=...)

A delivery's `webhook-id` derives from the event id and the endpoint id (`webhook_id_for`):
the same event enqueued twice (a redelivered message, a re-run handler) is one delivery."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg

from shared.contracts import EVENTS

# The routing keys an integrator may subscribe to: every event on the exchange except the
# internal re-drives and commands (docs/contract.md section 10). `*` subscribes to them all.
INTERNAL_KEYS = frozenset({"fraud.redrive", "order.retry", "order.rescreen", "email.send"})
EVENT_TYPES: tuple[str, ...] = tuple(sorted(set(EVENTS) - INTERNAL_KEYS))
ALL = "*"
TEST_EVENT = "webhook.test"  # `ordermill webhooks test`: to one endpoint, never subscribed
_NS = uuid.UUID("0f8a5d1e-6c1b-4a8e-9e5c-7d3b2a1f4e60")


def webhook_id_for(event_id: str, endpoint_id: int) -> str:
    """Stable: the same for every attempt and for a redelivered event (`msg_` and 32 hex)."""
    return "msg_" + uuid.uuid5(_NS, f"{event_id}:{endpoint_id}").hex


def envelope(event_type: str, data: dict[str, Any], at: datetime | None = None) -> str:
    """The body every attempt sends, byte for byte: `{"type", "timestamp", "data"}`."""
    moment = (at or datetime.now(UTC)).astimezone(UTC)
    return json.dumps({"type": event_type,
                       "timestamp": moment.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                       "data": data}, separators=(",", ":"), ensure_ascii=False)


# One statement per event: the subscribed endpoints' deliveries, none twice (webhook_id).
# The id is computed in Python's terms in SQL too: uuid5 needs no extension this way.
_TO_SUBSCRIBERS = (
    "INSERT INTO webhook_deliveries (endpoint_id, webhook_id, event_type, event_id, body)"
    " SELECT e.id, w.webhook_id, $1, $2, $3 FROM webhook_endpoints e"
    " JOIN unnest($4::bigint[], $5::text[]) AS w(endpoint_id, webhook_id) ON w.endpoint_id = e.id"
    " ON CONFLICT (webhook_id) DO NOTHING")


async def subscribers(conn: asyncpg.Connection, event_type: str) -> list[int]:
    return [r[0] for r in await conn.fetch(
        "SELECT id FROM webhook_endpoints WHERE status <> 'disabled'"
        " AND ($1 = ANY (events) OR '*' = ANY (events)) ORDER BY id", event_type)]


async def enqueue_to_subscribers(conn: asyncpg.Connection, event_type: str, data: dict[str, Any],
                                 *, event_id: str, at: datetime | None = None) -> int:
    """One delivery per active endpoint subscribed to `event_type`; returns how many were new."""
    endpoints = await subscribers(conn, event_type)
    if not endpoints:
        return 0
    return await _insert(conn, endpoints, event_type, data, event_id, at)


async def enqueue_to_endpoint(conn: asyncpg.Connection, endpoint_id: int, event_type: str,
                              data: dict[str, Any], *, event_id: str,
                              at: datetime | None = None) -> int:
    """A delivery to one endpoint (staff alerts naming an endpoint, the CLI's test event),
    subscribed or not; nothing to a disabled or missing endpoint. Returns 1 if new, else 0."""
    if not await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM webhook_endpoints WHERE id = $1 AND status <> 'disabled')",
            endpoint_id):
        return 0
    return await _insert(conn, [endpoint_id], event_type, data, event_id, at)


async def _insert(conn: asyncpg.Connection, endpoints: list[int], event_type: str,
                  data: dict[str, Any], event_id: str, at: datetime | None) -> int:
    body = envelope(event_type, data, at)
    ids = [webhook_id_for(event_id, e) for e in endpoints]
    status = await conn.execute(_TO_SUBSCRIBERS, event_type, event_id, body, endpoints, ids)
    return int(status.rpartition(" ")[2])
