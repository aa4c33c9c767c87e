"""Operator views of the broker: queue depth (passive declares) and dead letters."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from aiormq.exceptions import ChannelNotFoundEntity, DeliveryError, PublishError

from shared import broker
from shared.parties import REPLAY_OF_HEADER
from shared.runtime import REASON_HEADER, REDACTED, SECRET_KEYS, redact
from shared.topology import Names


async def queue_depths(connection: AbstractRobustConnection, names: Names) -> list[dict[str, Any]]:
    depths = []
    for queue_name in names.all_queues():
        channel = await connection.channel()
        try:
            queue = await channel.declare_queue(queue_name, passive=True)
            result = queue.declaration_result
            depths.append({"queue": queue_name, "messages": result.message_count,
                           "consumers": result.consumer_count})
        except ChannelNotFoundEntity:
            depths.append({"queue": queue_name, "messages": None, "consumers": None,
                           "missing": True})
        finally:
            if not channel.is_closed:
                await channel.close()
    return depths


def _dead_queues(names: Names, which: str | None) -> list[str]:
    dead = [q for q in names.all_queues() if q.endswith(".dead")]
    if which is None:
        return dead
    service = names.service_of(which) or names.service_of(which.removesuffix(".dead"))
    if service is None:
        known = ", ".join(q.removesuffix(".dead") for q in dead)
        raise ValueError(f"unknown queue {which!r}; known: {known}")
    return [names.dead_queue(service)]


def _text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value or "")


def _original_key(message: AbstractIncomingMessage) -> str:
    """The routing key the message was first published with. A dead letter's own key is its
    queue's (`x-dead-letter-routing-key`): the runtime records the first in a header; the
    broker's own dead letters (delivery limit, expiry) keep it in `x-death`."""
    if key := _text((message.headers or {}).get("x-ordermill-routing-key")):
        return key
    if keys := _last_death(message).get("routing-keys"):
        return _text(keys[0])
    return _text(message.type) or message.routing_key or ""


def _last_death(message: AbstractIncomingMessage) -> dict[str, Any]:
    """The broker's record of the latest time it dead-lettered the message (`x-death`)."""
    deaths = (message.headers or {}).get("x-death")
    return deaths[0] if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict) else {}


def _death_reason(message: AbstractIncomingMessage) -> str:
    """Why the broker dead-lettered it (`expired`, `delivery_limit`, ...); empty if it did not."""
    return (_text(_last_death(message).get("reason"))
            or _text((message.headers or {}).get("x-first-death-reason")))


def _lost_secrets(body: bytes) -> bool:
    """Whether the runtime blanked a secret of this body when it dead-lettered it."""
    def walk(value: Any) -> bool:
        if isinstance(value, dict):
            return any((k in SECRET_KEYS and v == REDACTED) or walk(v) for k, v in value.items())
        return isinstance(value, list) and any(walk(v) for v in value)
    try:
        return walk(json.loads(body))
    except ValueError:
        return False


def _shown_body(body: bytes) -> str:
    """The body as an operator may see it: secrets redacted (the message keeps them)."""
    text = body.decode(errors="replace")
    try:
        data = json.loads(text)
    except ValueError:
        return text[:2000]
    return json.dumps(redact(data))[:2000]


async def dead_letters(
    connection: AbstractRobustConnection, names: Names, which: str | None, *, limit: int
) -> list[dict[str, Any]]:
    """Look without taking: messages are fetched unacknowledged, then returned on channel close."""
    found = []
    for queue_name in _dead_queues(names, which):
        channel = await connection.channel()
        try:
            queue = await channel.declare_queue(queue_name, passive=True)
            for _ in range(limit):
                message = await queue.get(no_ack=False, fail=False)
                if message is None:
                    break
                headers = message.headers or {}
                found.append({
                    "queue": queue_name,
                    "message_id": message.message_id,
                    "routing_key": _original_key(message),
                    "reason": _text(headers.get(REASON_HEADER))
                    or _text(headers.get("x-first-death-reason")) or "unknown",
                    "dead_at": _text(headers.get("x-ordermill-dead-at")) or None,
                    "body": _shown_body(message.body),
                })
        finally:
            await channel.close()
    return found


@dataclass
class Replay:
    replayed: int = 0
    # Expired messages (an operator's review command unanswered in time): their sender was
    # told they expired unapplied, so they are removed, never carried out late.
    discarded: list[str] = field(default_factory=list)
    # (message id, why): left in their dead-letter queue, the others replayed all the same
    failed: list[tuple[str, str]] = field(default_factory=list)


def first_publisher(message: AbstractIncomingMessage, service_users: frozenset[str]) -> str | None:
    """Who published the message first. A worker's dead-letter copy goes out under the
    worker's own user and names the first publisher in `x-ordermill-user-id`; a message the
    broker dead-lettered (delivery limit, expiry) keeps its validated user_id. A header on
    anything else was written by whoever sent it, and is not believed."""
    if message.user_id in service_users:
        return _text((message.headers or {}).get("x-ordermill-user-id")) or None
    return message.user_id


async def replay_dead_letters(
    connection: AbstractRobustConnection, names: Names, which: str | None, *, limit: int,
    user_id: str | None = None, service_users: frozenset[str] = frozenset(),
) -> Replay:
    """Publish dead letters back to the exchange with their first routing key and message id,
    as `user_id` (an operator) for their first publisher: the worker checks that publisher's
    rights, not the operator's (a storefront's order replayed is still the storefront's)."""
    result = Replay()
    publisher = await broker.open_publisher(connection)
    exchange = await publisher.get_exchange(names.exchange)
    for queue_name in _dead_queues(names, which):
        channel = await connection.channel()
        try:
            queue = await channel.declare_queue(queue_name, passive=True)
            # Only those there when the replay began: one the worker dead-letters again while
            # this runs lands at the tail, and would otherwise be replayed round and round.
            present = queue.declaration_result.message_count or 0
            for _ in range(present):
                if result.replayed + len(result.failed) + len(result.discarded) >= limit:
                    break
                message = await queue.get(no_ack=False, fail=False)
                if message is None:
                    break
                if _death_reason(message) == "expired":
                    await message.ack()
                    result.discarded.append(message.message_id or "?")
                    continue
                if _lost_secrets(message.body):
                    # Its secrets (an EPP code) were blanked when it was dead-lettered: replayed,
                    # the transfer would fail at the registrar. Left for an operator to place again.
                    result.failed.append((message.message_id or "?", "its secrets were redacted when"
                                          " it was dead-lettered: place the order again with them"))
                    continue
                headers = dict(message.headers or {})
                key = _original_key(message)
                replays = int(headers.get("x-ordermill-replays") or 0) + 1
                for header in list(headers):
                    if header.startswith(("x-ordermill-", "x-death", "x-first-death",
                                          "x-last-death")):
                        del headers[header]
                headers["x-ordermill-replays"] = replays
                if publisher_of := first_publisher(message, service_users):
                    headers[REPLAY_OF_HEADER] = publisher_of
                copy = aio_pika.Message(
                    message.body, content_type=message.content_type,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    message_id=message.message_id, correlation_id=message.correlation_id,
                    reply_to=message.reply_to, type=key, timestamp=message.timestamp,
                    headers=headers, user_id=user_id,
                )
                try:
                    await broker.publish(exchange, key, copy)
                except (DeliveryError, PublishError) as exc:  # no queue takes that key
                    # Left unacknowledged: back in its queue when the channel closes.
                    result.failed.append((message.message_id or "?", f"{key!r}: {exc}"))
                    continue
                await message.ack()
                result.replayed += 1
        finally:
            await channel.close()
    await publisher.close()
    return result
