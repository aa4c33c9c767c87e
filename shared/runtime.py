"""The worker runtime, written once for every service (dramatiq-style cross-cutting concerns).

It owns the connection, prefetch, parsing into the handler's type, idempotency,
transactions, the ack policy, retries of transient errors, dead-lettering with a
reason, and a clean stop. Handlers are plain functions of (message, unit of work).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import json
import logging
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
from aio_pika.abc import AbstractExchange, AbstractIncomingMessage, AbstractRobustConnection
from pydantic import BaseModel, ValidationError
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from shared import broker, db
from shared.contracts import MAYBE_SURROGATE, has_lone_surrogate, has_nul, shown
from shared.errors import Rejected
from shared.health import DatabaseWatch, heartbeat
from shared.housekeeping import Housekeeper
from shared.outbox import OutboxRelay
from shared.parties import INTERNAL, REPLAY_OF_HEADER, Party, Publishers, amqp_user
from shared.settings import Settings
from shared.topology import Names, declare_topology
from shared.uow import MessageContext, UnitOfWork, event_id, flush_events, write_event

log = logging.getLogger("ordermill.runtime")

Handler = Callable[..., Awaitable[None]]  # (message, uow) or (message, uow, prepared)
# Work a handler needs done outside its transaction (a remote call), once per delivery.
Prepare = Callable[[Any, asyncpg.Pool], Awaitable[Any]]
REASON_HEADER = "x-ordermill-reason"
REPLAYS_HEADER = "x-ordermill-replays"  # written by `dead-letters --replay`
REASON_LIMIT = 1000  # a reason goes into a log line, a header and order.rejected
SECRET_KEYS = frozenset({"epp_code", "password", "token", "license_key", "licence_key", "api_key"})
REDACTED = "[redacted]"


@dataclass(frozen=True)
class Route:
    model: type[BaseModel]
    handler: Handler
    prepare: Prepare | None = None
    # Who may send it (shared/parties.py). Anyone else's message is dead-lettered with the
    # reason, unread, unless `handle_unauthorized`: the handler then sees
    # `uow.context.authorized` false and decides (a payment is kept, unapplied, never dropped).
    publishers: frozenset[Party] = INTERNAL
    handle_unauthorized: bool = False


def route(handler: Handler, *, prepare: Prepare | None = None,
          publishers: frozenset[Party] = INTERNAL, handle_unauthorized: bool = False) -> Route:
    """A route whose contract is the type of the handler's first parameter, sent only by
    `publishers` (by default Ordermill's own services).

    `prepare(message, pool)` runs before the transaction, with no row lock or connection
    held, for work such as a remote API call; its result is the handler's third argument.
    It runs once per delivery: a batch that falls back to one by one, or a transaction
    retried after a deadlock, reuses it."""
    first = next(iter(inspect.signature(handler, eval_str=True).parameters.values()))
    if not (isinstance(first.annotation, type) and issubclass(first.annotation, BaseModel)):
        raise TypeError(f"{handler!r}: first parameter must be typed with a contract model")
    return Route(first.annotation, handler, prepare, publishers, handle_unauthorized)


@dataclass
class WorkerSpec:
    """One place for a worker's queue, routes, prefetch and shutdown (arq's WorkerSettings)."""

    service: str
    routes: Mapping[str, Route]
    prefetch: int | None = None
    # How many transactions at once, and how many messages at most in one (under load).
    concurrency: int | None = None
    batch: int | None = None
    # How long a batch may wait to fill once its first message is in (seconds). For work off
    # the order's critical path (mail): a few ms of latency for fewer, larger transactions.
    linger: float = 0.0
    # When a message is rejected and names an order_ref, tell its publisher with this event.
    rejection_event: str | None = None
    on_stop: Sequence[Callable[[], Awaitable[None]]] = ()
    # Periodic jobs of this service (sweepers), run until the stop event is set.
    background: Sequence[Callable[[asyncpg.Pool, asyncio.Event], Awaitable[None]]] = ()


@dataclass(frozen=True)
class _Work:
    message: AbstractIncomingMessage
    route: Route
    payload: BaseModel
    context: MessageContext
    data: Any
    prepared: Any = None

    @property
    def body_hash(self) -> bytes:
        """Of what the handler reads, not of the bytes: a re-send formatted otherwise, or with
        fields the contract ignores (a storefront's `sent_at`), is the same message."""
        return hashlib.blake2b(self.payload.model_dump_json().encode(), digest_size=16).digest()


def redact(value: Any) -> Any:
    """A copy with secrets replaced: dead letters and logs never carry them."""
    if isinstance(value, dict):
        return {k: REDACTED if k in SECRET_KEYS and v else redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


_FIELD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def describe_validation_error(error: ValidationError, *, prefix: str = "schema: ",
                              env_names: bool = False) -> str:
    parts = []
    for item in error.errors()[:5]:
        # Field names and indexes only: pydantic also names the union branch or validator it
        # tried ("lax-or-strict[...]"), which says nothing to the storefront that reads this.
        where = ".".join(str(p) for p in item["loc"]
                         if isinstance(p, int) or _FIELD_NAME.match(p)) or "body"
        message = item["msg"].removeprefix("Value error, ")  # pydantic's prefix for ValueError
        parts.append(f"{where.upper() if env_names else where}: {message}")
    more = f" (+{error.error_count() - 5} more)" if error.error_count() > 5 else ""
    return prefix + "; ".join(parts) + more


@dataclass
class _InFlight:
    count: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.idle.set()

    def enter(self) -> None:
        self.count += 1
        self.idle.clear()

    def leave(self) -> None:
        self.count -= 1
        if self.count == 0:
            self.idle.set()


class Runtime:
    """Shared resources for the workers of one process, handed to them, never global."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.names = Names(settings.namespace)
        self.pool: asyncpg.Pool | None = None
        self.connection: AbstractRobustConnection | None = None
        self.exchange: AbstractExchange | None = None
        self.dead_letter_exchange: AbstractExchange | None = None
        self.direct_exchange: AbstractExchange | None = None
        self._stop = asyncio.Event()
        self._inflight = _InFlight()
        self._consumers: list[tuple[aio_pika.abc.AbstractQueue, str]] = []
        self._batchers: list[asyncio.Task[None]] = []
        self.database = DatabaseWatch(settings.database_url, self._stop)
        self.publishers = Publishers.from_settings(settings)
        self.user = amqp_user(settings.amqp_url)  # the user_id this process publishes with
        # With a user per service (SERVICE_USERS), a worker may declare only its own queues;
        # `ordermill migrate`, run by the broker's administrator, declares them all.
        self._own_queues: list[str] | None = None

    def _relayed_sources(self, workers: Sequence[WorkerSpec]) -> list[str] | None:
        """With a RabbitMQ user per service (SERVICE_USERS set), a relay publishes only the
        events of the services it runs: its user may send no others. With one user for all
        (the all-in-one process, development), any relay publishes any event."""
        if not self.settings.service_users or not workers:
            return None
        return [spec.service for spec in workers]

    def check_publishers(self, workers: Sequence[WorkerSpec]) -> None:
        """Closed by default: raises UnknownPublishers (one line) for a route nobody may send."""
        if self.publishers.trust_any:
            log.warning("TRUST_ANY_PUBLISHER is set: any RabbitMQ user may send any message;"
                        " for development only")
        for spec in workers:
            self.publishers.require(
                spec.service, [(key, r.publishers) for key, r in spec.routes.items()])

    async def start(self) -> None:
        s = self.settings
        log.info("starting", extra={"namespace": s.namespace})
        if s.migrate_on_start:
            await db.ensure_database(s.database_url, attempts=s.startup_attempts)
        self.pool = await db.create_pool(
            s.database_url, max_size=s.db_pool_max, attempts=s.startup_attempts, writable=True
        )
        # Migrations applied only when missing and allowed: a DML-only role starts on a
        # current schema, and refuses in one line on one that is not.
        try:
            await db.ensure_schema(self.pool, migrate_on_start=s.migrate_on_start)
        except db.SchemaNotReady:
            await self.pool.close()
            self.pool = None
            raise
        self.connection = await broker.connect(s.amqp_url, attempts=s.startup_attempts)
        # A broker restarting meanwhile is waited for too (see _consume).
        async for attempt in broker.retrying(s.startup_attempts, also=RuntimeError):
            with attempt:
                publisher = await broker.open_publisher(self.connection)
                await declare_topology(self.connection, self.names,
                                       delivery_limit=s.queue_delivery_limit,
                                       services=self._own_queues)
                self.exchange = await publisher.get_exchange(self.names.exchange)
                self.dead_letter_exchange = await publisher.get_exchange(
                    self.names.dead_letter_exchange)
        self.direct_exchange = publisher.default_exchange

    def stop(self) -> None:
        self._stop.set()

    async def serve(
        self,
        workers: Sequence[WorkerSpec],
        *,
        relay: bool = True,
        ready: asyncio.Event | None = None,
    ) -> None:
        """Consume until stop() (or SIGTERM via the CLI), then drain in-flight work and close."""
        self.check_publishers(workers)
        if self.settings.service_users and workers:
            self._own_queues = [spec.service for spec in workers]
        if self.pool is None and not await self._started_unless_stopped():
            return
        assert self.connection and self.pool and self.exchange
        tasks: list[asyncio.Task[None]] = []
        if relay:
            outbox = OutboxRelay(
                self.pool, self.exchange, self.settings.database_url,
                direct=self.direct_exchange,
                batch=self.settings.relay_batch, sweep_seconds=self.settings.relay_sweep_seconds,
                linger_seconds=self.settings.relay_linger_ms / 1000,
                concurrency=self.settings.relay_concurrency,
                user_id=self.user, sources=self._relayed_sources(workers),
            )
            tasks.append(self._supervised("outbox-relay", partial(outbox.run, self._stop)))
            keeper = Housekeeper(
                outbox_hours=self.settings.outbox_retention_hours,
                inbox_days=self.settings.inbox_retention_days,
                every_seconds=self.settings.housekeeping_seconds,
            )
            tasks.append(self._supervised("housekeeping", partial(keeper.run, self.pool, self._stop)))
        tasks += [
            self._supervised(f"{spec.service}-background", partial(job, self.pool, self._stop))
            for spec in workers for job in spec.background
        ]
        for spec in workers:
            await self._consume(spec)
        log.info("workers running", extra={"workers": [w.service for w in workers]})
        if self.settings.heartbeat_file:  # alive once consuming, not before
            tasks.append(asyncio.create_task(heartbeat(
                Path(self.settings.heartbeat_file), self.settings.heartbeat_seconds, self._stop,
                self.connection, self.database), name="heartbeat"))
        if ready is not None:
            ready.set()
        try:
            await self._stop.wait()
        finally:
            await self._shutdown(workers, tasks)

    async def _consume(self, spec: WorkerSpec) -> None:
        """The service's channel, prefetch, batchers and consumer. A broker lost meanwhile (a
        restart as the worker starts) is waited for like the first connection: a robust
        connection that is reconnecting refuses new channels with a RuntimeError."""
        assert self.connection
        waiting: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()

        async def on_message(message: AbstractIncomingMessage) -> None:
            self._inflight.enter()
            waiting.put_nowait(message)

        async for attempt in broker.retrying(self.settings.startup_attempts, also=RuntimeError):
            with attempt:
                channel = await self.connection.channel()
                await channel.set_qos(prefetch_count=spec.prefetch or self.settings.worker_prefetch)
                queue = await channel.get_queue(self.names.queue(spec.service), ensure=True)
                tag = await queue.consume(on_message)
        self._consumers.append((queue, tag))
        for n in range(spec.concurrency or self.settings.worker_concurrency):
            self._batchers.append(asyncio.create_task(
                self._batcher(spec, waiting), name=f"{spec.service}-batcher-{n}"))

    async def _batcher(
        self, spec: WorkerSpec, waiting: asyncio.Queue[AbstractIncomingMessage]
    ) -> None:
        """Takes what has arrived, up to a batch: one message when idle, many under load."""
        limit = spec.batch or self.settings.worker_batch
        loop = asyncio.get_running_loop()
        while True:
            batch = [await waiting.get()]
            deadline = loop.time() + spec.linger
            while len(batch) < limit:
                if not waiting.empty():
                    batch.append(waiting.get_nowait())
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(waiting.get(), remaining))
                except TimeoutError:
                    break
            try:
                await self._handle_batch(spec, batch)
            except Exception:  # never lose the batcher
                log.exception("batch handling failed", extra={"service": spec.service})
                await _requeue_unsettled(batch)
            finally:
                for _ in batch:
                    self._inflight.leave()

    async def _started_unless_stopped(self) -> bool:
        """Start, waiting (bounded) for servers still coming up; a stop meanwhile (SIGTERM from
        an orchestrator whose grace period is shorter than the wait) ends it at once."""
        starting = asyncio.create_task(self.start())
        stopping = asyncio.create_task(self._stop.wait())
        try:
            await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        if starting.done():
            starting.result()  # raise a start-up failure
            return True
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await starting
        await self.close()
        log.info("stopped before it had started")
        return False

    def _supervised(self, name: str, run: Callable[[], Awaitable[None]]) -> asyncio.Task[None]:
        """A background task (the relay, a sweeper, the job runner, the mail sender) that ends
        with an error is logged and started again: one that stayed dead would leave events
        unpublished and jobs undone while the worker went on consuming and looking healthy."""

        async def supervise() -> None:
            delay = 1.0
            while not self._stop.is_set():
                try:
                    await run()
                    return
                except Exception:
                    log.exception("background task failed; starting it again",
                                  extra={"task": name, "in_seconds": delay})
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
                delay = min(delay * 2, 30.0)

        return asyncio.create_task(supervise(), name=name)

    async def _shutdown(self, workers: Sequence[WorkerSpec], tasks: list[asyncio.Task[None]]) -> None:
        log.info("stopping: no new messages, finishing in-flight work",
                 extra={"in_flight": self._inflight.count})
        # With the broker away there is nothing to cancel (its consumers end with the
        # connection), and a robust channel would wait for the broker to come back.
        if self.connection is not None and self.connection.connected.is_set():
            results = await asyncio.gather(
                *(asyncio.wait_for(queue.cancel(tag), timeout=5) for queue, tag in self._consumers),
                return_exceptions=True)
            for exc in (r for r in results if isinstance(r, BaseException)):
                log.warning("consumer cancel failed", extra={"error": f"{type(exc).__name__}: {exc}"})
        self._consumers.clear()
        try:
            await asyncio.wait_for(self._inflight.idle.wait(), timeout=30)
        except TimeoutError:
            log.error("in-flight work did not finish in 30 s; it will be redelivered")
        for batcher in self._batchers:
            batcher.cancel()
        self._batchers.clear()
        self._stop.set()
        if tasks:
            await asyncio.wait(tasks, timeout=10)
        for spec in workers:
            for hook in spec.on_stop:
                await hook()
        await self.close()
        log.info("stopped")

    async def close(self) -> None:
        if self.connection is not None:
            await self.connection.close()
            self.connection = None
        if self.pool is not None:
            await self.pool.close()
            self.pool = None

    # -- messages ------------------------------------------------------------------------------

    async def _handle_batch(
        self, spec: WorkerSpec, messages: list[AbstractIncomingMessage]
    ) -> None:
        """Under load, several messages share one transaction (one BEGIN, inbox insert, outbox
        write and COMMIT). If any of them fails, the batch rolls back and each message is
        handled alone, so one bad message never takes the others with it."""
        parsed = [item for m in messages if (item := await self._parse(spec, m)) is not None]
        if not await self.database.through():  # stopping while the database is away
            await _requeue_unsettled([item.message for item in parsed])
            return
        ready = await self._run_prepare(spec, parsed)
        if len(ready) > 1:
            try:
                await self._transaction(ready)
            except Exception as exc:
                log.info("batch rolled back; handling its messages one by one",
                         extra={"service": spec.service, "size": len(ready),
                                "error": f"{type(exc).__name__}: {exc}"})
            else:
                for item in ready:
                    await _ack(item.message)
                return
        for item in ready:
            await self._handle_one(spec, item)

    async def _parse(self, spec: WorkerSpec, message: AbstractIncomingMessage) -> _Work | None:
        """Parse a message into its handler's type; bad input is dead-lettered at once."""
        message_id = _body_id(message.body)  # until its own is known to be one we can use
        key = ""
        data: Any = None
        try:
            try:  # any failure to read a property is the message's fault, never the worker's
                key = message.routing_key or message.type or ""
                message_id = _checked_message_id(message)
                expires_at = _checked_properties(message)
            except Rejected:
                raise
            except Exception as exc:
                raise Rejected(f"message properties could not be read: {type(exc).__name__}:"
                               f" {_first_line(str(exc))}") from None
            route_ = spec.routes.get(key)
            if route_ is None:
                raise Rejected(f"no handler for routing key {shown(key)} in {spec.service}")
            replay_of = (message.headers or {}).get(REPLAY_OF_HEADER)
            verdict = self.publishers.check(
                message.user_id, route_.publishers,
                replay_of=replay_of if isinstance(replay_of, str) and replay_of else None)
            if not (verdict.allowed or route_.handle_unauthorized):
                raise Rejected(verdict.reason, tell_publisher=False)  # unread, not acted on
            if len(message.body) > self.settings.max_message_bytes:
                raise Rejected(f"body of {len(message.body)} bytes is over MAX_MESSAGE_BYTES"
                               f" ({self.settings.max_message_bytes})")
            try:
                # Numbers as Decimal: money is never a float, not even on the way in.
                data = json.loads(message.body, parse_float=Decimal)
            except RecursionError:
                raise Rejected("body is not JSON we take: nested too deeply") from None
            except ValueError as exc:  # not UTF-8, not JSON, an integer of 5,000 digits
                raise Rejected(f"body is not JSON: {_first_line(str(exc))}") from None
            # A NUL in JSON text is always written \\u0000: most bodies are passed at a glance.
            if b"\\u0000" in message.body and has_nul(data):
                data = route_.model.without_nul(data)
            if MAYBE_SURROGATE.search(message.body) and has_lone_surrogate(data):
                data = route_.model.without_lone_surrogates(data)
            try:
                payload = route_.model.model_validate(data)
            except RecursionError:
                raise Rejected("body is not JSON we take: nested too deeply") from None
            except ValidationError as exc:
                raise Rejected(describe_validation_error(exc)) from None
        except Rejected as rejection:
            await self._reject(spec, message, message_id, rejection.reason, data,
                               tell_publisher=rejection.tell_publisher)
            return None
        context = MessageContext(
            consumer=spec.service, message_id=message_id, routing_key=key,
            received_at=datetime.now(UTC), user_id=verdict.user, parties=verdict.parties,
            authorized=verdict.allowed, replayed_by=verdict.replayed_by,
            correlation_id=message.correlation_id, reply_to=message.reply_to,
            expires_at=expires_at,
        )
        return _Work(message, route_, payload, context, data)

    async def _run_prepare(self, spec: WorkerSpec, items: list[_Work]) -> list[_Work]:
        """Each route's prepare step, concurrently, skipping messages already handled."""
        todo = [item for item in items if item.route.prepare is not None]
        if not todo:
            return items
        assert self.pool
        try:
            async for attempt in self._transient_retrying():
                with attempt:
                    done = {r["message_id"] for r in await self.pool.fetch(
                        "SELECT message_id FROM inbox WHERE consumer = $1"
                        " AND message_id = ANY($2::text[])",
                        spec.service, [item.context.message_id for item in todo])}
        except db.TRANSIENT_DB_ERRORS:
            done = set()  # only saves work: the transaction's inbox row still dedupes

        async def one(item: _Work) -> _Work | None:
            if item.route.prepare is None or item.context.message_id in done:
                return item
            while True:
                if not await self.database.through():
                    await _requeue_unsettled([item.message])
                    return None
                try:
                    async for attempt in self._transient_retrying():
                        with attempt:
                            prepared = await item.route.prepare(item.payload, self.pool)
                except Rejected as rejection:
                    await self._reject(spec, item.message, item.context.message_id,
                                       rejection.reason, item.data,
                                       tell_publisher=rejection.tell_publisher)
                    return None
                except Exception as exc:
                    if await self._outlasted(spec, exc) or self.database.down:
                        continue  # back: again; or stopping mid-outage: requeued above
                    log.exception("prepare failed", extra={"service": spec.service,
                                                           "message_id": item.context.message_id})
                    await self._reject(spec, item.message, item.context.message_id,
                                       f"prepare failed: {type(exc).__name__}: {exc}", item.data)
                    return None
                return replace(item, prepared=prepared)

        results = await asyncio.gather(*(one(item) for item in items), return_exceptions=True)
        ready = []
        for item, result in zip(items, results, strict=True):
            if isinstance(result, BaseException):  # not even dead-lettered: try again later
                log.error("message left for redelivery", extra={
                    "service": spec.service, "message_id": item.context.message_id,
                    "error": f"{type(result).__name__}: {result}"})
                await _requeue_unsettled([item.message])
            elif result is not None:
                ready.append(result)
        return ready

    async def _handle_one(self, spec: WorkerSpec, item: _Work) -> None:
        while True:
            if not await self.database.through():  # stopping while the database is away
                await _requeue_unsettled([item.message])
                return
            try:
                await self._run_handler(item)
            except Rejected as rejection:
                await self._reject(spec, item.message, item.context.message_id, rejection.reason,
                                   item.data, tell_publisher=rejection.tell_publisher)
                return
            except Exception as exc:
                if await self._outlasted(spec, exc) or self.database.down:
                    continue  # back: the same message again; or stopping: requeued above
                if isinstance(exc, db.TRANSIENT_DB_ERRORS):
                    reason = f"transient error persisted after retries: {type(exc).__name__}: {exc}"
                else:
                    reason = f"handler failed: {type(exc).__name__}: {exc}"
                    log.exception("handler failed", extra={"service": spec.service,
                                                           "message_id": item.context.message_id})
                await self._reject(spec, item.message, item.context.message_id, reason, item.data)
                return
            break
        await _ack(item.message)

    async def _run_handler(self, item: _Work) -> None:
        try:
            return await self._transaction([item])
        except db.TRANSIENT_DB_ERRORS:
            # The retry machinery is built only when needed: the first try is the hot path.
            if self.settings.transient_attempts == 1:
                raise
            await asyncio.sleep(0.1)
        async for attempt in self._transient_retrying(spent=1):
            with attempt:
                return await self._transaction([item])

    async def _transaction(self, items: list[_Work]) -> None:
        """Handlers of `items` in one transaction with their inbox rows and events.
        A message already in the inbox (a redelivery) is skipped."""
        assert self.pool
        async with self.pool.acquire() as conn, conn.transaction():
            consumer, ids = items[0].context.consumer, [i.context.message_id for i in items]
            hashes = [i.body_hash for i in items]
            fresh = {r["message_id"] for r in await conn.fetch(
                "INSERT INTO inbox (consumer, message_id, body_hash)"
                " SELECT $1, u.id, u.hash FROM unnest($2::text[], $3::bytea[]) AS u(id, hash)"
                " ON CONFLICT DO NOTHING RETURNING message_id",
                consumer, ids, hashes,
            )}
            if len(fresh) < len(items):
                await _refuse_reused_ids(conn, consumer, ids, hashes)
            uows = []
            for item in items:
                if item.context.message_id not in fresh:
                    continue  # already handled, or twice in this batch
                fresh.discard(item.context.message_id)
                uow = UnitOfWork(conn, item.context)
                if item.route.prepare is None:
                    await item.route.handler(item.payload, uow)
                else:
                    await item.route.handler(item.payload, uow, item.prepared)
                uows.append(uow)
            await flush_events(conn, uows)

    async def _outlasted(self, spec: WorkerSpec, exc: BaseException) -> bool:
        return await self.database.outlasted(spec.service, exc, self._inflight.count)

    def _transient_retrying(self, *, spent: int = 0) -> AsyncRetrying:
        return AsyncRetrying(
            stop=stop_after_attempt(max(1, self.settings.transient_attempts - spent)),
            wait=wait_exponential(multiplier=0.1, max=3),
            retry=retry_if_exception_type(db.TRANSIENT_DB_ERRORS),
            reraise=True,
        )

    async def _reject(
        self, spec: WorkerSpec, message: AbstractIncomingMessage, message_id: str,
        reason: str, data: Any, *, tell_publisher: bool = False,
    ) -> None:
        """Dead-letter with the reason, then ack; never requeue. Bad input (`tell_publisher`)
        is also answered with the worker's rejection event: a storefront is told its order
        was refused only when the order is at fault, not when a handler or the database is
        (an operator replays those once fixed)."""
        reason = _header_text(reason, REASON_LIMIT)
        order_ref = data.get("order_ref") if isinstance(data, dict) else None
        if not (isinstance(order_ref, str) and 0 < len(order_ref) <= 200
                and "\x00" not in order_ref and not broker.undecodable(order_ref)):
            order_ref = None  # not one a storefront could have sent, nor one we can store
        log.warning("message rejected", extra={
            "service": spec.service, "message_id": message_id, "routing_key": message.routing_key,
            "order_ref": order_ref, "reason": reason,
        })
        if tell_publisher and spec.rejection_event and order_ref:
            await self._emit_rejection(spec, message_id, order_ref, reason)
        assert self.dead_letter_exchange
        body = message.body
        if isinstance(data, dict | list):
            try:
                body = json.dumps(redact(data), default=str).encode()
            except RecursionError:  # too deep to redact: kept as it came
                body = message.body
        # None of the publisher's headers: a forged x-ordermill-reason or -routing-key must not
        # pass for ours (a replay trusts them), and theirs with ours could exceed the frame size.
        headers: dict[str, Any] = {
            REASON_HEADER: reason,
            "x-ordermill-routing-key": _header_text(message.routing_key or ""),
            "x-ordermill-queue": self.names.queue(spec.service),
            "x-ordermill-user-id": _header_text(message.user_id or ""),
            "x-ordermill-dead-at": datetime.now(UTC).isoformat(),
        }
        # How often `dead-letters --replay` sent it back (the CLI's count; only a number).
        replays = (message.headers or {}).get(REPLAYS_HEADER)
        if type(replays) is int and 0 < replays <= 1_000_000:
            headers[REPLAYS_HEADER] = replays
        copy = aio_pika.Message(
            body,
            content_type=_property_text(message.content_type),
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=message_id,
            correlation_id=_property_text(message.correlation_id),
            reply_to=_property_text(message.reply_to),
            type=_property_text(message.type),
            timestamp=None if isinstance(message.timestamp, broker.UndecodableTimestamp)
            else message.timestamp,
            # Under the worker's own user: the replay believes its x-ordermill-user-id.
            user_id=self.user,
            headers=headers,
        )
        await broker.publish(self.dead_letter_exchange, self.names.queue(spec.service), copy)
        await message.ack()

    async def _emit_rejection(
        self, spec: WorkerSpec, message_id: str, order_ref: str, reason: str
    ) -> None:
        assert self.pool and spec.rejection_event
        try:
            async for attempt in self._transient_retrying():
                with attempt:
                    async with self.pool.acquire() as conn:
                        await write_event(
                            conn, spec.rejection_event, {"order_ref": order_ref, "reason": reason},
                            message_id=event_id(spec.service, message_id, "rejected"),
                            correlation_id=message_id, source=spec.service,
                        )
        except Exception as exc:  # the dead letter still goes: it keeps the reason
            log.error("could not record the rejection event; the dead letter keeps the reason",
                      extra={"order_ref": order_ref, "error": f"{type(exc).__name__}: {exc}"})


async def _refuse_reused_ids(conn: asyncpg.Connection, consumer: str, ids: list[str],
                             hashes: list[bytes]) -> None:
    """A message id seen before is a redelivery, skipped, only if the body is the same: a
    publisher that reuses ids for new messages (a storefront's counter restarting) would
    otherwise lose them without a trace. Refused as bad input: the dead letter and
    order.rejected say why. (Rows from before the hash was kept have none: not compared.)"""
    reused = await conn.fetchval(
        "SELECT i.message_id FROM inbox i"
        " JOIN unnest($2::text[], $3::bytea[]) AS u(id, hash) ON i.message_id = u.id"
        " WHERE i.consumer = $1 AND i.body_hash <> u.hash LIMIT 1",
        consumer, ids, hashes)
    if reused is not None:
        # Dead-lettered, not answered with order.rejected: the order the first message
        # placed may have this one's order_ref, and a storefront would believe it refused.
        raise Rejected(f"message_id {shown(reused)} was used before for a different message;"
                       " this one was not handled: publish it with an id of its own",
                       tell_publisher=False)


async def _ack(message: AbstractIncomingMessage) -> None:
    try:
        await message.ack()
    except broker.TRANSIENT_BROKER_ERRORS as exc:
        # The channel went away after the commit: the broker redelivers the message and the
        # inbox row makes the redelivery a no-op.
        log.warning("ack failed; the message will be redelivered and deduplicated",
                    extra={"message_id": message.message_id, "error": repr(exc)})


def _checked_message_id(message: AbstractIncomingMessage) -> str:
    """The message's id, or the body's if it has none; one we cannot store or send is bad input."""
    if not message.message_id:
        return _body_id(message.body)
    if broker.undecodable(message.message_id):
        raise Rejected("message_id is not valid UTF-8")
    if "\x00" in message.message_id:
        raise Rejected("message_id holds a NUL character")
    return message.message_id


def _checked_properties(message: AbstractIncomingMessage) -> datetime | None:
    """The properties a handler or a reply reads, checked as bad input; returns expires_at."""
    if isinstance(message.timestamp, broker.UndecodableTimestamp):
        raise Rejected("timestamp property is not a valid time")
    for name in ("correlation_id", "reply_to", "type", "user_id", "content_type",
                 "content_encoding", "app_id", "routing_key"):
        if broker.undecodable(getattr(message, name, None)):
            raise Rejected(f"{name} is not valid UTF-8")
    for name in ("correlation_id", "reply_to"):  # stored with the reply in the outbox (text)
        if "\x00" in (getattr(message, name) or ""):
            raise Rejected(f"{name} holds a NUL character")
    try:
        return _expires_at(message)
    except (ValueError, OverflowError, TypeError) as exc:
        raise Rejected(f"timestamp and expiration do not make a valid time:"
                       f" {_first_line(str(exc))}") from None


def _expires_at(message: AbstractIncomingMessage) -> datetime | None:
    if not message.expiration or message.timestamp is None:
        return None
    sent = message.timestamp
    if sent.tzinfo is None:  # AMQP's timestamp is POSIX seconds: UTC
        sent = sent.replace(tzinfo=UTC)
    return sent + timedelta(seconds=float(message.expiration))


def _header_text(text: str, limit: int = 255) -> str:
    """A text for a header the runtime writes: encodable (no lone surrogate) and capped, so a
    dead-letter copy always fits a frame."""
    text = broker.escaped(text)
    return text if len(text) <= limit else text[:limit] + "..."


def _property_text(value: str | None) -> str | None:
    """A short-string property copied onto a dead letter, or None if it cannot be sent again."""
    if not isinstance(value, str) or broker.undecodable(value) or len(value.encode()) > 255:
        return None
    return value


def _first_line(text: str) -> str:
    return (text.splitlines() or [""])[0][:200]


def _body_id(body: bytes) -> str:
    return "sha256:" + hashlib.sha256(body).hexdigest()


async def _requeue_unsettled(messages: Sequence[AbstractIncomingMessage]) -> None:
    """A message neither acked nor dead-lettered goes back to the queue, so it is not held
    unacknowledged (taking a prefetch slot) until the channel closes."""
    for message in messages:
        if message.processed:
            continue
        try:
            await message.nack(requeue=True)
        except Exception as exc:  # the channel is gone: the broker redelivers anyway
            log.warning("could not requeue a message", extra={
                "message_id": message.message_id, "error": str(exc)})
