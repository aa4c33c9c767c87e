"""Operator views of the broker: queue depth (passive declares) and dead letters."""

from __future__ import annotations

from typing import Any

import aio_pika
from aio_pika.abc import AbstractRobustConnection
from aiormq.exceptions import ChannelNotFoundEntity

from shared import broker
from shared.runtime import REASON_HEADER
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
                    "routing_key": _text(headers.get("x-ordermill-routing-key"))
                    or message.routing_key,
                    "reason": _text(headers.get(REASON_HEADER))
                    or _text(headers.get("x-first-death-reason")) or "unknown",
                    "dead_at": _text(headers.get("x-ordermill-dead-at")) or None,
                    "body": message.body.decode(errors="replace")[:2000],
                })
        finally:
            await channel.close()
    return found


async def replay_dead_letters(
    connection: AbstractRobustConnection, names: Names, which: str | None, *, limit: int
) -> int:
    """Publish dead letters back to the exchange with their routing key and message id."""
    replayed = 0
    publisher = await broker.open_publisher(connection)
    exchange = await publisher.get_exchange(names.exchange)
    for queue_name in _dead_queues(names, which):
        channel = await connection.channel()
        try:
            queue = await channel.declare_queue(queue_name, passive=True)
            while replayed < limit:
                message = await queue.get(no_ack=False, fail=False)
                if message is None:
                    break
                headers = dict(message.headers or {})
                key = _text(headers.get("x-ordermill-routing-key")) or message.routing_key
                replays = int(headers.get("x-ordermill-replays") or 0) + 1
                for header in list(headers):
                    if header.startswith(("x-ordermill-", "x-death", "x-first-death",
                                          "x-last-death")):
                        del headers[header]
                headers["x-ordermill-replays"] = replays
                copy = aio_pika.Message(
                    message.body, content_type=message.content_type,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    message_id=message.message_id, correlation_id=message.correlation_id,
                    reply_to=message.reply_to, type=key, timestamp=message.timestamp,
                    headers=headers,
                )
                await broker.publish(exchange, key, copy)
                await message.ack()
                replayed += 1
        finally:
            await channel.close()
    await publisher.close()
    return replayed
