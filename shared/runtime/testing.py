"""A broker-free harness: a worker's routes through the same Pipeline the Runtime builds, with
an in-memory transport instead of RabbitMQ (PostgreSQL stays real). Shaped after FastStream's
TestRabbitBroker and dramatiq's StubBroker, written for Ordermill's pipeline.

    flow = InMemoryFlow(settings, pool)
    flow.add(placement_worker(settings), fraud_worker(settings))
    delivery = await flow.send("order.place", body)         # acked, or dead with a reason
    events = await flow.run()                               # the outbox, fed on until quiet

What the workers publish is read from the outbox (as the relay would) and captured; `run()`
feeds each event to the workers that route its key, as the service user, until no new event
is written. Replies (`uow.reply`) and dead letters (with the copy the transport would have
published) are captured too. Background tasks (job runner, mail sender) are not run."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import aio_pika
import asyncpg
from aio_pika.message import decode_expiration, encode_expiration

from shared import broker
from shared.health import DatabaseWatch
from shared.parties import Publishers, amqp_user
from shared.runtime.chain import Middleware
from shared.runtime.pipeline import Pipeline
from shared.runtime.routes import WorkerSpec
from shared.runtime.text import REASON_HEADER
from shared.settings import Settings
from shared.topology import Names

_DEFAULT = object()
_SET_AFTER = frozenset({"timestamp", "type", "content_type", "content_encoding",
                        "app_id"})


@dataclass(eq=False)
class MemoryMessage:
    """A delivery as aio-pika's IncomingMessage shows it (the properties the pipeline reads),
    settled in memory."""

    body: bytes
    routing_key: str | None = None
    message_id: str | None = None
    type: str | None = None
    correlation_id: str | None = None
    reply_to: str | None = None
    user_id: str | None = None
    headers: dict[str, Any] = field(default_factory=dict)
    timestamp: datetime | None = None
    expiration: float | None = None
    content_type: str | None = None
    content_encoding: str | None = None
    app_id: str | None = None
    outcome: str | None = None  # "acked", "dead" or "requeued"
    dead: DeadLetter | None = None

    @classmethod
    def of(cls, message: aio_pika.Message, routing_key: str) -> MemoryMessage:
        return cls(
            message.body, routing_key=routing_key, message_id=message.message_id,
            type=message.type, correlation_id=message.correlation_id,
            reply_to=message.reply_to, user_id=message.user_id,
            headers=dict(message.headers or {}), timestamp=message.timestamp,
            expiration=decode_expiration(encode_expiration(message.expiration)),
            content_type=message.content_type, content_encoding=message.content_encoding,
            app_id=message.app_id)

    @property
    def processed(self) -> bool:
        return self.outcome is not None

    async def ack(self) -> None:
        assert self.outcome is None, f"settled twice: {self.outcome} then acked"
        self.outcome = "acked"

    async def nack(self, requeue: bool = True) -> None:
        assert self.outcome is None, f"settled twice: {self.outcome} then nacked"
        self.outcome = "requeued" if requeue else "dropped"


@dataclass(frozen=True)
class DeadLetter:
    queue: str
    message_id: str | None
    copy: aio_pika.Message

    @property
    def reason(self) -> str:
        return self.copy.headers[REASON_HEADER]  # type: ignore[return-value]

    @property
    def headers(self) -> dict[str, Any]:
        return dict(self.copy.headers)

    @property
    def body(self) -> bytes:
        return self.copy.body


@dataclass(frozen=True)
class Published:
    """An outbox row, as the relay would have published it."""

    routing_key: str
    body: Any
    message_id: str
    correlation_id: str | None
    direct: bool  # a reply to a queue, not an event on the exchange


class MemoryTransport:
    """The Transport the pipeline settles through, recording instead of talking to a broker."""

    def __init__(self) -> None:
        self.dead_letters: list[DeadLetter] = []

    async def ack(self, message: MemoryMessage) -> None:
        await message.ack()

    async def ack_all(self, messages: Sequence[MemoryMessage]) -> None:
        """Together, as the AMQP transport sends a batch's acks (no delivery tags here)."""
        await asyncio.gather(*(self.ack(message) for message in messages))

    async def requeue(self, messages: Sequence[MemoryMessage]) -> None:
        for message in messages:
            if not message.processed:
                await message.nack(requeue=True)

    async def dead_letter(self, queue: str, message: MemoryMessage,
                          copy: aio_pika.Message) -> None:
        dead = DeadLetter(queue, copy.message_id, copy)
        self.dead_letters.append(dead)
        await message.ack()
        message.outcome, message.dead = "dead", dead


class InMemoryFlow:
    """Workers on one real database, joined by their outbox instead of a broker."""

    def __init__(self, settings: Settings, pool: asyncpg.Pool, *,
                 middleware: Sequence[Middleware] = (), metrics: bool = False) -> None:
        self.settings = settings
        self.pool = pool
        self.names = Names(settings.namespace)
        self.transport = MemoryTransport()
        self.publishers = Publishers.from_settings(settings.publishers)
        self.user = amqp_user(settings.amqp_url)  # the workers' own user, as the relay's
        self.database = DatabaseWatch(settings.database_url, asyncio.Event())
        self.middleware = tuple(middleware)
        self.metrics = metrics  # the metrics middleware in every pipeline, as with METRICS_PORT
        self.pipelines: dict[str, Pipeline] = {}
        self.published: list[Published] = []
        self.replies: list[Published] = []

    def add(self, *specs: WorkerSpec) -> InMemoryFlow:
        for spec in specs:
            self.publishers.require(  # closed by default, as `Runtime.serve` checks
                spec.service, [(key, r.publishers) for key, r in spec.routes.items()])
            self.pipelines[spec.service] = Pipeline(
                spec, settings=self.settings.pipeline, names=self.names, pool=self.pool,
                transport=self.transport, database=self.database, publishers=self.publishers,
                user=self.user, extra=self.middleware, metrics=self.metrics)
        return self

    def routed(self, key: str) -> list[str]:
        """The services whose queue takes `key` (those with a route for it)."""
        return [service for service, p in self.pipelines.items() if key in p.spec.routes]

    def message(self, key: str, body: Any = None, *, raw: bytes | None = None,
                message_id: str | None = None, user_id: Any = _DEFAULT,
                **props: Any) -> MemoryMessage:
        """As a publisher would send it (by default as the harness's user, like the broker
        harness): JSON, persistent, typed by its key."""
        user = self.user if user_id is _DEFAULT else user_id
        # Properties json_message sets itself (timestamp, type, ...) are overridden after.
        later = {name: props.pop(name) for name in list(props) if name in _SET_AFTER}
        message = broker.json_message(body, routing_key=key, message_id=message_id,
                                      user_id=user, **props)
        for name, value in later.items():
            setattr(message, name, value)
        if raw is not None:
            message.body = raw
        return MemoryMessage.of(message, key)

    async def send(self, key: str, body: Any = None, *, to: str | None = None,
                   **options: Any) -> MemoryMessage:
        """One message to the worker that routes `key` (or to the one named), handled alone."""
        message = self.message(key, body, **options)
        await self.deliver([message], to)
        return message

    async def deliver(self, messages: list[MemoryMessage], to: str | None = None) -> None:
        """These messages as one delivery (a batch under load) to each worker taking them."""
        key = messages[0].routing_key or ""
        services = [to] if to else self.routed(key)
        assert services, f"no worker takes {key!r}"
        for n, service in enumerate(services):
            # Each queue has its own copy of a message, as on a broker: the first worker settles
            # the messages given (the caller may look at them), the others copies of their own.
            copies = messages if n == 0 else [
                dataclasses.replace(m, headers=dict(m.headers), outcome=None, dead=None)
                for m in messages]
            await self.pipelines[service].handle(copies)

    async def drain(self) -> list[Published]:
        """The outbox rows not yet taken, marked published, as the relay would send them."""
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                "UPDATE outbox SET published_at = now() WHERE id IN (SELECT id FROM outbox"
                " WHERE published_at IS NULL ORDER BY id FOR UPDATE)"
                " RETURNING id, message_id, routing_key, body, correlation_id, direct")
        out = [Published(r["routing_key"], r["body"], str(r["message_id"]), r["correlation_id"],
                         r["direct"]) for r in sorted(rows, key=lambda r: r["id"])]
        self.replies += [p for p in out if p.direct]
        events = [p for p in out if not p.direct]
        self.published += events
        return events

    async def run(self, *, rounds: int = 20) -> list[Published]:
        """Feed what the workers publish to the workers that take it, until none is new.
        Returns every event published meanwhile (including those no worker here takes)."""
        seen: list[Published] = []
        for _ in range(rounds):
            events = await self.drain()
            if not events:
                return seen
            seen += events
            for event in events:
                if self.routed(event.routing_key):
                    await self.deliver([self.as_delivery(event)])
        raise AssertionError(f"still publishing after {rounds} rounds")

    def as_delivery(self, event: Published) -> MemoryMessage:
        """An event as the relay publishes it: its id, its cause, the workers' user."""
        return self.message(event.routing_key, event.body, message_id=event.message_id,
                            correlation_id=event.correlation_id)

    def events(self, key: str) -> list[Any]:
        return [p.body for p in self.published if p.routing_key == key]

    def dead(self, service: str | None = None) -> list[DeadLetter]:
        queue = self.names.queue(service) if service else None
        return [d for d in self.transport.dead_letters if queue is None or d.queue == queue]

    @staticmethod
    def body_of(dead: DeadLetter) -> Any:
        return json.loads(dead.body)
