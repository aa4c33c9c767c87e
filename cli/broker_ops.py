"""Operator views of the broker: queue depth (passive declares) and dead letters."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from aiormq.exceptions import DeliveryError, PublishError

from shared import broker
from shared import dead_letters as dl
from shared.parties import REPLAY_OF_HEADER
from shared.queue_depths import queue_depths as queue_depths  # its home before shared/
from shared.runtime import REDACTED, REPLAYS_HEADER, SECRET_KEYS, redact
from shared.topology import SERVICE_BINDINGS, Names


def _dead_queues(names: Names, which: str | None) -> list[str]:
    dead = [q for q in names.all_queues() if q.endswith(".dead")]
    if which is None:
        return dead
    service = names.service_of(which) or names.service_of(which.removesuffix(".dead"))
    if service is None:
        known = ", ".join(q.removesuffix(".dead") for q in dead)
        raise ValueError(f"unknown queue {which!r}; known: {known}")
    return [names.dead_queue(service)]


def _original_key(message: AbstractIncomingMessage, service: str) -> tuple[str | None, str]:
    """(the key to replay it with, or None and why not). Only a key the service's work queue
    is bound to: a publisher can write any key into a header (or forge an `x-death` entry that
    the broker keeps), and a replay publishes as the operator."""
    claimed = dl.claimed_key(message)
    bound = SERVICE_BINDINGS.get(service, ())
    if claimed in bound:
        return claimed, ""
    if not claimed:
        return None, "no routing key recorded with it"
    return None, (f"routing key {claimed!r} is not one the {service} queue is bound to"
                  f" ({', '.join(bound)})")


def _unsendable(message: AbstractIncomingMessage) -> str | None:
    """Why the message's properties cannot be published again as they are, if they cannot
    (a value that decoded marked: see shared.broker)."""
    if isinstance(message.timestamp, broker.UndecodableTimestamp):
        return "timestamp property is not a valid time"
    for name in ("message_id", "correlation_id", "reply_to", "content_type"):
        if broker.undecodable(getattr(message, name, None)):
            return f"{name} is not valid UTF-8"
    return None


def _lost_secrets(body: bytes) -> bool:
    """Whether the runtime blanked a secret of this body when it dead-lettered it. A body too
    deep to read was kept as it came (the runtime could not redact it either): none lost."""
    def walk(value: Any) -> bool:
        if isinstance(value, dict):
            return any((k in SECRET_KEYS and v == REDACTED) or walk(v) for k, v in value.items())
        return isinstance(value, list) and any(walk(v) for v in value)
    try:
        return walk(json.loads(body))
    except (ValueError, RecursionError):
        return False


def shown_body(body: bytes) -> str:
    """The body as an operator may see it: secrets redacted (the message keeps them). One too
    deep to read is shown raw, cut short."""
    text = body.decode(errors="replace")
    try:
        return json.dumps(redact(json.loads(text)))[:2000]
    except (ValueError, RecursionError):
        return text[:2000]


async def dead_letters(
    connection: AbstractRobustConnection, names: Names, which: str | None, *, limit: int
) -> list[dict[str, Any]]:
    """Look without taking: messages are fetched unacknowledged, then returned on channel close."""
    found = []
    for queue_name in _dead_queues(names, which):
        channel = await connection.channel()
        try:
            queue = await channel.declare_queue(queue_name, passive=True)
            service = names.service_of(queue_name) or ""
            for _ in range(limit):
                message = await queue.get(no_ack=False, fail=False)
                if message is None:
                    break
                key, why_not = _original_key(message, service)
                found.append({
                    "queue": queue_name,
                    "message_id": dl.text(message.message_id, 300) or None,
                    # The key a replay would use: only one the queue is bound to.
                    "routing_key": key,
                    "reason": dl.reason(message),
                    "dead_at": dl.dead_at(message),
                    "body": shown_body(message.body),
                    **({"not_replayable": why_not} if key is None else {}),
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


async def replay_dead_letters(
    connection: AbstractRobustConnection, names: Names, which: str | None, *, limit: int,
    user_id: str | None = None, service_users: frozenset[str] = frozenset(),
    message_id: str | None = None,
) -> Replay:
    """Publish dead letters back to the exchange with their first routing key and message id,
    as `user_id` (an operator) for their first publisher: the worker checks that publisher's
    rights, not the operator's (a storefront's order replayed is still the storefront's).
    With `message_id`, only that one (the console's Replay button); the others stay."""
    result = Replay()
    publisher = await broker.open_publisher(connection)
    exchange = await publisher.get_exchange(names.exchange)
    for queue_name in _dead_queues(names, which):
        channel = await connection.channel()
        try:
            queue = await channel.declare_queue(queue_name, passive=True)
            service = names.service_of(queue_name) or ""
            # Only those there when the replay began: one the worker dead-letters again while
            # this runs lands at the tail, and would otherwise be replayed round and round.
            present = queue.declaration_result.message_count or 0
            for _ in range(present):
                if result.replayed + len(result.failed) + len(result.discarded) >= limit:
                    break
                message = await queue.get(no_ack=False, fail=False)
                if message is None:
                    break
                if message_id is not None and message.message_id != message_id:
                    continue  # left unacknowledged: back in its queue when the channel closes
                shown_id = dl.text(message.message_id, 300) or "?"
                if dl.by_broker(message) and dl.death_reason(message) == "expired":
                    await message.ack()
                    result.discarded.append(shown_id)
                    continue
                # Left unacknowledged, each refusal below: back in its queue when the channel
                # closes (and not fetched again meanwhile: `present` bounds the loop).
                if _lost_secrets(message.body):
                    # Its secrets (an EPP code) were blanked when it was dead-lettered: replayed,
                    # the transfer would fail at the registrar. Left for an operator to place again.
                    result.failed.append((shown_id, "its secrets were redacted when"
                                          " it was dead-lettered: place the order again with them"))
                    continue
                key, why_not = _original_key(message, service)
                if key is None:
                    result.failed.append((shown_id, why_not))
                    continue
                if problem := _unsendable(message):
                    result.failed.append((shown_id, problem))
                    continue
                # Only the headers Ordermill writes: the runtime's x-ordermill-* describe the
                # dead letter, not the message; anything else is the publisher's.
                replays = (message.headers or {}).get(REPLAYS_HEADER)
                replays = replays if type(replays) is int and 0 < replays < 1_000_000 else 0
                headers: dict[str, Any] = {REPLAYS_HEADER: replays + 1}
                publisher_of = dl.first_publisher(message, service_users)
                if publisher_of and publisher_of != user_id:  # for someone else: say whom
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
                    result.failed.append((shown_id, f"{key!r}: {exc}"))
                    continue
                await message.ack()
                result.replayed += 1
        finally:
            await channel.close()
    await publisher.close()
    return result
