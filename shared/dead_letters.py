"""Reading a dead letter: what it was first published as, by whom, and why it died.

Two kinds reach a `<queue>.dead`: a worker's copy (published under the worker's own user,
with only Ordermill's `x-ordermill-*` headers) and a message the broker dead-lettered itself
(delivery limit, expiry), which keeps the publisher's headers and user_id and gains the
broker's `x-death` record. What may be believed differs: on a broker dead letter every
`x-ordermill-*` header is the publisher's. The CLI (listing, replay) and the provisioning
worker's dead-payment keeper read them here, the same way.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from aio_pika.abc import AbstractIncomingMessage

from shared import broker
from shared.runtime.text import REASON_HEADER


def text(value: object, limit: int = 1000) -> str:
    """A header's or property's text as an operator may see it: bytes that are not UTF-8 and
    lone surrogates (how a short string that is not UTF-8 decodes) shown escaped, and capped."""
    if isinstance(value, bytes | bytearray):
        shown = bytes(value).decode(errors="backslashreplace")
    else:
        shown = broker.escaped(str(value or ""))
    return shown if len(shown) <= limit else shown[:limit] + "..."


def by_broker(message: AbstractIncomingMessage) -> bool:
    """Dead-lettered by the broker itself (delivery limit, expiry), not by a worker: then
    every header but `x-death` is the publisher's. (A worker's copy never has `x-death`.)"""
    return isinstance((message.headers or {}).get("x-death"), list)


def last_death(message: AbstractIncomingMessage) -> dict[str, Any]:
    """The broker's record of the latest time it dead-lettered the message (`x-death`)."""
    deaths = (message.headers or {}).get("x-death")
    return deaths[0] if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict) else {}


def claimed_key(message: AbstractIncomingMessage) -> str:
    """The routing key the message was first published with, as recorded. A dead letter's own
    key is its queue's (`x-dead-letter-routing-key`): a worker records the first in a header;
    the broker's own dead letters keep it in `x-death`. Only a claim: a publisher can forge
    either, so a user of it checks it against the queue's bindings."""
    if by_broker(message):
        keys = last_death(message).get("routing-keys")
        return text(keys[0], 300) if isinstance(keys, list) and keys else ""
    return text((message.headers or {}).get("x-ordermill-routing-key"), 300)


def death_reason(message: AbstractIncomingMessage) -> str:
    """Why the broker dead-lettered it (`expired`, `delivery_limit`, ...); empty if it did not."""
    return text(last_death(message).get("reason"), 100)


def reason(message: AbstractIncomingMessage) -> str:
    if by_broker(message):  # an x-ordermill-reason there is the publisher's
        return death_reason(message) or "unknown"
    return text((message.headers or {}).get(REASON_HEADER)) or "unknown"


def dead_at(message: AbstractIncomingMessage) -> str | None:
    if by_broker(message):
        when = last_death(message).get("time")
        return when.isoformat() if isinstance(when, datetime) else None
    return text((message.headers or {}).get("x-ordermill-dead-at"), 60) or None


def first_publisher(message: AbstractIncomingMessage, service_users: frozenset[str]) -> str | None:
    """Who published the message first. A worker's copy goes out under the worker's own user
    and names the first publisher in `x-ordermill-user-id`; a message the broker dead-lettered
    keeps its validated user_id. A header on anything else was written by whoever sent it, and
    is not believed."""
    if not by_broker(message) and message.user_id in service_users:
        return text((message.headers or {}).get("x-ordermill-user-id")) or None
    return message.user_id
