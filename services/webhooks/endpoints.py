"""Endpoints as configuration: what `ordermill webhooks` reads and writes (directly in the
database, like `ordermill catalog load`: an endpoint is configuration, not an event).

A secret is returned only by `add` and `rotate`, the one time it is shown; every listing
leaves secrets out. Errors are `WebhookError`, one line each."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from services.webhooks import signing
from services.webhooks.addresses import Lookup, Policy, system_lookup, vet_url
from services.webhooks.outbound import ALL, EVENT_TYPES, TEST_EVENT, enqueue_to_endpoint
from services.webhooks.sealing import Sealer


class WebhookError(Exception):
    """A mistake in a webhooks command (an unknown endpoint, a refused URL): one line."""


def event_list(raw: str) -> list[str]:
    events = sorted({part.strip() for part in raw.split(",") if part.strip()})
    if not events:
        raise WebhookError("--events names no event type")
    unknown = [e for e in events if e != ALL and e not in EVENT_TYPES]
    if unknown:
        raise WebhookError(f"unknown event type {unknown[0]!r}; known: {', '.join(EVENT_TYPES)}"
                           f" (or {ALL} for all)")
    return [ALL] if ALL in events else events


def _checked_secret(secret: str | None) -> str:
    if secret is None:
        return signing.new_secret()
    try:
        signing.key_of(secret)
    except signing.SecretError as exc:
        raise WebhookError(str(exc)) from None
    return secret


def _view(row: asyncpg.Record) -> dict[str, Any]:
    until = row["previous_secret_until"]
    return {
        "id": row["id"], "url": row["url"], "events": list(row["events"]),
        "status": row["status"], "status_reason": row["status_reason"],
        "description": row["description"], "created_at": row["created_at"].isoformat(),
        "previous_secret_until": until.isoformat() if until and until > datetime.now(UTC) else None,
    }


async def add(conn: asyncpg.Connection, url: str, events: Sequence[str], *, policy: Policy,
              sealer: Sealer, secret: str | None = None, description: str | None = None,
              lookup: Lookup = system_lookup) -> tuple[dict[str, Any], str]:
    """A new endpoint (its URL checked against the SSRF rules now, and again at every
    delivery); returns it and its secret (generated when none is given)."""
    try:
        await vet_url(url, policy, lookup)
    except ValueError as exc:
        raise WebhookError(f"endpoint refused: {exc}") from None
    secret = _checked_secret(secret)
    row = await conn.fetchrow(
        "INSERT INTO webhook_endpoints (url, events, secret, description) VALUES ($1, $2, $3, $4)"
        " RETURNING *", url, list(events), sealer.seal(secret), description)
    return _view(row), secret


async def endpoints(conn: asyncpg.Connection) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        "SELECT e.*, count(d.id) FILTER (WHERE d.status IN ('pending', 'sending')) AS waiting,"
        " count(d.id) FILTER (WHERE d.status = 'parked') AS parked,"
        " count(d.id) FILTER (WHERE d.status = 'delivered') AS delivered"
        " FROM webhook_endpoints e LEFT JOIN webhook_deliveries d ON d.endpoint_id = e.id"
        " GROUP BY e.id ORDER BY e.id")
    return [{**_view(r), "waiting": r["waiting"], "parked": r["parked"],
             "delivered": r["delivered"]} for r in rows]


async def _endpoint(conn: asyncpg.Connection, endpoint_id: int, lock: bool = False) -> asyncpg.Record:
    row = await conn.fetchrow("SELECT * FROM webhook_endpoints WHERE id = $1"
                              + (" FOR UPDATE" if lock else ""), endpoint_id)
    if row is None:
        raise WebhookError(f"no webhook endpoint {endpoint_id}")
    return row


async def remove(conn: asyncpg.Connection, endpoint_id: int) -> None:
    """The endpoint, its deliveries and their log are deleted: nothing more is sent to it."""
    if await conn.fetchval("DELETE FROM webhook_endpoints WHERE id = $1 RETURNING true",
                           endpoint_id) is None:
        raise WebhookError(f"no webhook endpoint {endpoint_id}")


async def enable(conn: asyncpg.Connection, endpoint_id: int) -> None:
    await _endpoint(conn, endpoint_id)
    await conn.execute("UPDATE webhook_endpoints SET status = 'active', status_reason = NULL,"
                       " updated_at = now() WHERE id = $1", endpoint_id)


async def rotate(conn: asyncpg.Connection, endpoint_id: int, *, sealer: Sealer, hours: float,
                 secret: str | None = None) -> tuple[str, datetime]:
    """A new secret; the current one goes on signing (a second signature) for `hours`."""
    secret = _checked_secret(secret)
    async with conn.transaction():
        row = await _endpoint(conn, endpoint_id, lock=True)
        until = datetime.now(UTC) + timedelta(hours=hours)
        await conn.execute(
            "UPDATE webhook_endpoints SET secret = $2, previous_secret = $3,"
            " previous_secret_until = $4, updated_at = now() WHERE id = $1",
            endpoint_id, sealer.seal(secret), row["secret"], until)
    return secret, until


def _delivery(row: asyncpg.Record) -> dict[str, Any]:
    return {
        "id": row["id"], "webhook_id": row["webhook_id"], "event_type": row["event_type"],
        "status": row["status"], "attempts": row["attempts"],
        "next_attempt_at": (row["next_attempt_at"].isoformat()
                            if row["status"] in ("pending", "sending") else None),
        "last_error": row["last_error"], "created_at": row["created_at"].isoformat(),
        "delivered_at": row["delivered_at"].isoformat() if row["delivered_at"] else None,
        "log": [{"attempt": a["attempt"], "outcome": a["outcome"],
                 "status_code": a["status_code"], "duration_ms": a["duration_ms"],
                 "response": a["response"], "error": a["error"],
                 "at": a["created_at"].isoformat()} for a in row["log"] or []],
    }


async def deliveries(conn: asyncpg.Connection, endpoint_id: int, limit: int) -> list[dict[str, Any]]:
    """The newest deliveries to the endpoint, each with its attempts (the delivery log)."""
    await _endpoint(conn, endpoint_id)
    rows = await conn.fetch(
        "SELECT d.*, (SELECT array_agg(a ORDER BY a.id) FROM webhook_attempts a"
        "  WHERE a.delivery_id = d.id) AS log"
        " FROM webhook_deliveries d WHERE d.endpoint_id = $1 ORDER BY d.id DESC LIMIT $2",
        endpoint_id, limit)
    return [_delivery(r) for r in rows]


async def replay(conn: asyncpg.Connection, delivery_id: int) -> str:
    """Send a delivery again (parked, cancelled or delivered), with the same webhook-id and
    a fresh retry schedule. Returns its webhook-id."""
    async with conn.transaction():
        row = await conn.fetchrow(
            "SELECT d.status, d.webhook_id, e.status AS endpoint_status FROM webhook_deliveries d"
            " JOIN webhook_endpoints e ON e.id = d.endpoint_id WHERE d.id = $1 FOR UPDATE OF d",
            delivery_id)
        if row is None:
            raise WebhookError(f"no webhook delivery {delivery_id}")
        if row["endpoint_status"] == "disabled":
            raise WebhookError(f"delivery {delivery_id}'s endpoint is disabled:"
                               " `ordermill webhooks enable` it first")
        if row["status"] in ("pending", "sending"):
            raise WebhookError(f"delivery {delivery_id} is {row['status']} already")
        await conn.execute(
            "UPDATE webhook_deliveries SET status = 'pending', attempts = 0, next_attempt_at = now(),"
            " lease_until = NULL, last_error = NULL, updated_at = now() WHERE id = $1", delivery_id)
    return row["webhook_id"]


async def replay_parked(conn: asyncpg.Connection, endpoint_id: int) -> int:
    """Every parked delivery of the endpoint, sent again. Returns how many."""
    row = await _endpoint(conn, endpoint_id)
    if row["status"] == "disabled":
        raise WebhookError(f"endpoint {endpoint_id} is disabled: `ordermill webhooks enable` it first")
    status = await conn.execute(
        "UPDATE webhook_deliveries SET status = 'pending', attempts = 0, next_attempt_at = now(),"
        " lease_until = NULL, last_error = NULL, updated_at = now()"
        " WHERE endpoint_id = $1 AND status = 'parked'", endpoint_id)
    return int(status.rpartition(" ")[2])


async def send_test(conn: asyncpg.Connection, endpoint_id: int) -> int:
    """A `webhook.test` delivery to the endpoint; returns its delivery id."""
    row = await _endpoint(conn, endpoint_id)
    if row["status"] == "disabled":
        raise WebhookError(f"endpoint {endpoint_id} is disabled: `ordermill webhooks enable` it first")
    event_id = f"test-{uuid.uuid4()}"
    async with conn.transaction():
        await enqueue_to_endpoint(conn, endpoint_id, TEST_EVENT,
                                  {"endpoint_id": endpoint_id, "message": "a test from Ordermill"},
                                  event_id=event_id)
        return await conn.fetchval(
            "SELECT id FROM webhook_deliveries WHERE event_id = $1 AND endpoint_id = $2",
            event_id, endpoint_id)


async def first_attempt(conn: asyncpg.Connection, delivery_id: int) -> dict[str, Any] | None:
    row = await conn.fetchrow(
        "SELECT outcome, status_code, duration_ms, response, error FROM webhook_attempts"
        " WHERE delivery_id = $1 ORDER BY id LIMIT 1", delivery_id)
    return dict(row) if row else None
