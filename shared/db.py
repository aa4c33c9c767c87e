"""PostgreSQL access: the pool, database creation and migrations."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from importlib import resources
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from tenacity import (
    AsyncRetrying,
    before_sleep_log,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from shared import wakeup
from shared.errors import ConfigurationError

log = logging.getLogger("ordermill.db")

# Errors that mean "try again": the server is away, restarting or overloaded,
# or this transaction lost a race. They say nothing about the message itself.
TRANSIENT_DB_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    ConnectionError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.DeadlockDetectedError,
    asyncpg.exceptions.SerializationError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.LockNotAvailableError,
    # A failover that left the address on a standby, or a database set read-only for
    # maintenance: writes wait for a primary like they wait for a restart.
    asyncpg.exceptions.ReadOnlySQLTransactionError,
    # asyncpg's own: a server refused for `target_session_attrs=read-write` in the URL, and a
    # connection cut by the server mid-statement ("cannot switch to state ..."). Never the
    # message's fault; a retry gets a fresh connection.
    asyncpg.exceptions.InternalClientError,
)


class ReadOnlyDatabase(ConnectionError):
    """A worker's connection reached a server that takes no writes (a hot standby, or
    `default_transaction_read_only` on): refused like an unreachable server, so the pool never
    keeps a connection that every handler would fail on."""

class MigrationFailed(ConfigurationError):
    """A migration the database refused (a lock not granted in time, a check that failed):
    rolled back whole, nothing of it applied; the message names it and says what to do."""


class SchemaNotReady(ConfigurationError):
    """The database lacks migrations this code needs and this worker may not (or is told not
    to) apply them: it refuses to start, in one line, rather than fail on every message."""


# Advisory lock key: one migrator at a time. Taken per migration, for its transaction
# (pg_advisory_xact_lock): a session lock would be held by whichever server connection a pooler
# in transaction mode (PgBouncer) ran it on, and released on another, that is never.
_MIGRATION_LOCK = 7_311_204_517


def planned_once(param: str, array_type: str) -> str:
    """An array parameter as a statement that runs with a generic plan takes it: `o.id =
    ANY($1::bigint[])` becomes `o.id = ANY(...)` of this, a scalar subquery (an InitPlan
    run once per execution) cast back to the array's type.

    PostgreSQL plans a prepared statement afresh (a custom plan) for each execution until
    its generic plan, made for any value, looks no dearer than the custom ones did. Given
    the array itself, a custom plan counts its elements (a batch's one to three orders; an
    empty array, nothing to read); the generic one assumes ten: for the fraud facts read 164
    against 799 in cost, so every execution was planned again (0.6 ms of planning for 0.2 of
    execution on 50,000 orders; docs/performance.md, "Custom plans for a batch's arrays").
    Behind a subquery, custom and generic plans both assume ten; the generic one wins after
    the fifth execution and is kept for the connection. Use it where no value of the array
    deserves a plan of its own (primary keys, a batch's few keys of a small table): the
    plan is then the one a custom plan for ten values would be."""
    return f"(SELECT {param}::{array_type})::{array_type}"


def retrying(attempts: int) -> AsyncRetrying:
    """Attempts (bounded, with backoff) at a step a database restart or failover may cut."""
    return AsyncRetrying(
        stop=stop_after_attempt(attempts),
        wait=wait_exponential(multiplier=0.2, max=5),
        retry=retry_if_exception_type(TRANSIENT_DB_ERRORS),
        before_sleep=before_sleep_log(log, logging.WARNING),
        reraise=True,
    )


async def init_connection(conn: asyncpg.Connection) -> None:
    for type_name in ("json", "jsonb"):
        await conn.set_type_codec(
            type_name, encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
        )


async def init_writable_connection(conn: asyncpg.Connection) -> None:
    if await conn.fetchval("SELECT current_setting('transaction_read_only') = 'on'"):
        raise ReadOnlyDatabase(
            "the database server takes no writes (a standby, or set read-only)")
    await init_connection(conn)


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Pool release without the reset query: Ordermill leaves no session state behind
    (no SET, no LISTEN on pooled connections, advisory locks only for a transaction), and the
    reset would cost a round trip per message. An open transaction is still rolled back."""


async def create_pool(database_url: str, *, max_size: int = 10, attempts: int = 30,
                      writable: bool = False,
                      server_settings: dict[str, str] | None = None,
                      statement_cache_size: int = 100,
                      on_connect: Callable[[asyncpg.Connection], Awaitable[None]] | None = None,
                      ) -> asyncpg.Pool:
    """A pool, waiting (bounded) for PostgreSQL to come up; with `writable`, for a server that
    takes writes (a worker's: after a failover the address may reach a standby for a while).
    `server_settings` are each connection's (the console's read-only default);
    `statement_cache_size` 0 behind PgBouncer (Settings.statement_cache_size); `on_connect`
    is called with each new connection, the first ones and those made again after a restart
    (the console's warm-up: console/warm_up.py)."""
    init = init_writable_connection if writable else init_connection
    if on_connect is not None:
        first = init

        async def init(conn: asyncpg.Connection) -> None:
            await first(conn)
            await on_connect(conn)

    async for attempt in retrying(attempts):
        with attempt:
            return await asyncpg.create_pool(
                database_url, min_size=1, max_size=max_size,
                statement_cache_size=statement_cache_size,
                init=init,
                # A connection that cannot be made in 10 s (a host gone from the network)
                # fails like a refused one, so an outage is seen in seconds, not minutes.
                timeout=10, command_timeout=60, reset=_keep_session,
                server_settings=server_settings,
                # Wakes this process's loops after a commit that wrote their rows (wakeup.py).
                connection_class=wakeup.Connection,
            )
    raise AssertionError("unreachable")


def _split_database(database_url: str) -> tuple[str, str]:
    parts = urlsplit(database_url)
    name = parts.path.lstrip("/") or "postgres"
    admin = urlunsplit(parts._replace(path="/postgres"))
    return admin, name


async def ensure_database(database_url: str, *, attempts: int = 30,
                          statement_cache_size: int = 100) -> bool:
    """Create the database named by the URL if it is missing. True when created.

    The database itself is tried first: a role that may only use it (a worker's DML-only
    role) finds it there without the `postgres` database or the right to create one."""
    admin_url, name = _split_database(database_url)
    try:
        async for attempt in retrying(attempts):
            with attempt:
                conn = await asyncpg.connect(database_url,
                                             statement_cache_size=statement_cache_size)
        await conn.close()
        return False
    except asyncpg.exceptions.InvalidCatalogNameError:
        pass  # missing: created below
    async for attempt in retrying(attempts):
        with attempt:
            conn = await asyncpg.connect(admin_url, statement_cache_size=statement_cache_size)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if exists:
            return False
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        except asyncpg.exceptions.InsufficientPrivilegeError:
            user = await conn.fetchval("SELECT current_user")
            raise SchemaNotReady(
                f"database {name} does not exist and user {user} may not create it:"
                " run `ordermill migrate` as the database owner") from None
        except (asyncpg.exceptions.DuplicateDatabaseError, asyncpg.exceptions.UniqueViolationError):
            # Another migrator won the race; one still committing shows as a unique violation
            # on pg_database rather than as a duplicate database.
            return False
        log.info("database created", extra={"database": name})
        return True
    finally:
        await conn.close()


def _migration_files() -> list[tuple[str, str]]:
    folder = resources.files("shared") / "migrations"
    files = sorted(p for p in folder.iterdir() if p.name.endswith(".sql"))
    return [(p.name.removesuffix(".sql"), p.read_text()) for p in files]


async def migrate(pool: asyncpg.Pool) -> list[str]:
    """Apply pending migrations in order, once: each in a transaction holding the migration
    lock, which checks again that no other migrator applied it meanwhile."""
    applied_now: list[str] = []
    async with pool.acquire() as conn:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
        for version, sql in _migration_files():
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
                if await conn.fetchval(
                        "SELECT 1 FROM schema_migrations WHERE version = $1", version):
                    continue
                try:
                    await conn.execute(sql)
                except asyncpg.exceptions.InsufficientPrivilegeError:
                    raise  # ensure_schema says who may apply it
                except asyncpg.PostgresError as exc:
                    raise MigrationFailed(_refusal(version, exc)) from None
                await conn.execute(
                    "INSERT INTO schema_migrations (version) VALUES ($1)", version
                )
            applied_now.append(version)
            log.info("migration applied", extra={"version": version})
    return applied_now


def _refusal(version: str, exc: asyncpg.PostgresError) -> str:
    """One line: the migration, the server's message, and its hint, or what to do about a
    lock (a migration waits a few seconds for one, behind a long transaction, then gives up)."""
    message = " ".join((getattr(exc, "message", None) or str(exc)).split())
    if isinstance(exc, asyncpg.exceptions.LockNotAvailableError):
        hint = "another transaction held a lock it needs: run `ordermill migrate` again"
    else:
        hint = " ".join((getattr(exc, "hint", None) or "").split())
    return (f"migration {version} failed and was rolled back: {message}"
            + (f" ({hint})" if hint else ""))


async def pending_migrations(conn: asyncpg.Connection) -> list[str]:
    """The migration files not yet applied to this database (all of them on a new one)."""
    if await conn.fetchval("SELECT to_regclass('schema_migrations') IS NULL"):
        return [version for version, _ in _migration_files()]
    done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
    return [version for version, _ in _migration_files() if version not in done]


async def ensure_schema(pool: asyncpg.Pool, *, migrate_on_start: bool) -> list[str]:
    """A worker's start: the schema must be current. It only reads `schema_migrations` when
    it is (no DDL, no lock: a DML-only role starts); it applies what is missing when
    `migrate_on_start` allows and its role may (the quick start's single user); otherwise it
    refuses to start with one line telling the operator to run `ordermill migrate` as the
    database owner. Returns the migrations applied now."""
    async with pool.acquire() as conn:
        missing = await pending_migrations(conn)
        user = await conn.fetchval("SELECT current_user")
        name = await conn.fetchval("SELECT current_database()")
    if not missing:
        return []
    listed = ", ".join(missing[:3]) + (f" (+{len(missing) - 3} more)" if len(missing) > 3 else "")
    if not migrate_on_start:
        raise SchemaNotReady(
            f"database {name} lacks migration(s) {listed} and MIGRATE_ON_START is off:"
            " run `ordermill migrate` as the database owner")
    try:
        return await migrate(pool)
    except asyncpg.exceptions.InsufficientPrivilegeError:
        raise SchemaNotReady(
            f"database {name} lacks migration(s) {listed} and user {user} may not apply them:"
            " run `ordermill migrate` as the database owner") from None
