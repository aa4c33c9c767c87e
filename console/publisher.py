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
# The dead-letter queues whose messages the console may replay: those of the routes it may
# send itself (order.place, review.command). The consumer believes its replay header only
# there (shared/parties.py); anything else is replayed by an operator with the CLI.
CONSOLE_REPLAYS = ("placement", "review")


class Unavailable(Exception):
    """RabbitMQ cannot take the command now: said to the operator in one line."""


class Publisher(Protocol):
    async def review(self, body: dict[str, Any], *, wait_seconds: float) -> Reply | None:
        """Publish one review command; its ReviewReply, or None when unanswered in time
        (the command then expires unapplied: it carries an AMQP expiration)."""
        ...

    async def place(self, body: dict[str, Any], *, wait_seconds: float) -> Reply | None:
        """Publish one `order.place` (Add New Order) and wait for placement's PlaceReply:
        the order stored, or why not (None: no answer in time)."""
        ...

    async def queue_depths(self) -> list[dict[str, Any]] | None:
        """Every queue's depth and consumers (None: the broker cannot be asked now)."""
        ...

    async def dead_letters(self, limit: int) -> list[dict[str, Any]] | None:
        """The dead letters, looked at without taking them (None: the broker cannot be
        asked now)."""
        ...

    async def replay(self, queue: str, message_id: str) -> broker_ops.Replay:
        """Replay one dead letter of a queue the console may replay (CONSOLE_REPLAYS)."""
        ...

    async def close(self) -> None: ...


class AmqpPublisher:
    """One robust connection, one publisher channel (confirms), one server-named reply queue
    (`amq.gen-...`, the only kind the review service answers) consumed for every answer."""

    def __init__(self, amqp_url: str, namespace: str, user: str | None,
                 service_users: frozenset[str] = frozenset()) -> None:
        self._url = amqp_url
        self.names = Names(namespace)
        self.user = user
        self.service_users = service_users
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
        return await self._ask("review.command", body, wait_seconds)

    async def place(self, body: dict[str, Any], *, wait_seconds: float) -> Reply | None:
        return await self._ask("order.place", body, wait_seconds, expires=False)

    async def _ask(self, key: str, body: dict[str, Any], wait_seconds: float, *,
                   expires: bool = True) -> Reply | None:
        """Publish and wait for the answer on the reply queue. A review command expires
        unapplied when unanswered; an order does not (placed late, it is still the order the
        operator asked for: its page is found by its ref)."""
        try:
            channel, replies = await self._ready()
            exchange = await channel.get_exchange(self.names.exchange, ensure=False)
        except (OSError, aio_pika.exceptions.AMQPError) as exc:
            raise Unavailable(f"RabbitMQ is not reachable: {exc}") from None
        correlation = str(uuid.uuid4())
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._waiting[correlation] = future
        try:
            await broker.publish(exchange, key, broker.json_message(
                body, routing_key=key, correlation_id=correlation, reply_to=replies.name,
                user_id=self.user, expiration=wait_seconds if expires else None))
            return await asyncio.wait_for(future, wait_seconds)
        except TimeoutError:
            return None
        except PublishError:
            raise Unavailable(f"no queue takes {key}: run `ordermill migrate`") from None
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

    async def dead_letters(self, limit: int) -> list[dict[str, Any]] | None:
        if self._connection is None or self._connection.is_closed:
            return None
        try:
            return await broker_ops.dead_letters(self._connection, self.names, None, limit=limit)
        except (OSError, aio_pika.exceptions.AMQPError) as exc:
            log.warning("dead letters unavailable", extra={"error": str(exc)})
            return None

    async def replay(self, queue: str, message_id: str) -> broker_ops.Replay:
        service = self.names.service_of(queue) or self.names.service_of(
            queue.removesuffix(".dead"))
        if service not in CONSOLE_REPLAYS:
            raise Unavailable(f"the console replays only {', '.join(CONSOLE_REPLAYS)} dead"
                              " letters; an operator replays the others with"
                              " `ordermill dead-letters --replay`")
        if self._connection is None or self._connection.is_closed:
            raise Unavailable("the console has no broker connection")
        try:
            return await broker_ops.replay_dead_letters(
                self._connection, self.names, service, limit=1, user_id=self.user,
                service_users=self.service_users, message_id=message_id)
        except (OSError, aio_pika.exceptions.AMQPError) as exc:
            raise Unavailable(f"RabbitMQ refused the replay: {exc}") from None

    async def close(self) -> None:
        for future in self._waiting.values():
            future.cancel()
        if self._connection is not None:
            await self._connection.close()
            self._connection = None
