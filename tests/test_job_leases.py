"""Job leases against a slow cPanel server (the fake WHM): a lease renewed while the call
runs keeps the job however long the call takes; a runner killed during the call has its
job taken over within the lease; a runner that finds its claim lost records nothing."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from fakes.whm import FakeWhm
from test_provisioning import FAST_JOBS
from test_provisioning_servers import active, place_and_pay, service

from conftest import Harness, eventually
from services.fraud.worker import worker as fraud_worker
from services.placement.worker import worker as placement_worker
from services.provisioning.jobs import JobRunner
from services.provisioning.worker import worker as provisioning_worker
from test_processes import ORDERMILL, worker_env


@pytest.fixture
async def whm(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeWhm]:
    """The catalog's server web1 pointed at a local WHM (as in test_provisioning_servers)."""
    async with FakeWhm() as server:
        await harness.pool.execute(
            "UPDATE servers SET hostname = $1, token_env = 'WHM_TEST_TOKEN' WHERE name = 'web1'",
            f"127.0.0.1:{server.port}")
        monkeypatch.setenv("WHM_TEST_TOKEN", server.token)
        harness.settings = harness.settings.model_copy(update={**FAST_JOBS, "whm_scheme": "http"})
        yield server


async def outcome(h: Harness, order_id: int) -> dict[str, Any]:
    """What was recorded for the order's create job: history rows and events."""
    return dict(await h.pool.fetchrow(
        "SELECT (SELECT count(*) FROM order_history WHERE order_id = $1"
        "   AND action = 'service created') AS history,"
        " (SELECT count(*) FROM outbox WHERE routing_key = 'service.created'"
        "   AND body->>'order_id' = $1::text) AS events", order_id))


async def test_a_call_longer_than_the_lease_keeps_its_claim(harness: Harness, whm: FakeWhm) -> None:
    """createacct takes three leases; two runners poll all along: the one that claimed the
    job keeps it (its heartbeat renews the lease) and the account is created once."""
    s = harness.settings.model_copy(update={"job_lease_seconds": 2.0, "job_poll_seconds": 0.2})
    whm.hang_next("createacct", 6.0)
    await harness.start([placement_worker(s), fraud_worker(s), provisioning_worker(s)])
    await harness.start([provisioning_worker(s)])  # a second runner, polling every 0.2 s
    order = await place_and_pay(harness, "lease-long")
    row = await eventually(lambda: active(harness, order["id"]), timeout=60)
    assert (row["job_status"], row["attempts"]) == ("done", 1)  # never taken over
    assert whm.calls["createacct"] == 1 and len(whm.accounts) == 1
    assert await outcome(harness, order["id"]) == {"history": 1, "events": 1}


async def test_a_claim_found_lost_during_the_call_records_nothing(
    harness: Harness, whm: FakeWhm,
) -> None:
    s = harness.settings.model_copy(update={"job_lease_seconds": 1.5, "job_poll_seconds": 0.2})
    whm.hang_next("createacct", 60.0)  # only a cancel ends it within the test
    provisioning = provisioning_worker(s)
    runner: JobRunner = provisioning.background[0].__self__
    await harness.start([placement_worker(s), fraud_worker(s), provisioning])
    order = await place_and_pay(harness, "lease-lost")
    await eventually(lambda: asyncio.sleep(0, whm.calls["createacct"] == 1))
    # Another runner has the job now (as after a stall longer than the lease); it keeps it
    # for an hour, so whatever this runner does next is seen.
    await harness.pool.execute(
        "UPDATE jobs SET leased_by = 'another/runner', lease_until = now() + interval '1 hour'"
        " WHERE order_id = $1 AND kind = 'create'", order["id"])
    # The heartbeat finds the claim lost: the call is cancelled, the runner's slot freed.
    await eventually(lambda: asyncio.sleep(0, not runner.runner._running), timeout=15)
    row = await service(harness, order["id"])
    assert (row["status"], row["live"], row["job_status"], row["attempts"]) == (
        "Pending", False, "running", 1)
    assert await outcome(harness, order["id"]) == {"history": 0, "events": 0}
    # The other runner's lease runs out: the job is taken over and done, once.
    await harness.pool.execute(
        "UPDATE jobs SET lease_until = now() WHERE order_id = $1 AND kind = 'create'", order["id"])
    row = await eventually(lambda: active(harness, order["id"]), timeout=30)
    assert (row["job_status"], row["attempts"]) == ("done", 2)
    assert len(whm.accounts) == 1
    assert await outcome(harness, order["id"]) == {"history": 1, "events": 1}


async def run_provisioning(h: Harness, log: Path, **env: str) -> asyncio.subprocess.Process:
    handle = log.open("ab")
    return await asyncio.create_subprocess_exec(
        ORDERMILL, "run", "provisioning", env=worker_env(h.settings, **env),
        stdout=handle, stderr=handle)


@pytest.mark.slow
async def test_a_runner_killed_during_a_slow_create_is_taken_over_within_the_lease(
    harness: Harness, whm: FakeWhm, tmp_path: Path,
) -> None:
    """Two `ordermill run provisioning` processes; the one whose createacct is under way is
    SIGKILLed. It renews its lease no more, so the other takes the job over once the lease
    (3 s) runs out and creates the account: one account on the server, one outcome."""
    whm.hang_next("createacct", 120)  # the killed runner's call: never answered in time
    env = {"WHM_SCHEME": "http", "WHM_TEST_TOKEN": whm.token, "JOB_LEASE_SECONDS": "3",
           "JOB_POLL_SECONDS": "0.5", "JOB_BACKOFF_SECONDS": "0.2"}
    await harness.start([placement_worker(harness.settings), fraud_worker(harness.settings)])
    log = tmp_path / "runners.log"
    first = await run_provisioning(harness, log, **env)
    second = None
    try:
        order = await place_and_pay(harness, "lease-kill")
        await eventually(lambda: asyncio.sleep(0, whm.calls["createacct"] == 1), timeout=60)
        second = await run_provisioning(harness, log, **env)
        first.kill()  # SIGKILL during the create: no chance to release anything
        await first.wait()
        row = await service(harness, order["id"])
        assert (row["status"], row["job_status"], row["attempts"]) == ("Pending", "running", 1)
        row = await eventually(lambda: active(harness, order["id"]), timeout=90)
    finally:
        for process in (first, second):
            if process is not None:
                with contextlib.suppress(ProcessLookupError):
                    process.terminate()
                await process.wait()
    assert (row["job_status"], row["attempts"]) == ("done", 2)
    assert len(whm.accounts) == 1 and whm.calls["createacct"] == 2
    assert await outcome(harness, order["id"]) == {"history": 1, "events": 1}


async def test_a_connection_dropped_while_recording_a_create_is_retried_in_process(
    harness: Harness, whm: FakeWhm, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The account is created, then the transaction that records it loses its database
    connection (a PostgreSQL restart; seen in bench/chaos.py). The runner writes the outcome
    again at once on a fresh connection, as a transient error is retried everywhere else: no
    attempt spent, no second call to the server, no wait for a backoff or for its own lease."""
    s = harness.settings
    provisioning = provisioning_worker(s)
    runner: JobRunner = provisioning.background[0].__self__
    finish, dropped = runner.queue.finish_many, []

    async def finish_once_cut(conn: Any, rows: Any, status: str, **values: Any) -> set[int]:
        if status == "done" and not dropped:
            dropped.append(rows[0]["id"])  # this session ends: the server "restarts" under it
            await conn.execute("SELECT pg_terminate_backend(pg_backend_pid())")
        return await finish(conn, rows, status, **values)

    monkeypatch.setattr(runner.queue, "finish_many", finish_once_cut)
    await harness.start([placement_worker(s), fraud_worker(s), provisioning])
    order = await place_and_pay(harness, "drop-on-record")
    row = await eventually(lambda: active(harness, order["id"]), timeout=60)
    assert dropped, "the outcome was recorded without meeting the dropped connection"
    assert (row["job_status"], row["attempts"]) == ("done", 1)
    assert whm.calls["createacct"] == 1 and whm.calls["accountsummary"] == 1
    assert len(whm.accounts) == 1
    assert await outcome(harness, order["id"]) == {"history": 1, "events": 1}


async def test_a_connection_dropped_before_the_call_is_retried_in_process(
    harness: Harness, whm: FakeWhm, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A job's own read of its service loses its database connection (a PostgreSQL restart,
    seen in bench/chaos.py with a real restart: every claim being started then failed). A
    job's claim brings its service; it reads its own when the claim brought none, and on a
    retry: that read is made here by dropping what the claim brought. Nothing has reached
    the server yet: the read is done again at once on a fresh connection, no attempt spent
    and no backoff waited (30 s by default), one account."""
    read_service, dropped = asyncpg.Pool.fetchrow, []

    async def nothing_read_with_the_claim(self: JobRunner, pool: Any, jobs: Any) -> None:
        return None

    monkeypatch.setattr(JobRunner, "read_ahead", nothing_read_with_the_claim)

    async def fetchrow_once_cut(pool: asyncpg.Pool, query: str, *args: Any, **kw: Any) -> Any:
        if "FROM services s JOIN orders o" in query and not dropped:
            dropped.append(args)  # this session ends: the server "restarts" under the read
            async with pool.acquire() as conn:
                await conn.execute("SELECT pg_terminate_backend(pg_backend_pid())")
        return await read_service(pool, query, *args, **kw)

    monkeypatch.setattr(asyncpg.Pool, "fetchrow", fetchrow_once_cut)
    s = harness.settings
    await harness.start([placement_worker(s), fraud_worker(s), provisioning_worker(s)])
    order = await place_and_pay(harness, "drop-before-call")
    row = await eventually(lambda: active(harness, order["id"]), timeout=60)
    assert dropped, "the job's read never met the dropped connection"
    assert (row["job_status"], row["attempts"], row["last_error"]) == ("done", 1, None)
    assert whm.calls["createacct"] == 1 and len(whm.accounts) == 1
    assert await outcome(harness, order["id"]) == {"history": 1, "events": 1}
