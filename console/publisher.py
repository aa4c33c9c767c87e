"""How the console acts: review commands published as its own RabbitMQ user, answered on
one reply queue, over one connection per console process (not one per request).

`Publisher` is what the pages use; `AmqpPublisher` is the real one. Tests of the pages may
use `FlowPublisher` (console/testing.py), which hands the same commands to the review worker
through the broker-free harness."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Any, Protocol

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection
from aio_pika.exceptions import PublishError

from cli import broker_ops
from shared import broker
from shared.topology import Names

log = logging.getLogger("ordermill.console")

Reply = dict[str, Any]


class Unavailable(Exception):
    """RabbitMQ cannot take the command now: said to the operator in one line."""


class Publisher(Protocol):
    async def review(self, body: dict[str, Any], *, wait_seconds: float) -> Reply | None:
        """Publish one review command; its ReviewReply, or None when unanswered in time
        (the command then expires unapplied: it carries an AMQP expiration)."""
        ...

    async def queue_depths(self) -> list[dict[str, Any]] | None:
        """Every queue's depth and consumers (None: the broker cannot be asked now)."""
        ...

    async def close(self) -> None: ...


class AmqpPublisher:
    """One robust connection, one publisher channel (confirms), one server-named reply queue
    (`amq.gen-...`, the only kind the review service answers) consumed for every answer."""

    def __init__(self, amqp_url: str, namespace: str, user: str | None) -> None:
        self._url = amqp_url
        self.names = Names(namespace)
        self.user = user
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._replies: aio_pika.Queue | None = None
        self._waiting: dict[str, asyncio.Future[Reply]] = {}
        self._lock = asyncio.Lock()
        self._depths: tuple[float, list[dict[str, Any]]] | None = None

    async def start(self, attempts: int) -> None:
        self._connection = await broker.connect(self._url, attempts=attempts)
        # A reconnected connection has lost the exclusive reply queue: made again on next use.
        self._connection.reconnect_callbacks.add(lambda *_: self._forget_channel())

    def _forget_channel(self) -> None:
        self._channel = self._replies = None

    async def _ready(self) -> tuple[AbstractChannel, aio_pika.Queue]:
        async with self._lock:
            if self._connection is None:
                raise Unavailable("the console has no broker connection")
            if self._channel is None or self._channel.is_closed or self._replies is None:
                channel = await broker.open_publisher(self._connection)
                replies = await broker.declare_reply_queue(channel)
                await replies.consume(self._on_reply, no_ack=True)
                self._channel, self._replies = channel, replies
            return self._channel, self._replies

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        future = self._waiting.pop(message.correlation_id or "", None)
        if future is not None and not future.done():
            try:
                future.set_result(json.loads(message.body))
            except ValueError:
                future.set_result({"ok": False, "error": "the answer was not JSON"})

    async def review(self, body: dict[str, Any], *, wait_seconds: float) -> Reply | None:
        try:
            channel, replies = await self._ready()
            exchange = await channel.get_exchange(self.names.exchange, ensure=False)
        except (OSError, aio_pika.exceptions.AMQPError) as exc:
            raise Unavailable(f"RabbitMQ is not reachable: {exc}") from None
        correlation = str(uuid.uuid4())
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._waiting[correlation] = future
        try:
            await broker.publish(exchange, "review.command", broker.json_message(
                body, routing_key="review.command", correlation_id=correlation,
                reply_to=replies.name, user_id=self.user, expiration=wait_seconds))
            return await asyncio.wait_for(future, wait_seconds)
        except TimeoutError:
            return None
        except PublishError:
            raise Unavailable("no queue takes review.command: run `ordermill migrate`") from None
        except (OSError, aio_pika.exceptions.AMQPError) as exc:
            self._forget_channel()
            raise Unavailable(f"RabbitMQ refused the command: {exc}") from None
        finally:
            self._waiting.pop(correlation, None)

    async def queue_depths(self) -> list[dict[str, Any]] | None:
        # The dashboard refreshes every few seconds, in every operator's browser: asked at
        # most once a second per console (passive declares, no management plugin).
        now = time.monotonic()
        if self._depths is not None and now - self._depths[0] < 1.0:
            return self._depths[1]
        if self._connection is None or self._connection.is_closed:
            return None
        try:
            depths = await broker_ops.queue_depths(self._connection, self.names)
        except (OSError, aio_pika.exceptions.AMQPError) as exc:
            log.warning("queue depths unavailable", extra={"error": str(exc)})
            return None
        self._depths = (now, depths)
        return depths

    async def close(self) -> None:
        for future in self._waiting.values():
            future.cancel()
        if self._connection is not None:
            await self._connection.close()
            self._connection = None
