"""The unit of work a handler receives: one transaction, and the outbox to emit events into."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg
from pydantic import BaseModel

from shared.contracts import Event as EventBody
from shared.outbox import CHANNEL as OUTBOX_CHANNEL
from shared.parties import Party
from shared.wakeup import heard_here

log = logging.getLogger("ordermill.uow")

# Queues a reply may go to: one the broker named for its sender (an exclusive, auto-delete
# queue declared without a name: clients cannot declare names under `amq.`), or the direct
# reply-to pseudo-queue. Never a work queue or anyone else's named queue.
REPLY_QUEUE_PREFIXES = ("amq.gen-", "amq.rabbitmq.reply-to")


def is_reply_queue(name: str) -> bool:
    return name.startswith(REPLY_QUEUE_PREFIXES) and len(name) <= 255 and "\x00" not in name

# Event ids derive from the cause, so re-running a handler (a transient retry,
# a sweeper's re-drive) writes the same event id and consumers dedupe it.
_EVENT_NS = uuid.UUID("5b0c7a2e-3f5e-4f43-9d55-0f4a8d2b9c11")


def event_id(*parts: object) -> uuid.UUID:
    return uuid.uuid5(_EVENT_NS, ":".join(map(str, parts)))


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


# A write a handler leaves to the end of its transaction: called once with the items of
# every unit of work sharing the transaction (a batch under load), so that N messages cost
# one statement, not N (the webhooks worker's deliveries).
Deferred = Callable[[asyncpg.Connection, Sequence[Any]], Awaitable[object]]

# (message id, routing key, body, correlation id, direct, source: the service that wrote it)
Event = tuple[uuid.UUID, str, dict[str, object], str | None, bool, str | None]
# Events as one statement: executemany would run the insert (and the outbox's NOTIFY
# trigger) once per event. $7: the relay of this process publishes them, woken in memory
# after the commit (wakeup.heard_here), or NULL: the trigger notifies every relay.
_INSERT_EVENTS = (
    "INSERT INTO outbox (message_id, routing_key, body, correlation_id, direct, source)"
    " SELECT m, k, b::jsonb, c, d, s FROM unnest($1::uuid[], $2::text[], $3::text[],"
    " $4::text[], $5::bool[], $6::text[]) AS e(m, k, b, c, d, s)"
    " WHERE (SELECT ordermill_heard_here($7::text))"
    " ON CONFLICT (message_id) DO NOTHING"
)


async def _insert(conn: asyncpg.Connection, events: list[Event], *, here: bool = False) -> None:
    """`here`: the events are this process's services' own (a unit of work's), which its own
    relay publishes; others' (a sweeper's, written for another service) notify every relay."""
    if not events:
        return
    ids, keys, bodies, correlations, direct, sources = zip(*events, strict=True)
    await conn.execute(_INSERT_EVENTS, list(ids), list(keys),
                       [json.dumps(body) for body in bodies], list(correlations), list(direct),
                       list(sources), heard_here(conn, OUTBOX_CHANNEL) if here else None)


def _payload(body: BaseModel | dict[str, object]) -> dict[str, object]:
    if isinstance(body, EventBody):
        return body.payload()
    return body.model_dump(mode="json") if isinstance(body, BaseModel) else body


def _key_and_body(event: EventBody | str, body: BaseModel | dict[str, object] | None
                  ) -> tuple[str, dict[str, object]]:
    """An event's routing key (from its class) and body. The older form, a key and a body,
    is still read while callers move over; Ordermill's own code emits contract classes."""
    if isinstance(event, str):
        if body is None:
            raise TypeError(f"{event}: an event needs a body")
        return event, _payload(body)
    if body is not None:
        raise TypeError("an event's class names its routing key: pass the event alone")
    key = getattr(type(event), "routing_key", None)
    if key is None:
        raise TypeError(f"{type(event).__name__} has no routing key: it cannot be emitted")
    return key, event.payload()


async def write_event(
    conn: asyncpg.Connection,
    event: EventBody | str,
    body: BaseModel | dict[str, object] | None = None,
    *,
    message_id: uuid.UUID,
    correlation_id: str | None,
    source: str | None = None,
) -> None:
    """An event written outside a handler (a sweeper's, a rejection): `source` is the
    service whose relay, and RabbitMQ user, publishes it (None: any relay)."""
    routing_key, payload = _key_and_body(event, body)
    await _insert(conn, [(message_id, routing_key, payload, correlation_id, False, source)])


async def write_reply(
    conn: asyncpg.Connection, reply_to: str, body: BaseModel, *, message_id: uuid.UUID,
    correlation_id: str | None, source: str | None,
) -> bool:
    """A reply written outside a handler (a refused command's answer): only to the sender's
    own reply queue, as `UnitOfWork.reply`. Whether it was written."""
    if not is_reply_queue(reply_to):
        return False
    await _insert(conn, [(message_id, reply_to, _payload(body), correlation_id, True, source)])
    return True


async def write_history(
    conn: asyncpg.Connection, order_id: int, *, actor: str, action: str,
    from_status: str | None = None, to_status: str | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    """The one statement that writes an order's history (handlers go through
    `UnitOfWork.history`; the state machine and the CLI call it with their connection)."""
    await conn.execute(
        "INSERT INTO order_history (order_id, actor, action, from_status, to_status, detail)"
        " VALUES ($1, $2, $3, $4, $5, $6)",
        order_id, actor, action, from_status, to_status, detail or {},
    )


# A history row left to the end of its transaction (`UnitOfWork.history_later`):
# (order_id, actor, action, from_status, to_status, detail).
HistoryRow = tuple[int, str, str, str | None, str | None, dict[str, Any]]


async def write_histories(conn: asyncpg.Connection, rows: Sequence[HistoryRow]) -> None:
    """Several rows of history in one statement, in the order given (a shared transaction's
    rows: one round trip, however many units of work wrote them)."""
    if not rows:
        return
    order_ids, actors, actions, froms, tos, details = zip(*rows, strict=True)
    await conn.execute(
        "INSERT INTO order_history (order_id, actor, action, from_status, to_status, detail)"
        " SELECT o, a, k, f, t, d::jsonb FROM unnest($1::bigint[], $2::text[], $3::text[],"
        " $4::text[], $5::text[], $6::text[]) WITH ORDINALITY AS h(o, a, k, f, t, d, n)"
        " ORDER BY n",
        list(order_ids), list(actors), list(actions), list(froms), list(tos),
        [json.dumps(detail) for detail in details])


@dataclass
class UnitOfWork:
    conn: asyncpg.Connection
    context: MessageContext
    # The message its events trace back to (their correlation_id), when not the one handled:
    # a job's events trace back to the message that made the job needed.
    caused_by: str | None = None
    prepared: Any = None  # what the route's prepare step returned (a remote score), if any
    loaded: Any = None  # what the route's load step read for it with its batch, if any
    _emitted: int = field(default=0, init=False)
    _events: list[Event] = field(default_factory=list, init=False)
    _deferred: list[tuple[Deferred, Any]] = field(default_factory=list, init=False)

    @property
    def actor(self) -> str:
        return self.context.user_id or self.context.consumer

    def emit(self, event: EventBody | str,
             body: BaseModel | dict[str, object] | None = None) -> uuid.UUID:
        """Add an event to this transaction's outbox rows; the relay publishes it after commit.
        Its routing key is its class's (`uow.emit(OrderPlaced(...))`)."""
        routing_key, payload = _key_and_body(event, body)
        self._emitted += 1
        ctx = self.context
        message_id = event_id(ctx.consumer, ctx.message_id, routing_key, self._emitted)
        self._events.append((message_id, routing_key, payload, self.caused_by or ctx.message_id,
                             False, ctx.consumer))
        return message_id

    async def history(self, order_id: int, action: str, *,
                      detail: dict[str, Any] | None = None,
                      from_status: str | None = None, to_status: str | None = None,
                      actor: str | None = None) -> None:
        """A row of the order's history, in this transaction; by this message's actor unless
        named."""
        await write_history(self.conn, order_id, actor=actor or self.actor, action=action,
                          from_status=from_status, to_status=to_status, detail=detail)

    def history_later(self, order_id: int, action: str, *,
                      detail: dict[str, Any] | None = None) -> None:
        """As `history`, written at the end of the transaction with every other unit of
        work's sharing it (`defer`): one statement for a batch, not one each. Only where
        nothing in the transaction reads the history back."""
        self.defer(write_histories,
                   (order_id, self.actor, action, None, None, detail or {}))

    def reply(self, body: BaseModel | dict[str, object]) -> None:
        """Answer the message's `reply_to` queue, with its correlation_id, after commit.

        Replies go only to the sender's own reply queue (`is_reply_queue`): a server-named
        `amq.gen-...` queue or the direct reply-to pseudo-queue. A `reply_to` naming any other
        queue (a work queue such as `<ns>.provisioning`, published to through the default
        exchange, would take the reply as a message of its own) is not answered: the command
        is still carried out, as its sender asked, and the refused reply is logged with the
        reason. (Refusing the command would let a bad reply_to undo an operator's action for
        nothing; the sender that gave it cannot be answered either way.)"""
        ctx = self.context
        if not ctx.reply_to:
            return
        if not is_reply_queue(ctx.reply_to):
            log.warning("reply not sent: reply_to is not the sender's own reply queue", extra={
                "consumer": ctx.consumer, "message_id": ctx.message_id,
                "reply_to": ctx.reply_to[:200], "user_id": ctx.user_id,
                "reason": "replies go only to amq.gen-* or amq.rabbitmq.reply-to queues"})
            return
        self._events.append((event_id(ctx.consumer, ctx.message_id, "reply"), ctx.reply_to,
                             _payload(body), ctx.correlation_id, True, ctx.consumer))

    def defer(self, write: Deferred, item: Any) -> None:
        """Leave `item` to `write(conn, items)`, called once, after every handler of the
        transaction returned and before its events are written, with the items of all of
        them in order. Nothing written now is visible to this handler: for writes nobody in
        the transaction reads back (the webhooks worker's deliveries)."""
        self._deferred.append((write, item))

    def take_deferred(self) -> list[tuple[Deferred, Any]]:
        deferred, self._deferred = self._deferred, []
        return deferred

    def take_events(self) -> list[Event]:
        events, self._events = self._events, []
        return events


async def flush_events(conn: asyncpg.Connection, uows: list[UnitOfWork]) -> None:
    """Before commit: the deferred writes of these units of work (one call per writer, with
    all their items), then their events in one statement."""
    writes: dict[Deferred, list[Any]] = {}
    for uow in uows:
        for write, item in uow.take_deferred():
            writes.setdefault(write, []).append(item)
    for write, items in writes.items():
        await write(conn, items)
    await _insert(conn, [event for uow in uows for event in uow.take_events()], here=True)
