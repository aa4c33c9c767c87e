"""The alerts' Slack messages as operators see them: `ordermill notify deliveries` lists them
(parked ones first of all: retries spent, or Slack's 400/403/404/410), `ordermill notify
replay` sends them again, as `ordermill webhooks deliveries/replay` do for webhooks.

A Slack URL is a secret: what is listed names the channel and its host (kept apart from
the URL when the rules were loaded, services/alerts/store.py), never the URL. A replay
sends the message stored with the alert, to the channel of the rule set it was raised
under, with a fresh retry schedule. Errors are `AlertDeliveryError`, one line each."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import asyncpg

from services.alerts import slack
from services.alerts.sender import DELIVERIES

STATES = ("pending", "sending", "delivered", "parked")


class AlertDeliveryError(Exception):
    """A mistake in a `notify` command (an unknown delivery, a state that is none): one line."""


_SELECT = (
    "SELECT d.id, d.alert_id, d.channel, d.status, d.attempts, d.status_code, d.last_error,"
    " d.next_attempt_at, d.created_at, d.updated_at, d.delivered_at,"
    " a.rule, a.trigger, a.title, a.order_id, s.channels -> d.channel ->> 'url' AS stored_url"
    " FROM alert_deliveries d JOIN alerts a ON a.id = d.alert_id"
    " JOIN alert_rule_sets s ON s.id = a.rule_set_id")
_LIST = _SELECT + " WHERE ($1::text IS NULL OR d.status = $1) ORDER BY d.id DESC LIMIT $2"
_ONE = _SELECT + " WHERE d.id = $1"

# Pending again, attempts from zero, now; and the sender woken (its trigger fires on INSERT).
_AGAIN = (
    "UPDATE alert_deliveries SET status = 'pending', attempts = 0, next_attempt_at = now(),"
    " lease_until = NULL, last_error = NULL, status_code = NULL, updated_at = now()"
    " WHERE {} RETURNING id")


def _host(stored_url: str | None) -> str | None:
    """The channel's host from the stored `scheme://host/` (all the rule set keeps in the
    clear); None when the rule set has no such Slack channel."""
    return urlsplit(stored_url).hostname if stored_url else None


def _view(row: asyncpg.Record) -> dict[str, Any]:
    return {
        "id": row["id"], "alert_id": row["alert_id"], "rule": row["rule"],
        "trigger": row["trigger"], "title": row["title"], "order_id": row["order_id"],
        "channel": row["channel"], "host": _host(row["stored_url"]), "status": row["status"],
        "attempts": row["attempts"], "status_code": row["status_code"],
        # Redacted again when shown: rows stored before the sender scrubbed its answers.
        "last_error": slack.redact(row["last_error"]),
        "next_attempt_at": (row["next_attempt_at"].isoformat()
                            if row["status"] in ("pending", "sending") else None),
        "created_at": row["created_at"].isoformat(), "updated_at": row["updated_at"].isoformat(),
        "delivered_at": row["delivered_at"].isoformat() if row["delivered_at"] else None,
    }


async def deliveries(conn: asyncpg.Connection, *, state: str | None = None,
                     limit: int = 20) -> list[dict[str, Any]]:
    """The newest Slack messages (in one state, if given), newest first."""
    if state is not None and state not in STATES:
        raise AlertDeliveryError(f"no state {state!r}; one of {', '.join(STATES)}")
    return [_view(r) for r in await conn.fetch(_LIST, state, limit)]


async def replay(conn: asyncpg.Connection, delivery_id: int) -> dict[str, Any]:
    """Send one message again (parked or delivered). Returns it as listed."""
    async with conn.transaction():
        status = await conn.fetchval(
            "SELECT status FROM alert_deliveries WHERE id = $1 FOR UPDATE", delivery_id)
        if status is None:
            raise AlertDeliveryError(f"no Slack delivery {delivery_id}"
                                     " (`ordermill notify deliveries` lists them)")
        if status in ("pending", "sending"):
            raise AlertDeliveryError(f"Slack delivery {delivery_id} is {status} already")
        await conn.execute(_AGAIN.format("id = $1"), delivery_id)
        await conn.execute("SELECT pg_notify($1, '')", DELIVERIES.channel)
        row = await conn.fetchrow(_ONE, delivery_id)
    return _view(row)


async def replay_parked(conn: asyncpg.Connection) -> int:
    """Every parked message sent again. Returns how many."""
    async with conn.transaction():
        ids = await conn.fetch(_AGAIN.format("status = 'parked'"))
        if ids:
            await conn.execute("SELECT pg_notify($1, '')", DELIVERIES.channel)
    return len(ids)
