"""One leased queue in PostgreSQL: rows of work that are claimed, kept, finished, retried, parked.

The job runner (services/provisioning/jobs.py) and the mail sender
(services/notify/sender.py) use it, each on its own table, described by a `Table`. The
model is arq's: a row is due when it waits and its `next_attempt_at` has come, or when it
is claimed but its lease ran out (the runner that held it died).

- `claim` takes due rows (FOR UPDATE SKIP LOCKED: any number of runners share a table),
  counts an attempt and writes a fresh token into `leased_by`. Every later write checks
  that token: only the holder of a claim finishes, fails or releases its row.
- `hold` keeps claims alive while their work runs: a heartbeat, every third of the lease,
  extends the lease of every claim this process holds, in one statement, and only where
  the token still matches. A claim it finds lost (taken over, reset by an operator) is
  marked; `guard` cancels the work of a lost claim, and `finish` refuses to record it.
  A claim leaves the heartbeat only once its outcome is written (`finish`, `fail`,
  `release` on the pool, or the commit of the caller's `ending` block): a write that fails
  and is tried again does not let the lease lapse meanwhile.
- `fail` schedules the next attempt with exponential backoff and jitter, or parks the row
  once its attempts are spent (or the failure is definitive); `release` hands a claim
  back at once, no attempt spent.
- `Runner` runs one task per claimed row, at most `concurrency` at once and
  `lane_concurrency` per lane (a server: a slow one fills only its own lane), woken by
  NOTIFY (`wake_loop`) and by a timer as well.

    queue = LeasedQueue(JOBS, lease=timedelta(seconds=30), backoff=Backoff(max_attempts=6))
    rows = await queue.claim(pool, 10)
    async with queue.hold(pool, rows):
        result = await queue.guard(rows[0], call())  # raises ClaimLost if taken over
        async with pool.acquire() as conn, conn.transaction():
            if await queue.finish(conn, rows[0], "done"):  # False: no longer ours
                ...  # record the result in the same transaction

A table needs `id bigint`, `status text`, `attempts int`, `next_attempt_at`,
`lease_until`, `leased_by text` and `last_error text`; its other columns are its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from typing import Any, TypeVar

import asyncpg

from shared import db, metrics
from shared.settings_parts import QueueSettings
from shared.wakeup import Wakeup

log = logging.getLogger("ordermill.queue")
T = TypeVar("T")
NOW = object()  # a `finish` value: the database's now()


class ClaimLost(Exception):
    """The claim on a row was lost while its work ran: another runner has the row now."""


@dataclass(frozen=True)
class Table:
    """What the queue needs to know of a table: its name, its status values, its lane."""

    name: str
    channel: str  # the NOTIFY channel a new (or rescheduled) row wakes runners on
    pending: str = "pending"
    claimed: str = "running"
    parked: str = "parked"
    lane: str | None = None  # SQL expression: rows of one lane share a concurrency cap
    order: str = "next_attempt_at"
    touch: str = ""  # set on every write as well, e.g. "updated_at = now()"


@dataclass(frozen=True)
class Backoff:
    max_attempts: int = 6
    base_seconds: float = 30.0
    max_seconds: float = 3600.0
    jitter: float = 0.1  # +-10 %: rows that failed together do not come back together

    def spent(self, attempts: int) -> bool:
        return attempts >= self.max_attempts

    def delay(self, attempts: int) -> timedelta:
        seconds = min(self.max_seconds, self.base_seconds * 2 ** (attempts - 1))
        return timedelta(seconds=seconds * random.uniform(1 - self.jitter, 1 + self.jitter))


def _key(row: asyncpg.Record) -> tuple[int, str]:
    return row["id"], row["leased_by"]


def _literal_braces(sql: str) -> str:
    """SQL kept as written through the claim's `str.format` (its lane condition): an array
    literal or a jsonb path in a RETURNING list would otherwise be taken for a field."""
    return sql.replace("{", "{{").replace("}", "}}")


class LeasedQueue:
    @classmethod
    def from_settings(cls, table: Table, queue: QueueSettings, *,
                      claim_returning: str = "*") -> LeasedQueue:
        """A queue with the JOB_* policy: lease, attempts before parking, backoff base."""
        return cls(table, lease=timedelta(seconds=queue.lease_seconds),
                   backoff=Backoff(queue.max_attempts, queue.backoff_seconds),
                   claim_returning=claim_returning)

    def __init__(self, table: Table, *, lease: timedelta = timedelta(seconds=30),
                 backoff: Backoff = Backoff(), runner_id: str | None = None,
                 claim_returning: str = "*") -> None:
        """`claim_returning`: what a claim returns of each row it claims (its RETURNING list,
        naming the table's columns by its name): more than the row (a scalar subquery, say),
        read in the claim's statement rather than one more round trip."""
        self.table = table
        self.lease = lease
        self.backoff = backoff
        self.runner_id = runner_id or uuid.uuid4().hex[:12]
        self._held: dict[tuple[int, str], asyncio.Event] = {}  # claim -> set when lost
        # Claims whose outcome is being written: still renewed (the write may fail and be
        # tried again), but not called lost when the heartbeat finds them ended (the write
        # may have ended them; it says itself whether the claim still held).
        self._ending: set[tuple[int, str]] = set()
        self._none_held = asyncio.Event()
        self._heartbeat: asyncio.Task[None] | None = None
        t, mine = table, f"status = '{table.claimed}' AND leased_by = $2"
        touch = f", {t.touch}" if t.touch else ""
        # A claimed row's next_attempt_at is never later than its claim (only a pending row's
        # is set ahead: a failure's backoff), so every due row has next_attempt_at <= now():
        # said first, it bounds the claim's index range on next_attempt_at, and rows waiting
        # out a backoff (a whole outage's, say) are not read on every pass.
        self._due = (f"(next_attempt_at <= now() AND (status = '{t.pending}'"
                     f" OR (status = '{t.claimed}' AND lease_until < now())))")
        self._claim = (
            f"UPDATE {t.name} SET status = '{t.claimed}', attempts = attempts + 1,"
            " leased_by = $1 || '/' || left(md5(random()::text), 8),"
            f" lease_until = now() + $2::interval{touch}"
            f" WHERE id IN (SELECT id FROM {t.name} WHERE {{}}{self._due}"
            f"  ORDER BY {t.order} LIMIT $3 FOR UPDATE SKIP LOCKED)"
            f" RETURNING {_literal_braces(claim_returning)}")
        many = (f" FROM unnest($1::bigint[], $2::text[]) AS c(id, token) WHERE q.id = c.id"
                f" AND q.leased_by = c.token AND q.status = '{t.claimed}'")
        self._renew = (f"UPDATE {t.name} q SET lease_until = now() + $3::interval{many}"
                       " RETURNING q.id, q.leased_by")
        self._release = (f"UPDATE {t.name} q SET status = '{t.pending}', attempts = q.attempts - 1,"
                         f" lease_until = NULL, next_attempt_at = now(){touch}{many}")
        self._fail = (f"UPDATE {t.name} SET status = $3, last_error = $4, lease_until = NULL,"
                      f" next_attempt_at = now() + $5::interval{touch} WHERE id = $1 AND {mine}"
                      " RETURNING status")
        self._finish = (f"UPDATE {t.name} SET status = $3, lease_until = NULL{touch}{{}}"
                        f" WHERE id = $1 AND {mine} RETURNING true")

    # -- claims -------------------------------------------------------------------------------

    async def due_lanes(self, conn: asyncpg.Pool | asyncpg.Connection) -> list[str]:
        return [r[0] for r in await conn.fetch(
            f"SELECT DISTINCT {self.table.lane} FROM {self.table.name} WHERE {self._due}")]

    async def claim(self, conn: asyncpg.Pool | asyncpg.Connection, limit: int, *,
                    lane: str | None = None) -> list[asyncpg.Record]:
        """Up to `limit` due rows (of one lane, if given), claimed for this runner."""
        if lane is None:
            return await conn.fetch(self._claim.format(""), self.runner_id, self.lease, limit)
        return await conn.fetch(self._claim.format(f"{self.table.lane} = $4 AND "),
                                self.runner_id, self.lease, limit, lane)

    @contextlib.asynccontextmanager
    async def hold(self, pool: asyncpg.Pool, rows: Iterable[asyncpg.Record]) -> AsyncIterator[None]:
        """Renew these claims' leases until the block ends (or each is finished, failed or
        released); the lease of a row still claimed then runs out, and another runner takes it."""
        keys = [_key(r) for r in rows]
        for key in keys:
            self._held.setdefault(key, asyncio.Event())
        if keys:
            self._none_held.clear()
        if keys and (self._heartbeat is None or self._heartbeat.done()):
            self._heartbeat = asyncio.create_task(self._beat(pool), name=f"{self.table.name}-lease")
        try:
            yield
        finally:
            self._drop(keys)

    def lost(self, row: asyncpg.Record) -> bool:
        event = self._held.get(_key(row))
        return event is not None and event.is_set()

    async def guard(self, row: asyncpg.Record, work: Awaitable[T]) -> T:
        """Await `work`, cancelled (ClaimLost) if the heartbeat finds the row's claim lost."""
        lost = self._held.get(_key(row)) or asyncio.Event()
        task, watch = asyncio.ensure_future(work), asyncio.create_task(lost.wait())
        try:
            await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not task.done():
                task.cancel()
                await asyncio.wait({task})
        if lost.is_set():
            raise ClaimLost(f"{self.table.name} {row['id']}: claim lost while its work ran")
        return task.result()

    @contextlib.contextmanager
    def ending(self, rows: Iterable[asyncpg.Record]) -> Iterator[None]:
        """Around a transaction that writes these claims' outcomes (`finish`, `fail` on its
        connection, then the commit): they leave the heartbeat only when the block ends
        without error. A rolled-back write leaves them held and renewed, so its retries (or
        the writes that take over) still find them ours, however long an outage lasts
        within the lease's renewals; dropped at the first statement instead, a rollback
        would leave them unrenewed and another runner could take them over and run their
        work again."""
        keys = [_key(r) for r in rows if _key(r) not in self._ending]
        self._ending.update(keys)
        try:
            yield
        finally:
            self._ending.difference_update(keys)
        self._drop(keys)

    def _drop(self, keys: Iterable[tuple[int, str]]) -> None:
        for key in keys:
            self._held.pop(key, None)
        if not self._held:
            self._none_held.set()

    async def _beat(self, pool: asyncpg.Pool) -> None:
        every = self.lease.total_seconds() / 3
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._none_held.wait(), every)
            if not self._held:
                return
            await self.renew(pool)

    async def renew(self, pool: asyncpg.Pool) -> None:
        """Extend the lease of every claim held here that is still ours; mark the others lost."""
        # In id order, as writers lock a batch of rows (the job runner's shared outcomes):
        # two statements that lock the same rows in one order cannot deadlock each other.
        keys = sorted(self._held)
        try:
            rows = await pool.fetch(self._renew, [k[0] for k in keys], [k[1] for k in keys],
                                    self.lease)
        except Exception as exc:  # the next beat tries again; the lease has two more thirds
            log.warning("lease renewal failed; will retry", extra={
                "table": self.table.name, "error": f"{type(exc).__name__}: {exc}"})
            return
        kept = {_key(r) for r in rows}
        for key in keys:
            if key in kept or key in self._ending:
                continue  # an outcome being written may have ended it: the write tells
            if (lost := self._held.get(key)) is not None:
                log.warning("claim lost: another runner has the row; its result is not recorded",
                            extra={"table": self.table.name, "row_id": key[0]})
                lost.set()

    async def close(self) -> None:
        """Stop renewing (the leases of rows still claimed run out)."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.wait({self._heartbeat})

    # -- outcomes: each written only while the claim holds ----------------------------------

    async def finish(self, conn: asyncpg.Pool | asyncpg.Connection, row: asyncpg.Record,
                     status: str, **values: Any) -> bool:
        """End the claim with `status` (and these columns; NOW is now()). False if it was lost.
        The claim leaves the heartbeat once the statement went through (inside an `ending`
        block: once that block ends)."""
        sets, args = "", [row["id"], row["leased_by"], status]
        for column, value in values.items():
            if value is NOW:
                sets += f", {column} = now()"
            else:
                args.append(value)
                sets += f", {column} = ${len(args)}"
        with self.ending([row]):
            finished = bool(await conn.fetchval(self._finish.format(sets), *args))
        if finished:
            metrics.LEASED_OUTCOMES.labels(self.table.name, status).inc()
        return finished

    async def finish_many(self, conn: asyncpg.Pool | asyncpg.Connection,
                          rows: Sequence[asyncpg.Record], status: str, *,
                          json_per_row: dict[str, Sequence[Any]] | None = None,
                          **values: Any) -> set[int]:
        """End several claims with `status` in one statement (a sender that finishes many
        small pieces of work, the job runner's shared outcome write: one round trip, not one
        each); `values` are NOW or None; `json_per_row` sets a jsonb column to one value per
        row (as `finish(row, status, detail=...)` does for one). The ids that were still
        ours, now ended."""
        if not rows:
            return set()
        t = self.table
        touch = f", {t.touch}" if t.touch else ""
        for column, value in values.items():
            if value is not NOW and value is not None:
                raise ValueError(f"finish_many sets {column} to now() or NULL only")
            touch += f", {column} = {'now()' if value is NOW else 'NULL'}"
        per_row = list((json_per_row or {}).items())
        args: list[Any] = [[r["id"] for r in rows], [r["leased_by"] for r in rows], status]
        arrays, names = "", ""
        for n, (column, items) in enumerate(per_row):
            if len(items) != len(rows):
                raise ValueError(f"finish_many: {len(items)} values of {column} for {len(rows)} rows")
            args.append([json.dumps(item) for item in items])
            arrays += f", ${len(args)}::text[]"
            names += f", v{n}"
            touch += f", {column} = c.v{n}::jsonb"
        with self.ending(rows):
            ended = await conn.fetch(
                f"UPDATE {t.name} q SET status = $3, lease_until = NULL{touch}"
                f" FROM unnest($1::bigint[], $2::text[]{arrays}) AS c(id, token{names})"
                f" WHERE q.id = c.id AND q.leased_by = c.token AND q.status = '{t.claimed}'"
                " RETURNING q.id", *args)
        if ended:
            metrics.LEASED_OUTCOMES.labels(self.table.name, status).inc(len(ended))
        return {r[0] for r in ended}

    async def fail(self, conn: asyncpg.Pool | asyncpg.Connection, row: asyncpg.Record, error: str,
                   *, transient: bool = True) -> str | None:
        """Retry later (backoff), or park: definitive, or attempts spent. The new status, or
        None if the claim was lost."""
        park = not transient or self.backoff.spent(row["attempts"])
        with self.ending([row]):
            status = await conn.fetchval(
                self._fail, row["id"], row["leased_by"],
                self.table.parked if park else self.table.pending, error[:2000],
                timedelta(0) if park else self.backoff.delay(row["attempts"]))
        if status is not None:
            metrics.LEASED_OUTCOMES.labels(self.table.name, status).inc()
        return status

    async def release(self, conn: asyncpg.Pool | asyncpg.Connection,
                      rows: Sequence[asyncpg.Record]) -> None:
        """Hand claims back at once, no attempt spent (the work was not at fault)."""
        if rows:
            with self.ending(rows):
                await conn.execute(self._release, [r["id"] for r in rows],
                                   [r["leased_by"] for r in rows])


class Finisher:
    """Ends claims with one status, the claims handed over while a write is in flight all
    in the next write (group commit, as the consumers' shared transactions): a pass of many
    small pieces of work, such as mails, costs a few statements instead of one each, and no
    claim waits on a timer. `add` does not wait for the write (the work goes on to its next
    piece); `flush` does, and raises the write's error, as does any `add` after a write
    failed (what is not yet done had better not be: its result could not be recorded).

    A piece is recorded at most one write later than if it were written alone: the window
    in which a dying process leaves a piece done but not recorded (done again once its
    lease runs out) stays about one write long."""

    def __init__(self, queue: LeasedQueue, pool: asyncpg.Pool, status: str, *,
                 attempts: int = 1, ended: Callable[[Sequence[asyncpg.Record], set[int]], None]
                 | None = None, **values: Any) -> None:
        """`values` as finish_many's; `attempts`: tries of a write on a transient database
        error (a fresh connection each); `ended(rows, ids)` is called after each write with
        the rows it carried and the ids that were still ours."""
        self.queue, self.pool, self.status, self.values = queue, pool, status, values
        self.attempts, self._ended = attempts, ended
        self._waiting: list[asyncpg.Record] = []
        self._writer: asyncio.Task[None] | None = None
        self.error: BaseException | None = None
        self.writes = 0

    def add(self, row: asyncpg.Record) -> None:
        if self.error is not None:
            raise self.error
        self._waiting.append(row)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write())

    async def _write(self) -> None:
        from shared.runtime.middleware.retry import transient_retrying

        while self._waiting and self.error is None:
            rows, self._waiting = self._waiting, []
            try:
                async for attempt in transient_retrying(self.attempts):
                    with attempt:
                        ended = await self.queue.finish_many(self.pool, rows, self.status,
                                                             **self.values)
            except Exception as exc:  # the claims run out; the pieces are done again
                self.error = exc
                return
            self.writes += 1
            if self._ended is not None:
                self._ended(rows, ended)

    async def flush(self) -> None:
        """Until everything added is written; the write's error, if one failed."""
        while self._writer is not None and not self._writer.done():
            await asyncio.shield(self._writer)
        if self.error is not None:
            raise self.error


async def wake_loop(wakeup: Wakeup, stop: asyncio.Event, step: Callable[[], Awaitable[bool]], *,
                    poll_seconds: float, linger_seconds: float = 0.0,
                    busy: Callable[[], bool] | None = None,
                    busy_linger_seconds: float = 0.0) -> None:
    """Run `step` when NOTIFY wakes the loop, on a timer as well, and again at once while it
    returns True (a backlog). A failing step is logged and tried again: leases bring back
    whatever it had claimed.

    Once woken, wait `linger_seconds` before the step (always), or `busy_linger_seconds` if
    `busy()` says work is still in flight: as the consumers' group commit, a loop that is
    busy anyway lets the next few rows arrive and takes them in one pass, while an idle one
    starts a lone row at once."""
    try:
        while not stop.is_set():
            await wakeup.ensure()
            wakeup.event.clear()
            try:
                if await step():
                    continue
            except db.TRANSIENT_DB_ERRORS as exc:
                log.warning("queue pass failed; will retry", extra={
                    "channel": wakeup.channel, "error": f"{type(exc).__name__}: {exc}"})
            except Exception:
                log.exception("queue pass failed; will retry", extra={"channel": wakeup.channel})
            waiting = [asyncio.create_task(wakeup.event.wait()), asyncio.create_task(stop.wait())]
            await asyncio.wait(waiting, timeout=poll_seconds, return_when=asyncio.FIRST_COMPLETED)
            for task in waiting:
                task.cancel()
            if wakeup.event.is_set() and not stop.is_set():
                linger = linger_seconds or (busy_linger_seconds if busy is not None and busy()
                                            else 0.0)
                if linger:
                    await asyncio.sleep(linger)  # let the next few arrive, to take them together
    finally:
        await wakeup.close()


class Runner:
    """Each claimed row's `work(pool, row)` in a task of its own, under the row's claim (held
    and guarded by the caller's `queue.guard`), at most `concurrency` at once and
    `lane_concurrency` per lane."""

    def __init__(self, queue: LeasedQueue,
                 work: Callable[[asyncpg.Pool, asyncpg.Record], Awaitable[None]], *,
                 database_url: str | None, concurrency: int, lane_concurrency: int,
                 poll_seconds: float, stop_timeout: float = 30.0,
                 linger_seconds: float = 0.0, busy_linger_seconds: float = 0.0,
                 before_claim: Callable[[], Awaitable[object]] | None = None,
                 claimed: Callable[[asyncpg.Pool, list[asyncpg.Record]], Awaitable[None]]
                 | None = None, lane_limit: Callable[[str], int] | None = None) -> None:
        """`linger_seconds`: once woken, wait this long before claiming, so one pass claims
        what several wake-ups brought (short work such as an HTTP call: not a pass each).
        `busy_linger_seconds`: the same, only while work of an earlier pass still runs (an
        idle runner starts a lone row at once). `before_claim`: awaited before each pass
        claims (the webhook sender gives way to the order pipeline there). `claimed`:
        awaited with each pass's rows before their work starts (the job runner reads what
        their calls need in one query); it must not raise. `lane_limit(lane)`: that lane's
        cap instead of `lane_concurrency` (the job runner's lanes that call no server: no
        server to protect, so only `concurrency` bounds them)."""
        self.queue, self.work = queue, work
        self.concurrency, self.lane_concurrency = concurrency, lane_concurrency
        self.poll_seconds, self.stop_timeout = poll_seconds, stop_timeout
        self.linger_seconds, self.busy_linger_seconds = linger_seconds, busy_linger_seconds
        self.before_claim, self.claimed = before_claim, claimed
        self.lane_limit = lane_limit or (lambda _lane: lane_concurrency)
        # With every slot taken, this process's commits notify the other runners (another
        # machine's may be idle) instead of waiting here for a slot.
        self._wakeup = Wakeup(database_url, queue.table.channel,
                              accepting=lambda: not self._capped)
        self._running: set[asyncio.Task[None]] = set()
        self._lane_load: Counter[str] = Counter()
        # The last pass left due rows behind (the runner or a lane was full): a finished
        # task frees a slot for them. Otherwise nothing is due that a NOTIFY or the timer
        # would not bring, and a finished task wakes nothing (it once cost a pass each).
        self._capped = False
        # A pass is claiming (its view of the running tasks and the lanes' load may be stale
        # by the time it decides a lane is full), and a task finished meanwhile: the pass
        # wakes the loop again if it ended capped, or the freed slot would wait for the timer.
        self._passing = False
        self._freed = False

    async def run(self, pool: asyncpg.Pool, stop: asyncio.Event) -> None:
        try:
            await wake_loop(self._wakeup, stop, partial(self._start_due, pool),
                            poll_seconds=self.poll_seconds, linger_seconds=self.linger_seconds,
                            busy=lambda: bool(self._running),
                            busy_linger_seconds=self.busy_linger_seconds)
        finally:
            if self._running:  # work in flight finishes (bounded), still renewing its leases
                await asyncio.wait(self._running, timeout=self.stop_timeout)
            for task in self._running:
                task.cancel()  # its lease runs out; another runner takes the row
            if self._running:
                await asyncio.wait(self._running, timeout=5)
            await self.queue.close()

    async def _start_due(self, pool: asyncpg.Pool) -> bool:
        self._passing, self._freed = True, False
        try:
            return await self._pass(pool)
        finally:
            self._passing = False
            if self._freed and self._capped:
                self._wakeup.event.set()  # a slot freed during the pass: take it now

    async def _pass(self, pool: asyncpg.Pool) -> bool:
        if self.concurrency - len(self._running) > 0 and self.before_claim is not None:
            await self.before_claim()
        free = self.concurrency - len(self._running)
        self._capped = free <= 0
        rows = await self.claim(pool, free) if free > 0 else []
        if rows and self.claimed is not None:
            await self.claimed(pool, rows)
        for row in rows:
            lane = row[self.queue.table.lane] if self.queue.table.lane else ""
            self._lane_load[lane] += 1
            task = asyncio.create_task(self._execute(pool, row))
            self._running.add(task)
            task.add_done_callback(partial(self._finished, lane))
        return False

    async def claim(self, pool: asyncpg.Pool, limit: int) -> list[asyncpg.Record]:
        """Due rows, lane by lane, each lane up to its share: a slow lane holds back only itself.

        First, as many rows as no lane could exceed its share with, wherever they come from,
        in one statement: when that finds fewer, nothing else is due (the usual case, a few
        rows a pass: one statement, not a look at the due lanes and a claim per lane).

        A pass's statements share one connection of the pool: each statement taking its own
        queued again behind the consumers' transactions for one (a busy all-in-one worker's
        pool is often empty: a wait of 100-200 ms each, docs/performance.md "Where payment->Active
        waited"), and a pass of three statements waited three times."""
        async with pool.acquire() as conn:
            return await self._claim(conn, limit)

    async def _claim(self, conn: asyncpg.Connection, limit: int) -> list[asyncpg.Record]:
        if not self.queue.table.lane:
            claimed = await self.queue.claim(conn, limit)
            self._capped = self._capped or len(claimed) >= limit
            return claimed
        # A row from a lane not running yet may have the default cap; one from a running
        # lane, what its own cap leaves.
        safe = min(limit, self.lane_concurrency,
                   *(self.lane_limit(lane) - n for lane, n in self._lane_load.items()))
        claimed: list[asyncpg.Record] = []
        if safe > 0:
            claimed = await self.queue.claim(conn, safe)
            if len(claimed) < safe:
                return claimed
        load = self._lane_load + Counter(r[self.queue.table.lane] for r in claimed)
        lanes = await self.queue.due_lanes(conn)
        random.shuffle(lanes)  # no lane waits behind the others when the runner is full
        for lane in lanes:
            free = min(limit - len(claimed), self.lane_limit(lane) - load[lane])
            if free <= 0:
                self._capped = True  # rows of this lane wait for a slot
                continue
            got = await self.queue.claim(conn, free, lane=lane)
            claimed += got
            self._capped = self._capped or len(got) >= free
        return claimed

    async def _execute(self, pool: asyncpg.Pool, row: asyncpg.Record) -> None:
        started = time.perf_counter()
        try:
            async with self.queue.hold(pool, [row]):
                await self.work(pool, row)
        except Exception:  # `work` handles its failures; this is a bug: the lease brings it back
            log.exception("work failed", extra={"table": self.queue.table.name, "row_id": row["id"]})
        finally:
            metrics.LEASED_WORK.labels(self.queue.table.name).observe(time.perf_counter() - started)

    def _finished(self, lane: str, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._lane_load[lane] -= 1
        if self._lane_load[lane] <= 0:
            del self._lane_load[lane]
        if self._passing:
            self._freed = True  # the pass in flight may cap on the load from before this
        elif self._capped:
            self._wakeup.event.set()  # a slot is free for what the last pass left
