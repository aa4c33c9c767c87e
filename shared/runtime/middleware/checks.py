"""Property checks: the properties a handler, a reply or a dead letter reads, before anything
else. A property that cannot be read, stored or sent again is the message's fault."""

from __future__ import annotations

import operator
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta

from aio_pika.abc import AbstractIncomingMessage

from shared import broker
from shared.errors import Rejected, RejectKind
from shared.runtime.chain import Middleware, Next
from shared.runtime.text import body_id, first_line
from shared.runtime.work import Batch

_TEXT_PROPERTIES = ("correlation_id", "reply_to", "type", "user_id", "content_type",
                    "content_encoding", "app_id", "routing_key")
_read_texts = operator.attrgetter(*_TEXT_PROPERTIES)  # all of them in one call


class PropertyChecks(Middleware):
    def __call__(self, batch: Batch, call_next: Next) -> Awaitable[None]:
        for item in batch.items:
            try:  # any failure to read a property is the message's fault, never the worker's
                item.key = item.message.routing_key or item.message.type or ""
                item.message_id = checked_message_id(item.message)
                item.expires_at = checked_properties(item.message)
            except Rejected as rejection:
                rejection.kind = RejectKind.PROPERTIES
                raise
            except Exception as exc:
                raise Rejected(f"message properties could not be read: {type(exc).__name__}:"
                               f" {first_line(str(exc))}", kind=RejectKind.PROPERTIES) from None
        return call_next(batch)


def checked_message_id(message: AbstractIncomingMessage) -> str:
    """The message's id, or the body's if it has none; one we cannot store or send is bad input."""
    if not message.message_id:
        return body_id(message.body)
    if broker.undecodable(message.message_id):
        raise Rejected("message_id is not valid UTF-8")
    if "\x00" in message.message_id:
        raise Rejected("message_id holds a NUL character")
    return message.message_id


def checked_properties(message: AbstractIncomingMessage) -> datetime | None:
    """The properties a handler or a reply reads, checked as bad input; returns expires_at."""
    if isinstance(message.timestamp, broker.UndecodableTimestamp):
        raise Rejected("timestamp property is not a valid time")
    # Nearly every property is ASCII (ids, keys, user names), and ASCII is always UTF-8: one
    # test of them all together, and the search for the one at fault only when it fails.
    try:
        values = _read_texts(message)
    except AttributeError:  # a message type without some of them: those are None
        values = tuple(getattr(message, name, None) for name in _TEXT_PROPERTIES)
    try:
        ascii_only = "".join(filter(None, values)).isascii()
    except TypeError:  # a property that is not text: looked at one by one
        ascii_only = False
    if not ascii_only:
        for name, value in zip(_TEXT_PROPERTIES, values, strict=True):
            if broker.undecodable(value):
                raise Rejected(f"{name} is not valid UTF-8")
    for name in ("correlation_id", "reply_to"):  # stored with the reply in the outbox (text)
        if "\x00" in (getattr(message, name) or ""):
            raise Rejected(f"{name} holds a NUL character")
    try:
        return expires_at(message)
    except (ValueError, OverflowError, TypeError) as exc:
        raise Rejected(f"timestamp and expiration do not make a valid time:"
                       f" {first_line(str(exc))}") from None


def expires_at(message: AbstractIncomingMessage) -> datetime | None:
    """When its sender stops waiting (an operator's command): timestamp plus expiration."""
    if not message.expiration or message.timestamp is None:
        return None
    sent = message.timestamp
    if sent.tzinfo is None:  # AMQP's timestamp is POSIX seconds: UTC
        sent = sent.replace(tzinfo=UTC)
    return sent + timedelta(seconds=float(message.expiration))
