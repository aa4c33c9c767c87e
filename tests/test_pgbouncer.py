"""PostgreSQL behind PgBouncer in transaction pooling (DB_PGBOUNCER): a PgBouncer of the test's
own, from Debian's package, on a free port in front of the local PostgreSQL, with fewer server
connections than clients so that consecutive transactions of one client land on different
server sessions. Skipped, saying why, where no `pgbouncer` is installed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from test_provisioning import pay, starter

from conftest import Harness, _with_db, eventually
from console.app import read_only_pool
from services.fraud.worker import worker as fraud_worker
from services.placement.worker import worker as placement_worker
from services.provisioning.worker import worker as provisioning_worker
from shared import db
from shared.errors import ConfigurationError
from shared.settings import Settings
from test_processes import _free_port

PGBOUNCER = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin")
needs_pgbouncer = pytest.mark.skipif(
    PGBOUNCER is None, reason="no pgbouncer: apt-get install pgbouncer (Debian's package)")

SERVER_CONNECTIONS = 2  # per database and user: fewer than the clients below


def test_behind_pgbouncer_the_cache_is_off_and_listen_goes_direct_or_nowhere() -> None:
    plain = Settings(database_url="postgresql://app@db:5432/om")
    assert (plain.statement_cache_size, plain.listen_url, plain.direct_url) == (
        100, plain.database_url, plain.database_url)
    bounced = Settings(database_url="postgresql://app@bouncer:6432/om", db_pgbouncer=True)
    assert (bounced.statement_cache_size, bounced.listen_url) == (0, None)
    direct = bounced.model_copy(update={"database_direct_url": "postgresql://app@db:5432/om"})
    assert direct.listen_url == direct.direct_url == "postgresql://app@db:5432/om"


@contextlib.asynccontextmanager
async def pgbouncer(upstream: str, users: tuple[str, ...] = ()) -> AsyncIterator[int]:
    """PgBouncer, pool_mode=transaction, trust, on a free port; stopped after. It refuses to
    run as root: as the `postgres` user then, in a directory that user owns."""
    assert PGBOUNCER is not None
    # Not under tmp_path: pytest's directories are the root user's alone.
    home = Path(tempfile.mkdtemp(prefix="ordermill-pgbouncer-"))
    port = _free_port()
    target = urlsplit(upstream)
    (home / "userlist.txt").write_text("".join(f'"{u}" ""\n' for u in ("postgres", *users)))
    (home / "pgbouncer.ini").write_text(
        "[databases]\n"
        f"* = host={target.hostname} port={target.port or 5432}\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = trust\nauth_file = {home / 'userlist.txt'}\n"
        f"pool_mode = transaction\ndefault_pool_size = {SERVER_CONNECTIONS}\n"
        "max_client_conn = 200\nignore_startup_parameters = extra_float_digits,options\n"
        f"logfile = {home / 'pgbouncer.log'}\npidfile = {home / 'pgbouncer.pid'}\n")
    as_user: list[str] = []
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        for path in (home, *home.iterdir()):
            os.chown(path, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    with (home / "stderr").open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            *as_user, PGBOUNCER, str(home / "pgbouncer.ini"),
            stdout=asyncio.subprocess.DEVNULL, stderr=err)
    try:
        async def listening() -> bool:
            if proc.returncode is not None:
                said = [p.read_text() for p in (home / "stderr", home / "pgbouncer.log")
                        if p.exists()]
                raise AssertionError(f"pgbouncer exited: {' '.join(said)[-500:]}")
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                return True
            return False
        await eventually(listening, timeout=20)
        yield port
    finally:
        # SIGINT, pgbouncer's immediate shutdown, to pgbouncer itself: runuser passes on no
        # signal it is sent.
        pidfile = home / "pgbouncer.pid"
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(pidfile.read_text().split()[0]), signal.SIGINT)
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(pidfile.read_text().split()[0]), signal.SIGKILL)
            proc.kill()
            await proc.wait()
        shutil.rmtree(home, ignore_errors=True)


def through_bouncer(url: str, port: int) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{parts.username or 'postgres'}@127.0.0.1:{port}"))


@needs_pgbouncer
async def test_orders_are_placed_screened_and_paid_with_the_workers_behind_pgbouncer(
    harness: Harness,
) -> None:
    """Placement, fraud and provisioning (payments, the job runner's leased queue, the outbox
    relay) with DATABASE_URL at PgBouncer and DB_PGBOUNCER set, no DATABASE_DIRECT_URL: no
    prepared statement is looked for on another server session, and with no LISTEN the
    timers wake the relay and the job runner."""
    s = harness.settings
    async with pgbouncer(s.database_url) as port:
        behind = {"database_url": through_bouncer(s.database_url, port), "db_pgbouncer": True,
                  "db_pool_max": 6, "job_poll_seconds": 0.5, "job_backoff_seconds": 0.2,
                  "fraud_velocity_max_orders": 1000}  # the orders share one IP address
        assert Settings(**{**s.model_dump(), **behind}).listen_url is None
        bounced = s.model_copy(update=behind)
        await harness.start([placement_worker(bounced), fraud_worker(bounced),
                             provisioning_worker(bounced)], **behind)
        refs = [f"bounce-{n:02d}" for n in range(30)]
        await asyncio.gather(*(harness.publish("order.place", starter(ref)) for ref in refs))
        orders = [await harness.screened(ref, timeout=60) for ref in refs]
        invoices = {r["order_id"]: r for r in await harness.pool.fetch(
            "SELECT order_id, id, total FROM invoices WHERE order_id = ANY($1::bigint[])",
            [o["id"] for o in orders])}
        await asyncio.gather(*(pay(harness, str(invoices[o["id"]]["total"]), f"ch_{o['id']}",
                                   invoice_id=invoices[o["id"]]["id"]) for o in orders))

        async def all_active() -> bool:
            return await harness.pool.fetchval(
                "SELECT count(*) FROM services WHERE status = 'Active'") == len(refs)
        await eventually(all_active, timeout=90)

        async def all_published() -> bool:  # by the relay's timer: it hears no NOTIFY here
            return await harness.pool.fetchval(
                "SELECT count(*) FROM outbox WHERE published_at IS NULL") == 0
        await eventually(all_published, timeout=30)
        await harness.stop_all()
    assert {o["screening"] for o in orders} == {"passed"}
    assert await harness.pool.fetchval(
        "SELECT count(*) FROM payments WHERE status = 'applied'") == len(refs)
    assert await harness.pool.fetchval(
        "SELECT count(*) FROM invoices WHERE status = 'Paid'") == len(refs)
    for service in ("placement", "fraud", "provisioning"):
        assert await harness.dead_letters(service) == []


@needs_pgbouncer
async def test_the_statement_cache_must_be_off_behind_pgbouncer(
    db_settings: Settings,
) -> None:
    """The reason for DB_PGBOUNCER: with asyncpg's statement cache on, clients sharing server
    sessions meet each other's prepared statements (or miss their own); with it off, none."""
    async with pgbouncer(db_settings.database_url) as port:
        url = through_bouncer(db_settings.database_url, port)

        async def hammer(cache: int) -> list[BaseException]:
            pool = await db.create_pool(url, max_size=6, attempts=1, statement_cache_size=cache)
            try:
                async def one(n: int) -> None:
                    for i in range(30):
                        async with pool.acquire() as conn:  # a statement used twice
                            for _ in range(2):
                                await conn.fetchval(f"SELECT {n % 3} + count(*) FROM products"
                                                    " WHERE $1::int >= 0", i)
                results = await asyncio.gather(*(one(n) for n in range(12)), return_exceptions=True)
            finally:
                await pool.close()
            return [r for r in results if isinstance(r, BaseException)]

        assert await hammer(0) == []
        # With it on, the clash depends on how the clients interleave on the server sessions
        # (one run in about eight of the fast tier met none on a quiet machine): a few rounds.
        for _ in range(5):
            if failures := await hammer(100):
                break
        assert failures and all(isinstance(f, asyncpg.PostgresError) for f in failures), failures


@needs_pgbouncer
async def test_migrations_behind_pgbouncer_leave_no_lock_held(
    db_settings: Settings,
) -> None:
    """Two migrators at once through PgBouncer on a new database: every migration applied
    once, and no advisory lock left on a server session (a session lock taken on one and
    released on another would be held until PgBouncer closes it, blocking the next migrate)."""
    name = f"{urlsplit(db_settings.database_url).path.lstrip('/')}_bounce"
    admin = await asyncpg.connect(_with_db(db_settings.database_url, "postgres"))
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        async with pgbouncer(db_settings.database_url) as port:
            url = through_bouncer(_with_db(db_settings.database_url, name), port)
            pools = [await db.create_pool(url, max_size=2, attempts=1, statement_cache_size=0)
                     for _ in range(2)]
            try:
                applied = await asyncio.gather(*(db.migrate(pool) for pool in pools))
                again = await db.migrate(pools[0])
            finally:
                for pool in pools:
                    await pool.close()
            files = len(db._migration_files())
            assert sorted(len(a) for a in applied) in ([0, files], *(
                [k, files - k] for k in range(1, files)))  # shared, each migration once
            assert again == []
            direct = await asyncpg.connect(_with_db(db_settings.database_url, name))
            try:
                assert await direct.fetchval("SELECT count(*) FROM schema_migrations") == files
                # This database's only: pg_locks is the whole server's, where other tests
                # running at once take their own migration locks (a flake under load).
                assert await direct.fetchval(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND database ="
                    " (SELECT oid FROM pg_database WHERE datname = current_database())") == 0
            finally:
                await direct.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@needs_pgbouncer
async def test_the_console_behind_pgbouncer_is_read_only_by_its_role_or_refuses_to_start(
    db_settings: Settings,
) -> None:
    """PgBouncer passes no `default_transaction_read_only` start-up parameter on and shares
    server sessions: behind it the console's read-only default must be its role's."""
    role = f"om_console_{urlsplit(db_settings.database_url).path.rsplit('_', 1)[-1]}_{os.getpid()}"
    admin = await asyncpg.connect(_with_db(db_settings.database_url, "postgres"))
    await admin.execute(f'CREATE ROLE "{role}" LOGIN')
    await admin.execute(f'GRANT pg_read_all_data TO "{role}"')
    await admin.execute(f'ALTER ROLE "{role}" SET default_transaction_read_only = on')
    try:
        async with pgbouncer(db_settings.database_url, users=(role,)) as port:
            url = through_bouncer(db_settings.database_url, port)
            as_postgres = db_settings.model_copy(update={"database_url": url, "db_pgbouncer": True})
            with pytest.raises(ConfigurationError, match="ALTER ROLE postgres SET default_transa"):
                await read_only_pool(as_postgres)
            as_console = as_postgres.model_copy(update={
                "database_url": url.replace("postgres@", f"{role}@", 1)})
            pool = await read_only_pool(as_console)
            try:
                for _ in range(3):  # whichever server session a transaction lands on
                    async with pool.acquire() as conn, conn.transaction():
                        assert await conn.fetchval("SHOW transaction_read_only") == "on"
                        assert await conn.fetchval("SELECT count(*) FROM products") > 0
            finally:
                await pool.close()
    finally:
        await admin.execute(f'DROP OWNED BY "{role}"')
        await admin.execute(f'DROP ROLE "{role}"')
        await admin.close()
