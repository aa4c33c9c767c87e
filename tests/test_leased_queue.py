"""The leased queue (shared/leased_queue.py) on a table of its own, in a real database:
claims, takeover of expired leases, backoff and parking, release, lanes, and the heartbeat
that keeps a claim while its work runs and tells the work when the claim is lost."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta

import asyncpg
import pytest

from conftest import eventually
from shared import db
from shared.leased_queue import NOW, Backoff, ClaimLost, Finisher, LeasedQueue, Runner, Table
from shared.settings import Settings

# Status words of its own, to show the queue takes them from the description.
WORK = Table(name="work", channel="test_work", pending="waiting", claimed="busy",
             parked="stuck", lane="lane", order="id")


@pytest.fixture
async def pool(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    pool = await db.create_pool(settings.database_url, max_size=4, attempts=3)
    await pool.execute(
        "CREATE TABLE work (id bigserial PRIMARY KEY, status text NOT NULL DEFAULT 'waiting',"
        " attempts int NOT NULL DEFAULT 0, next_attempt_at timestamptz NOT NULL DEFAULT now(),"
        " lease_until timestamptz, leased_by text, last_error text,"
        " lane text NOT NULL DEFAULT '', done_at timestamptz, result text)")
    try:
        yield pool
    finally:
        await pool.close()


def queue(lease: float = 30.0, **backoff: float) -> LeasedQueue:
    return LeasedQueue(WORK, lease=timedelta(seconds=lease),
                       backoff=Backoff(**{"max_attempts": 3, "base_seconds": 60.0, **backoff}))


async def add(pool: asyncpg.Pool, n: int = 1, *, lane: str = "", later: float = 0.0) -> list[int]:
    return [r["id"] for r in await pool.fetch(
        "INSERT INTO work (lane, next_attempt_at) SELECT $1, now() + $2::interval"
        " FROM generate_series(1, $3) RETURNING id", lane, timedelta(seconds=later), n)]


async def row(pool: asyncpg.Pool, id_: int) -> asyncpg.Record:
    return await pool.fetchrow("SELECT * FROM work WHERE id = $1", id_)


async def test_a_claim_takes_due_rows_once_and_an_expired_lease_is_taken_over(pool) -> None:
    first, second = queue(), queue()
    due = await add(pool, 2)
    await add(pool, later=3600)  # not due yet
    claimed = await first.claim(pool, 10)
    assert [r["id"] for r in claimed] == due
    assert {(r["status"], r["attempts"]) for r in claimed} == {("busy", 1)}
    assert all(r["leased_by"].startswith(first.runner_id + "/") for r in claimed)
    assert len({r["leased_by"] for r in claimed}) == 2  # a token per claim
    assert await second.claim(pool, 10) == []  # leased: nobody else's
    # The first runner died: once its lease runs out, the row is due again.
    await pool.execute("UPDATE work SET lease_until = now() - interval '1 second'"
                       " WHERE id = $1", due[0])
    [taken] = await second.claim(pool, 10)
    assert (taken["id"], taken["attempts"]) == (due[0], 2)
    assert not await first.finish(pool, claimed[0], "done")  # its claim is gone
    assert await second.finish(pool, taken, "done", done_at=NOW, result="ok")
    done = await row(pool, due[0])
    assert (done["status"], done["result"], done["lease_until"]) == ("done", "ok", None)
    assert done["done_at"] is not None


async def test_concurrent_claims_never_share_a_row(pool) -> None:
    await add(pool, 40)
    runners = [queue() for _ in range(4)]
    batches = await asyncio.gather(*(q.claim(pool, 15) for q in runners))
    ids = [r["id"] for batch in batches for r in batch]
    assert len(ids) == len(set(ids)) == 40


async def test_a_failure_backs_off_then_parks_and_a_definitive_one_parks_at_once(pool) -> None:
    q = queue()
    [id_] = await add(pool)
    for attempt in (1, 2):
        [claimed] = await q.claim(pool, 1)
        assert claimed["attempts"] == attempt
        assert await q.fail(pool, claimed, "503 from the server") == "waiting"
        waiting = await row(pool, id_)
        wait = (waiting["next_attempt_at"] - await pool.fetchval("SELECT now()")).total_seconds()
        expected = 60 * 2 ** (attempt - 1)  # exponential, with +-10 % jitter
        assert expected * 0.85 < wait <= expected * 1.1
        assert (waiting["status"], waiting["last_error"]) == ("waiting", "503 from the server")
        await pool.execute("UPDATE work SET next_attempt_at = now() WHERE id = $1", id_)
    [claimed] = await q.claim(pool, 1)
    assert await q.fail(pool, claimed, "503 again") == "stuck"  # attempts spent: parked
    assert await q.claim(pool, 1) == []
    [other] = await add(pool)
    [claimed] = await q.claim(pool, 1)
    assert await q.fail(pool, claimed, "no such package", transient=False) == "stuck"
    assert (await row(pool, other))["attempts"] == 1
    # A claim that was lost fails nothing.
    [third] = await add(pool)
    [claimed] = await q.claim(pool, 1)
    await pool.execute("UPDATE work SET leased_by = 'someone-else' WHERE id = $1", third)
    assert await q.fail(pool, claimed, "late") is None
    assert (await row(pool, third))["status"] == "busy"


def test_backoff_doubles_with_jitter_up_to_its_cap() -> None:
    backoff = Backoff(max_attempts=20, base_seconds=30, max_seconds=3600, jitter=0.1)
    for attempts, base in ((1, 30), (2, 60), (5, 480), (12, 3600)):
        delays = {backoff.delay(attempts).total_seconds() for _ in range(20)}
        assert all(base * 0.9 <= d <= base * 1.1 for d in delays)
        assert len(delays) > 1  # not all at once
    assert not backoff.spent(19) and backoff.spent(20)


async def test_a_release_hands_the_row_back_at_once_without_an_attempt(pool) -> None:
    q = queue()
    [id_] = await add(pool)
    claimed = await q.claim(pool, 1)
    await q.release(pool, claimed)
    back = await row(pool, id_)
    assert (back["status"], back["attempts"], back["lease_until"]) == ("waiting", 0, None)
    assert [r["id"] for r in await q.claim(pool, 1)] == [id_]


async def test_lanes_cap_what_one_runner_claims_per_lane(pool, settings: Settings) -> None:
    await add(pool, 5, lane="slow-server")
    await add(pool, 2, lane="other-server")
    runner = Runner(queue(), lambda pool, row: asyncio.sleep(0), database_url=settings.database_url,
                    concurrency=10, lane_concurrency=2, poll_seconds=1)
    claimed = await runner.claim(pool, 10)
    lanes = sorted(r["lane"] for r in claimed)
    assert lanes == ["other-server"] * 2 + ["slow-server"] * 2
    assert [r["lane"] for r in await queue().claim(pool, 10, lane="other-server")] == []


async def test_a_runner_pass_waits_for_one_connection_of_the_pool_however_many_lanes(
        pool, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pass's claim, its look at the due lanes and its claim per lane share one connection:
    in a busy worker the pool is often empty, and a statement that took a connection of its
    own queued again behind the consumers' transactions for it."""
    await add(pool, 5, lane="slow-server")
    await add(pool, 2, lane="other-server")
    runner = Runner(queue(), lambda pool, row: asyncio.sleep(0), database_url=settings.database_url,
                    concurrency=10, lane_concurrency=2, poll_seconds=1)
    acquired: list[int] = []
    acquire = asyncpg.Pool._acquire

    async def counted(self: asyncpg.Pool, timeout: float | None) -> object:
        acquired.append(1)
        return await acquire(self, timeout)

    monkeypatch.setattr(asyncpg.Pool, "_acquire", counted)
    claimed = await runner.claim(pool, 10)
    assert len(claimed) == 4  # a first claim, the due lanes, a claim in each lane
    assert len(acquired) == 1


async def test_the_heartbeat_keeps_a_claim_longer_than_its_lease(pool) -> None:
    q, other = queue(lease=0.6), queue(lease=0.6)
    [id_] = await add(pool)
    [claimed] = await q.claim(pool, 1)
    async with q.hold(pool, [claimed]):
        taken = 0
        for _ in range(15):  # 1.5 s: 2.5 leases
            await asyncio.sleep(0.1)
            taken += len(await other.claim(pool, 1))
        assert taken == 0
        assert await q.guard(claimed, asyncio.sleep(0, "result")) == "result"
        assert await q.finish(pool, claimed, "done")
    assert (await row(pool, id_))["status"] == "done"
    await q.close()


async def test_a_claim_found_lost_cancels_the_work_and_commits_nothing(pool) -> None:
    q = queue(lease=0.6)
    [id_] = await add(pool)
    [claimed] = await q.claim(pool, 1)
    cancelled = asyncio.Event()

    async def slow_call() -> str:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "created"

    async with q.hold(pool, [claimed]):
        # Another runner took it over (its lease had run out under a stalled loop, say).
        await pool.execute("UPDATE work SET leased_by = 'another/runner' WHERE id = $1", id_)
        with pytest.raises(ClaimLost):
            await asyncio.wait_for(q.guard(claimed, slow_call()), timeout=10)
        assert cancelled.is_set() and q.lost(claimed)
        # Work that finished anyway records nothing: its claim no longer holds.
        assert not await q.finish(pool, claimed, "done", result="created")
    lost = await row(pool, id_)
    assert (lost["status"], lost["leased_by"], lost["result"]) == ("busy", "another/runner", None)
    await q.close()


async def test_the_heartbeat_stops_once_nothing_is_held(pool) -> None:
    q = queue(lease=30)
    await add(pool)
    claimed = await q.claim(pool, 1)
    async with q.hold(pool, claimed):
        beat = q._heartbeat
        assert beat is not None and not beat.done()
    await eventually(lambda: asyncio.sleep(0, beat.done()), timeout=2)


async def test_finish_many_ends_only_the_claims_still_held_in_one_statement(pool) -> None:
    q = queue()
    ids = await add(pool, 3)
    claimed = await q.claim(pool, 10)
    # The third was taken over meanwhile (its lease ran out, another runner has it).
    await pool.execute("UPDATE work SET leased_by = 'another/runner' WHERE id = $1", ids[2])
    ended = await q.finish_many(pool, claimed, "done", done_at=NOW, last_error=None)
    assert ended == set(ids[:2])
    rows = [await row(pool, i) for i in ids]
    assert [(r["status"], r["done_at"] is not None, r["lease_until"]) for r in rows[:2]] == [
        ("done", True, None)] * 2
    assert rows[2]["status"] == "busy" and rows[2]["done_at"] is None
    with pytest.raises(ValueError, match="now"):
        await q.finish_many(pool, claimed, "done", result="x")


async def test_finish_many_sets_each_rows_own_json_value(pool) -> None:
    """The job runner's shared outcome write ends its jobs in one statement, each with the
    detail of its own call (as `finish(row, status, detail=...)` would, one by one)."""
    await pool.execute("ALTER TABLE work ADD COLUMN detail jsonb")
    q = queue()
    ids = await add(pool, 3)
    claimed = sorted(await q.claim(pool, 10), key=lambda r: r["id"])
    await pool.execute("UPDATE work SET leased_by = 'another/runner' WHERE id = $1", ids[1])
    details = [{"n": 0, "adopted": True}, {"n": 1}, {"n": 2, "why": "it's \"quoted\""}]
    ended = await q.finish_many(pool, claimed, "done", json_per_row={"detail": details})
    assert ended == {ids[0], ids[2]}
    rows = await pool.fetch("SELECT status, detail FROM work ORDER BY id")
    assert [(r["status"], r["detail"]) for r in rows] == [
        ("done", details[0]), ("busy", None), ("done", details[2])]
    with pytest.raises(ValueError, match="2 values"):
        await q.finish_many(pool, claimed, "done", json_per_row={"detail": details[:2]})


async def test_a_finisher_writes_what_came_during_a_write_in_the_next_one(pool) -> None:
    """Group commit of outcomes: the first claim ended is written at once (no timer), the
    ones handed over while that write is in flight all go in one more statement."""
    q = queue()
    ids = await add(pool, 5)
    claimed = sorted(await q.claim(pool, 10), key=lambda r: r["id"])
    writes: list[list[int]] = []
    first_write_held, let_go = asyncio.Event(), asyncio.Event()
    finish_many = q.finish_many

    async def held(conn, rows, status, **values) -> set[int]:
        writes.append([r["id"] for r in rows])
        if len(writes) == 1:
            first_write_held.set()
            await let_go.wait()
        return await finish_many(conn, rows, status, **values)

    q.finish_many = held  # type: ignore[method-assign]
    recorded: list[int] = []
    done = Finisher(q, pool, "done", ended=lambda rows, ids: recorded.extend(sorted(ids)),
                    done_at=NOW)
    done.add(claimed[0])
    await asyncio.wait_for(first_write_held.wait(), 5)  # started alone, at once
    for r in claimed[1:]:
        done.add(r)
    let_go.set()
    await done.flush()
    assert writes == [ids[:1], ids[1:]] and done.writes == 2
    assert recorded == ids
    statuses = await pool.fetch("SELECT status, done_at IS NOT NULL AS at FROM work ORDER BY id")
    assert {(r["status"], r["at"]) for r in statuses} == {("done", True)}


async def test_a_finisher_whose_write_failed_refuses_more_and_says_so(pool) -> None:
    q = queue()
    await add(pool, 2)
    claimed = await q.claim(pool, 10)

    async def broken(conn, rows, status, **values) -> set[int]:
        raise asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed")

    q.finish_many = broken  # type: ignore[method-assign]
    done = Finisher(q, pool, "done", attempts=2)
    done.add(claimed[0])
    with pytest.raises(asyncpg.exceptions.ConnectionDoesNotExistError):
        await done.flush()  # tried twice (a transient error), then given up
    with pytest.raises(asyncpg.exceptions.ConnectionDoesNotExistError):
        done.add(claimed[1])  # its result could not be recorded either: not done at all
    statuses = await pool.fetch("SELECT status FROM work")
    assert {r["status"] for r in statuses} == {"busy"}  # the leases bring them back


async def test_a_runner_claims_nothing_until_its_before_claim_lets_it(pool, settings: Settings) -> None:
    """The webhook sender's give-way hook: while it waits, rows stay queued (no claim, no
    work); once it returns, the pass claims them."""
    await add(pool, 3)
    gate = asyncio.Event()
    done: list[int] = []

    q = queue()

    async def work(pool, row) -> None:
        done.append(row["id"])
        await q.finish(pool, row, "done")

    runner = Runner(q, work, database_url=settings.database_url, concurrency=10,
                    lane_concurrency=10, poll_seconds=0.05, before_claim=gate.wait)
    stop = asyncio.Event()
    running = asyncio.create_task(runner.run(pool, stop))
    await asyncio.sleep(0.3)
    statuses = await pool.fetch("SELECT status FROM work")
    assert done == [] and {r["status"] for r in statuses} == {"waiting"}
    gate.set()
    for _ in range(50):
        if len(done) == 3:
            break
        await asyncio.sleep(0.05)
    stop.set()
    await running
    assert len(done) == 3


def counting(q: LeasedQueue) -> list[list[int]]:
    """Wrap `q.claim` and `q.due_lanes`: each claim's ids (sorted), and -1 for a lane look-up."""
    calls: list[list[int]] = []
    claim, due_lanes = q.claim, q.due_lanes

    async def counted_claim(conn, limit, *, lane=None):
        rows = await claim(conn, limit, lane=lane)
        calls.append(sorted(r["id"] for r in rows))
        return rows

    async def counted_lanes(conn):
        calls.append([-1])
        return await due_lanes(conn)

    q.claim, q.due_lanes = counted_claim, counted_lanes  # type: ignore[method-assign]
    return calls


@asynccontextmanager
async def running_idle(q: LeasedQueue, calls: list[list[int]], work, pool, settings: Settings, *,
                       poll_seconds: float, busy_linger_seconds: float) -> AsyncIterator[Runner]:
    """A runner started, listening, its first pass (nothing due) done and forgotten; stopped
    on the way out."""
    runner = Runner(q, work, database_url=settings.database_url, concurrency=10,
                    lane_concurrency=10, poll_seconds=poll_seconds,
                    busy_linger_seconds=busy_linger_seconds)
    stop = asyncio.Event()
    running = asyncio.create_task(runner.run(pool, stop))
    try:
        await eventually(lambda: asyncio.sleep(0, runner._wakeup.listening), timeout=10)
        await eventually(lambda: asyncio.sleep(0, calls), timeout=10)  # its first pass: nothing
        calls.clear()
        yield runner
    finally:
        stop.set()
        await running


async def test_an_idle_runner_starts_a_lone_row_at_once_whatever_its_busy_linger(
        pool, settings: Settings) -> None:
    """Idle, a row is started when its NOTIFY comes, in one pass of one claim statement:
    the busy linger (30 s here, as the timer) is not waited."""
    q = queue()
    calls = counting(q)
    started: list[int] = []

    async def work(pool, row) -> None:
        started.append(row["id"])
        await q.finish(pool, row, "done")

    async with running_idle(q, calls, work, pool, settings, poll_seconds=30,
                            busy_linger_seconds=30.0):
        [first] = await add(pool)
        await pool.execute("SELECT pg_notify('test_work', '')")
        # Far within the 30 s that the timer or a linger would have taken.
        await eventually(lambda: asyncio.sleep(0, started == [first]), timeout=10)
        await eventually(lambda: _all_done(pool), timeout=10)
        assert calls == [[first]]  # one pass, one statement


async def test_a_busy_runner_lingers_to_claim_together(pool, settings: Settings) -> None:
    """Busy, the runner lets the rows of the next moment arrive and claims them in one
    statement (two NOTIFYs, one pass); a finished row wakes no pass when the last one left
    nothing behind."""
    q = queue()
    calls = counting(q)
    release = asyncio.Event()
    started: list[int] = []

    async def work(pool, row) -> None:
        started.append(row["id"])
        if len(started) == 1:
            await release.wait()  # the runner stays busy with the first row
        await q.finish(pool, row, "done")

    async with running_idle(q, calls, work, pool, settings, poll_seconds=60,
                            busy_linger_seconds=3.0):
        [first] = await add(pool)
        await pool.execute("SELECT pg_notify('test_work', '')")
        await eventually(lambda: asyncio.sleep(0, started == [first]), timeout=10)
        second = await add(pool)  # two rows, each with its NOTIFY, within the linger
        await pool.execute("SELECT pg_notify('test_work', '')")
        third = await add(pool)
        await pool.execute("SELECT pg_notify('test_work', '')")
        await eventually(lambda: asyncio.sleep(0, len(started) == 3), timeout=15)
        release.set()
        await eventually(lambda: _all_done(pool), timeout=10)
        await asyncio.sleep(0.2)
        # One statement a pass (no look at the due lanes: no lane could reach its cap), the
        # two rows that came while busy in one pass, and no pass when the rows finished.
        assert calls == [[first], second + third]


async def _all_done(pool) -> bool:
    return await pool.fetchval("SELECT bool_and(status = 'done') FROM work")


async def test_a_runner_at_a_lane_cap_takes_the_rest_once_a_slot_is_free(
        pool, settings: Settings) -> None:
    """The lane's cap leaves rows behind: a finished row wakes the runner for them (no
    NOTIFY, no timer)."""
    ids = await add(pool, 3, lane="web1")
    q = queue()
    calls = counting(q)
    done: list[int] = []

    async def work(pool, row) -> None:
        await asyncio.sleep(0.05)
        done.append(row["id"])
        await q.finish(pool, row, "done")

    runner = Runner(q, work, database_url=settings.database_url, concurrency=10,
                    lane_concurrency=1, poll_seconds=30)
    stop = asyncio.Event()
    running = asyncio.create_task(runner.run(pool, stop))
    try:
        await eventually(lambda: asyncio.sleep(0, len(done) == 3), timeout=5)
    finally:
        stop.set()
        await running
    assert sorted(done) == ids
    assert [c for c in calls if c and c != [-1]] == [[i] for i in ids]  # one at a time


async def test_a_slot_freed_while_a_pass_claims_is_taken_without_the_timer(
        pool, settings: Settings) -> None:
    """A lane is full with more rows due; a NOTIFY for another lane starts a pass, and while
    it looks at the due lanes a task of the full lane finishes. The pass caps that lane on
    the load it read before; the freed slot wakes the loop again once the pass ends, and the
    lane's next row starts without waiting for the timer (60 s here)."""
    a1, a2 = await add(pool, 2, lane="a")
    q = queue()
    release, b_done = asyncio.Event(), asyncio.Event()
    started: list[int] = []

    async def work(pool, row) -> None:
        started.append(row["id"])
        if row["id"] == a1:
            await release.wait()
        elif row["lane"] == "b":
            await b_done.wait()  # no other finish wakes the loop meanwhile
        await q.finish(pool, row, "done")

    runner = Runner(q, work, database_url=settings.database_url, concurrency=10,
                    lane_concurrency=1, poll_seconds=60)
    due_lanes = q.due_lanes

    async def a_finishes_meanwhile(conn):
        lanes = await due_lanes(conn)
        if started == [a1] and not release.is_set():  # the pass for lane b
            release.set()
            await eventually(lambda: asyncio.sleep(0, "a" not in runner._lane_load), timeout=10)
        return lanes

    q.due_lanes = a_finishes_meanwhile  # type: ignore[method-assign]
    stop = asyncio.Event()
    running = asyncio.create_task(runner.run(pool, stop))
    try:
        await eventually(lambda: asyncio.sleep(0, runner._wakeup.listening), timeout=10)
        await eventually(lambda: asyncio.sleep(0, started == [a1]), timeout=10)
        [b] = await add(pool, lane="b")
        await pool.execute("SELECT pg_notify('test_work', '')")
        await eventually(lambda: asyncio.sleep(0, sorted(started) == sorted([a1, a2, b])),
                         timeout=10)
        assert release.is_set()  # the slot was indeed freed during the pass
    finally:
        b_done.set()
        stop.set()
        await running


async def test_a_claim_stays_renewed_until_its_outcome_commits(pool) -> None:
    """An outcome written in a transaction that rolls back leaves its claim on the heartbeat
    (renewed, still ours, for the next try); once a write commits, the claim leaves it, and
    a renewal that finds it ended meanwhile does not call it lost."""
    q = queue(lease=30)
    [id_] = await add(pool)
    [claimed] = await q.claim(pool, 1)
    async with q.hold(pool, [claimed]):
        with pytest.raises(RuntimeError):
            with q.ending([claimed]):
                async with pool.acquire() as conn, conn.transaction():
                    assert await q.finish(conn, claimed, "done")
                    raise RuntimeError("the shared write failed")
        assert list(q._held) == [(id_, claimed["leased_by"])] and not q.lost(claimed)
        before = (await row(pool, id_))["lease_until"]
        await q.renew(pool)
        assert (await row(pool, id_))["lease_until"] > before  # still renewed
        with q.ending([claimed]):
            async with pool.acquire() as conn, conn.transaction():
                assert await q.finish(conn, claimed, "done")
            await q.renew(pool)  # committed, not yet dropped: ended, not lost
            assert not q.lost(claimed)
        assert not q._held
    assert (await row(pool, id_))["status"] == "done"
    await q.close()


async def test_a_lane_given_its_own_limit_is_claimed_past_the_lane_cap(pool, settings: Settings) -> None:
    """The job runner's autorelease lane calls no server: only the runner's concurrency bounds
    it, while a server's lane keeps JOB_LANE_CONCURRENCY, however the claims are split."""
    await add(pool, 7, lane="autorelease")
    await add(pool, 5, lane="slow-server")
    runner = Runner(queue(), lambda pool, row: asyncio.sleep(0), database_url=settings.database_url,
                    concurrency=10, lane_concurrency=2, poll_seconds=1,
                    lane_limit=lambda lane: 10 if lane == "autorelease" else 2)
    claimed = await runner.claim(pool, 10)
    lanes = sorted(r["lane"] for r in claimed)
    assert lanes == ["autorelease"] * 7 + ["slow-server"] * 2
    runner._lane_load.update(lanes)  # as _pass records them: 7 and 2 running
    again = await runner.claim(pool, 1)  # the server's lane is full; nothing else is due
    assert again == []


async def test_a_claim_returns_what_it_is_asked_to_braces_and_all(pool) -> None:
    """`claim_returning` is SQL kept as written: more than the row, read by the claim's own
    statement (the job runner's service), even with braces in it (an array literal)."""
    asked = LeasedQueue(WORK, claim_returning="*, '{3,4}'::int[] AS pair, id * 10 AS tenfold")
    [one] = await add(pool, lane="a")
    [claimed] = await asked.claim(pool, 5, lane="a")
    assert (claimed["id"], claimed["status"]) == (one, "busy")
    assert (claimed["pair"], claimed["tenfold"]) == ([3, 4], one * 10)
