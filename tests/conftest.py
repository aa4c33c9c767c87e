"""Test fixtures: the real PostgreSQL and RabbitMQ, a database and a namespace per test.

Every run gets a run id; its template database (migrated, sample catalog loaded) is
copied for each test, and each test declares its own namespace on the broker, so
runs and tests never see each other's data. Where no local server answers but a
Docker engine does, the servers are started with testcontainers.
"""

from __future__ import annotations

# isort: off
# First: trust the test CA through SSL_CERT_FILE before anything imports aiohttp.
from fakes.tls import CA_FILE  # noqa: F401
# isort: on

import asyncio
import contextlib
import importlib
import json
import os
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import asyncpg
import pytest

from cli.catalog import load_catalog, read_catalog
from shared import broker, db
from shared.parties import amqp_user
from shared.runtime import Runtime, WorkerSpec
from shared.runtime.testing import InMemoryFlow
from shared.settings import Settings
from shared.topology import Names, declare_topology, delete_topology

ROOT = Path(__file__).resolve().parent.parent
# Behind the installed packages, so that tests import the bench scripts as `bench.<script>`:
# `pytest` (CI's) does not put the working directory on sys.path as `python -m pytest` does.
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))
RUN_ID = uuid.uuid4().hex[:8]
DEFAULT_DB = os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
DEFAULT_AMQP = os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
TEST_USER = urlsplit(DEFAULT_AMQP).username or "guest"


def _reachable(url: str, default_port: int) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname, parts.port or default_port), timeout=2):
            return True
    except OSError:
        return False


def _with_db(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


@dataclass(frozen=True)
class Infra:
    database_url: str  # any database on the server; tests make their own
    amqp_url: str
    template: str


@pytest.fixture(scope="session")
def infra() -> Iterator[Infra]:
    stack = contextlib.ExitStack()
    database_url, amqp_url = DEFAULT_DB, DEFAULT_AMQP
    broker_needed = not os.environ.get("ORDERMILL_TESTS_WITHOUT_BROKER")  # the fast tier
    if not (_reachable(database_url, 5432)
            and (not broker_needed or _reachable(amqp_url, 5672))):
        database_url, amqp_url = _containers(stack)
    template = f"om_{RUN_ID}_tpl"

    async def prepare() -> None:
        url = _with_db(database_url, template)
        await db.ensure_database(url, attempts=3)
        pool = await db.create_pool(url, max_size=2, attempts=3)
        try:
            await db.migrate(pool)
            async with pool.acquire() as conn:
                await load_catalog(conn, read_catalog(ROOT / "catalog.example.toml"))
        finally:
            await pool.close()

    asyncio.run(prepare())
    try:
        yield Infra(database_url, amqp_url, template)
    finally:
        _DATABASES.close()  # the spare and the drops behind finish before the run's sweep
        asyncio.run(_drop_run_databases(database_url))
        stack.close()


def _containers(stack: contextlib.ExitStack) -> tuple[str, str]:
    try:
        from testcontainers.postgres import PostgresContainer
        from testcontainers.rabbitmq import RabbitMqContainer
    except ImportError:  # pragma: no cover
        pytest.exit("no local PostgreSQL/RabbitMQ and no testcontainers", returncode=2)
    try:
        pg = stack.enter_context(PostgresContainer("postgres:16", driver=None))
        mq = stack.enter_context(RabbitMqContainer("rabbitmq:3.13"))
    except Exception as exc:  # no Docker engine either
        pytest.exit(f"no local PostgreSQL/RabbitMQ and no Docker engine: {exc}", returncode=2)
    params = mq.get_connection_params()
    return (pg.get_connection_url(),
            f"amqp://guest:guest@{params.host}:{params.port}/")


async def _drop_run_databases(database_url: str) -> None:
    conn = await asyncpg.connect(_with_db(database_url, "postgres"))
    try:
        names = await conn.fetch(
            "SELECT datname FROM pg_database WHERE datname LIKE $1", f"om_{RUN_ID}_%"
        )
        for row in names:
            await conn.execute(f'DROP DATABASE IF EXISTS "{row["datname"]}" WITH (FORCE)')
    finally:
        await conn.close()


_counter = iter(range(1, 1_000_000))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tiers: `broker` for tests that need RabbitMQ (every test on the `settings` fixture:
    it declares and deletes a namespace), `slow` for those that spawn worker processes. The
    fast tier (`./scripts/test --fast`) is what is neither: pure functions, and workers run
    through the broker-free harness (`flow`) on a real database."""
    for item in items:
        names = getattr(item, "fixturenames", ())
        if "settings" in names:
            item.add_marker(pytest.mark.broker)


class _Databases:
    """Each test's copy of the template, made one test ahead and dropped behind, on a thread
    of its own. A `CREATE DATABASE ... TEMPLATE` takes about half a second on PostgreSQL 15
    (it WAL-logs the copy) and was most of the fast tier's time; made while the test before
    runs, it costs the test nothing. One thread, so creations and drops never pile up."""

    def __init__(self) -> None:
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="om-databases")
        self._ahead: tuple[int, str, Future[None]] | None = None

    def _make(self, infra: Infra) -> tuple[int, str, Future[None]]:
        n = next(_counter)
        name = f"om_{RUN_ID}_{n}"
        sql = f'CREATE DATABASE "{name}" TEMPLATE "{infra.template}"'
        return n, name, self._thread.submit(_admin_sync, infra.database_url, sql)

    async def take(self, infra: Infra) -> tuple[int, str]:
        if self._ahead is None:
            self._ahead = self._make(infra)
        n, name, made = self._ahead
        self._ahead = self._make(infra)  # the next test's, after this one on the thread
        await asyncio.wrap_future(made)
        return n, name

    def drop(self, infra: Infra, name: str) -> None:
        """Behind the test: nothing waits for it (the run's end drops what is left)."""
        self._thread.submit(_admin_sync, infra.database_url,
                            f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def close(self) -> None:
        self._thread.shutdown(wait=True)


def _admin_sync(database_url: str, sql: str) -> None:
    async def run() -> None:
        admin = await asyncpg.connect(_with_db(database_url, "postgres"))
        try:
            await admin.execute(sql)
        finally:
            await admin.close()

    asyncio.run(run())


_DATABASES = _Databases()


async def _database(infra: Infra) -> tuple[int, str]:
    return await _DATABASES.take(infra)


async def _drop_database(infra: Infra, name: str) -> None:
    _DATABASES.drop(infra, name)


@contextlib.contextmanager
def seeded_database(infra: Infra, statements: list[str], **values: object) -> Iterator[str]:
    """A database of its own, migrated, then seeded with `statements` (each formatted with
    `values`), for a module's read-only tests: seeding takes seconds, so it is done once.
    Yields its URL; dropped afterwards."""
    async def seed(url: str) -> None:
        conn = await asyncpg.connect(url)
        try:
            for statement in statements:
                await conn.execute(statement.format(**values))
        finally:
            await conn.close()

    _, name = asyncio.run(_database(infra))
    url = _with_db(infra.database_url, name)
    try:
        asyncio.run(seed(url))
        yield url
    finally:
        asyncio.run(_drop_database(infra, name))


def _test_settings(infra: Infra, n: int, name: str) -> Settings:
    return Settings(
        database_url=_with_db(infra.database_url, name),
        amqp_url=infra.amqp_url,
        ordermill_namespace=f"test.{RUN_ID}.{n}",
        relay_sweep_seconds=0.5,
        fraud_banned_email_domains="banned.example",
        fraud_banned_ips="192.0.2.66,198.51.100.0/24",
        startup_attempts=3,
        transient_attempts=3,
        log_format="text",
        # Closed by default: the tests' one RabbitMQ user is named for every party.
        storefront_users=TEST_USER, payment_publishers=TEST_USER, operator_users=TEST_USER,
    )


@pytest.fixture
async def settings(infra: Infra) -> AsyncIterator[Settings]:
    """A database of its own and a namespace of its own on the broker (deleted after)."""
    n, name = await _database(infra)
    s = _test_settings(infra, n, name)
    yield s
    connection = await aio_pika.connect(infra.amqp_url)
    async with connection:
        await delete_topology(await connection.channel(), Names(s.namespace))
    await _drop_database(infra, name)


@pytest.fixture
def benches(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], ModuleType]:
    """A bench script as a module, imported as it runs: the scripts import each other as
    top-level modules (`from pipeline import ...`), so bench/ goes on sys.path for the test,
    behind everything else there so that no bench file stands for another module
    (tests/test_bench_layout.py)."""
    monkeypatch.setattr(sys, "path", [*sys.path, str(ROOT / "bench")])
    return importlib.import_module


@pytest.fixture
async def db_settings(infra: Infra) -> AsyncIterator[Settings]:
    """A database of its own and no broker: for the broker-free harness (the fast tier)."""
    n, name = await _database(infra)
    yield _test_settings(infra, n, name)
    await _drop_database(infra, name)


@pytest.fixture
async def pool(db_settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    """A pool on the test's own database (its schema migrated), for code given a pool."""
    made = await db.create_pool(db_settings.database_url, max_size=6, attempts=3)
    try:
        yield made
    finally:
        await made.close()


@pytest.fixture
async def flow(db_settings: Settings) -> AsyncIterator[InMemoryFlow]:
    """Workers joined by their outbox, through the same pipeline, without RabbitMQ."""
    pool = await db.create_pool(db_settings.database_url, max_size=4, attempts=3)
    try:
        yield InMemoryFlow(db_settings, pool)
    finally:
        await pool.close()


async def eventually(
    check: Callable[[], Awaitable[Any]], *, timeout: float = 15.0, interval: float = 0.05
) -> Any:
    """Poll until `check` returns a truthy value; fail with the last value after `timeout`."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s (last: {last!r})")


@dataclass
class Listener:
    """A storefront's own queue bound to some events: what it received, by routing key."""

    queue: aio_pika.abc.AbstractQueue
    received: list[tuple[str, dict[str, Any], aio_pika.abc.AbstractIncomingMessage]] = field(
        default_factory=list)

    def bodies(self, key: str) -> list[dict[str, Any]]:
        return [body for k, body, _ in self.received if k == key]

    async def wait_for(self, key: str, match: Callable[[dict[str, Any]], bool],
                       timeout: float = 15.0) -> dict[str, Any]:
        async def found() -> dict[str, Any] | None:
            return next((b for b in self.bodies(key) if match(b)), None)
        return await eventually(found, timeout=timeout)


@dataclass
class Harness:
    settings: Settings
    names: Names
    pool: asyncpg.Pool
    connection: aio_pika.abc.AbstractRobustConnection
    exchange: aio_pika.abc.AbstractExchange
    _runtimes: list[tuple[Runtime, asyncio.Task[None]]] = field(default_factory=list)

    async def publish(self, key: str, body: Any, *, raw: bytes | None = None,
                      message_id: str | None = None, **props: Any) -> str:
        """Published as the harness's RabbitMQ user, like a configured party (user_id=None:
        anonymous)."""
        props.setdefault("user_id", amqp_user(self.settings.amqp_url))
        message = broker.json_message(body, routing_key=key, message_id=message_id, **props)
        if raw is not None:
            message.body = raw
        await broker.publish(self.exchange, key, message)
        return message.message_id

    async def start(self, workers: list[WorkerSpec], *, relay: bool = True,
                    **overrides: Any) -> Runtime:
        s = self.settings.model_copy(update=overrides) if overrides else self.settings
        runtime = Runtime(s)
        ready = asyncio.Event()
        task = asyncio.create_task(runtime.serve(workers, relay=relay, ready=ready))
        waiter = asyncio.create_task(ready.wait())
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()  # raise the start-up error
        self._runtimes.append((runtime, task))
        return runtime

    async def stop_all(self) -> None:
        for runtime, task in self._runtimes:
            runtime.stop()
            await asyncio.wait_for(task, timeout=30)
        self._runtimes.clear()

    async def listen(self, *keys: str) -> Listener:
        channel = await self.connection.channel()
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        for key in keys:
            await queue.bind(self.names.exchange, routing_key=key)
        listener = Listener(queue)

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            await message.ack()
            listener.received.append((message.routing_key or "", json.loads(message.body),
                                      message))

        await queue.consume(on_message)
        return listener

    async def dead_letters(self, service: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
        channel = await self.connection.channel()
        queue = await channel.declare_queue(self.names.dead_queue(service), passive=True)
        found = []
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            found.append(message)
        await channel.close()
        return found

    async def order(self, order_ref: str) -> asyncpg.Record | None:
        return await self.pool.fetchrow("SELECT * FROM orders WHERE order_ref = $1", order_ref)

    async def screened(self, order_ref: str, timeout: float = 15.0) -> asyncpg.Record:
        async def check() -> asyncpg.Record | None:
            row = await self.order(order_ref)
            return row if row is not None and row["screening"] != "queued" else None
        return await eventually(check, timeout=timeout)


@pytest.fixture
async def harness(settings: Settings) -> AsyncIterator[Harness]:
    pool = await db.create_pool(settings.database_url, max_size=4, attempts=3)
    connection = await broker.connect(settings.amqp_url, attempts=3)
    channel = await broker.open_publisher(connection)
    await declare_topology(connection, Names(settings.namespace),
                           delivery_limit=settings.queue_delivery_limit)
    exchange = await channel.get_exchange(Names(settings.namespace).exchange)
    h = Harness(settings, Names(settings.namespace), pool, connection, exchange)
    try:
        yield h
    finally:
        await h.stop_all()
        await connection.close()
        await pool.close()


def order_body(ref: str, **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "order_ref": ref,
        "client": {"email": f"{ref}@shop.example", "first_name": "Ann", "last_name": "Lee",
                   "country": "GB", "company": None},
        "items": [
            {"type": "product", "product": "starter", "billing_cycle": "monthly",
             "domain": f"{ref}.example", "price": "0.01"},
            {"type": "domain", "domain": f"{ref}.com", "action": "register", "years": 2},
        ],
        "currency": "USD",
        "payment_method": "stripe",
        "promo_code": None,
        "ip_address": "203.0.113.9",
        "send_confirmation": True,
        "generate_invoice": True,
    }
    body.update(overrides)
    return body
