"""The unit of work a handler receives: one transaction, and the outbox to emit events into."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from datetime import datetime

import asyncpg
from pydantic import BaseModel

from shared.parties import Party

# Event ids derive from the cause, so re-running a handler (a transient retry,
# a sweeper's re-drive) writes the same event id and consumers dedupe it.
_EVENT_NS = uuid.UUID("5b0c7a2e-3f5e-4f43-9d55-0f4a8d2b9c11")


def event_id(*parts: object) -> uuid.UUID:
    return uuid.uuid5(_EVENT_NS, ":".join(str(p) for p in parts))


@dataclass(frozen=True)
class MessageContext:
    consumer: str
    message_id: str
    routing_key: str
    received_at: datetime
    # The publisher it acts for: the user_id RabbitMQ validated against the connection's
    # user, or, for an operator's replay, the first publisher (shared/parties.py).
    user_id: str | None = None
    parties: frozenset[Party] = frozenset()  # what that user is (storefront, operator, ...)
    authorized: bool = True  # false only on routes that handle unauthorized senders
    replayed_by: str | None = None  # the operator who replayed it from a dead-letter queue
    correlation_id: str | None = None
    reply_to: str | None = None
    # A message with an expiration (an operator's command: its sender stops waiting then)
    # must not be carried out after it; the broker drops it only while it is still queued.
    expires_at: datetime | None = None


# (message id, routing key, body, correlation id, direct, source: the service that wrote it)
Event = tuple[uuid.UUID, str, dict[str, object], str | None, bool, str | None]
# Events as one statement: executemany would run the insert (and the outbox's NOTIFY
# trigger) once per event.
_INSERT_EVENTS = (
    "INSERT INTO outbox (message_id, routing_key, body, correlation_id, direct, source)"
    " SELECT m, k, b::jsonb, c, d, s FROM unnest($1::uuid[], $2::text[], $3::text[],"
    " $4::text[], $5::bool[], $6::text[]) AS e(m, k, b, c, d, s)"
    " ON CONFLICT (message_id) DO NOTHING"
)


async def _insert(conn: asyncpg.Connection, events: list[Event]) -> None:
    if not events:
        return
    ids, keys, bodies, correlations, direct, sources = zip(*events, strict=True)
    await conn.execute(_INSERT_EVENTS, list(ids), list(keys),
                       [json.dumps(body) for body in bodies], list(correlations), list(direct),
                       list(sources))


def _payload(body: BaseModel | dict[str, object]) -> dict[str, object]:
    return body.model_dump(mode="json") if isinstance(body, BaseModel) else body


async def write_event(
    conn: asyncpg.Connection,
    routing_key: str,
    body: BaseModel | dict[str, object],
    *,
    message_id: uuid.UUID,
    correlation_id: str | None,
    source: str | None = None,
) -> None:
    """An event written outside a handler (a sweeper's, a rejection): `source` is the
    service whose relay, and RabbitMQ user, publishes it (None: any relay)."""
    await _insert(conn, [(message_id, routing_key, _payload(body), correlation_id, False,
                          source)])


@dataclass
class UnitOfWork:
    conn: asyncpg.Connection
    context: MessageContext
    _emitted: int = field(default=0, init=False)
    _events: list[Event] = field(default_factory=list, init=False)

    @property
    def actor(self) -> str:
        return self.context.user_id or self.context.consumer

    def emit(self, routing_key: str, body: BaseModel | dict[str, object]) -> uuid.UUID:
        """Add an event to this transaction's outbox rows; the relay publishes it after commit."""
        self._emitted += 1
        ctx = self.context
        message_id = event_id(ctx.consumer, ctx.message_id, routing_key, self._emitted)
        self._events.append((message_id, routing_key, _payload(body), ctx.message_id, False,
                             ctx.consumer))
        return message_id

    def reply(self, body: BaseModel | dict[str, object]) -> None:
        """Answer the message's `reply_to` queue, with its correlation_id, after commit."""
        ctx = self.context
        if not ctx.reply_to:
            return
        self._events.append((event_id(ctx.consumer, ctx.message_id, "reply"), ctx.reply_to,
                             _payload(body), ctx.correlation_id, True, ctx.consumer))

    def take_events(self) -> list[Event]:
        events, self._events = self._events, []
        return events


async def flush_events(conn: asyncpg.Connection, uows: list[UnitOfWork]) -> None:
    """Write the events of these units of work in one statement, before commit."""
    await _insert(conn, [event for uow in uows for event in uow.take_events()])
