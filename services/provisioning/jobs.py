"""The job runner: module creates, terminations and registrations, outside any transaction.

Jobs are rows of the leased queue (shared/leased_queue.py): claimed with a lease that is
renewed while the call runs, in lanes (one per server), so any number of runners share
the table. The deterministic identity (cPanel username, server) is saved before the first
call; after the call the order is read again under its lock, because it may have been
cancelled meanwhile, and the outcome is written by a unit of work (history and events)
only while the claim holds. Transient failures are retried with exponential backoff
scheduled in the database; definitive ones, or spent retries, park the job for an
operator. A runner that dies stops renewing its leases: another takes its jobs over
within the lease (30 s by default).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import asyncpg

from services.provisioning.modules.base import Account, ModuleResult
from services.provisioning.providers import Providers
from services.provisioning.reconcile import ENDED, JOBS_CHANNEL, reconcile, username_for
from services.provisioning.registrars.base import DomainRequest, Registrant, RegistrarResult
from shared import db, metrics
from shared.contracts import (
    DomainFailed,
    DomainRegistered,
    EmailSend,
    ServiceCreated,
    ServiceFailed,
    ServiceTerminated,
)
from shared.epp_codes import EppCodeError
from shared.leased_queue import ClaimLost, LeasedQueue, Runner, Table
from shared.runtime.middleware.retry import transient_retrying
from shared.settings_parts import JobSettings
from shared.states import JobStatus
from shared.uow import MessageContext, UnitOfWork, flush_events

log = logging.getLogger("ordermill.jobs")
T = TypeVar("T")

# A transient database error (a dropped connection, a deadlock) before a call (reading the
# job's service or domain) or while its outcome is recorded is tried again in process, each
# time in a fresh transaction, as everywhere else (contract rule 5): the call is not made
# again and no attempt is spent. About 9 s in all (waits from 0.1 s doubling, at most 3 s),
# well within the lease. The claim's token still guards the write: if a commit went through
# before its connection dropped, the next try finds the claim ended and records nothing twice.
OUTCOME_WRITE_ATTEMPTS = 8
# How long a shared outcome write waits for a lock before each outcome is written alone.
SHARED_LOCK_TIMEOUT_MS = 100
# The orders of a batch of outcomes, locked in id order (as every batch locks them); the ids
# through `db.planned_once`, so the statement keeps a generic plan instead of being planned
# for every batch.
LOCK_OUTCOME_ORDERS = (
    "SELECT id, status, order_ref, accept_options FROM orders"
    " WHERE id = ANY(" + db.planned_once("$1", "bigint[]") + ") ORDER BY id FOR NO KEY UPDATE")

JOBS = Table(name="jobs", channel=JOBS_CHANNEL, claimed="running", lane="lane",
             touch="updated_at = now()")
# A success to record: the job, its call's detail, what records it, and who waits for it.
_Outcome = tuple[asyncpg.Record, dict[str, Any],
                 Callable[[UnitOfWork, asyncpg.Record], Awaitable[None]], asyncio.Future[None]]
# A service as its job's call needs it: its order's state, product, client and server.
_SERVICE_FROM = (
    " FROM services s JOIN orders o ON o.id = s.order_id"
    " JOIN products p ON p.id = s.product_id JOIN clients c ON c.id = o.client_id"
    " LEFT JOIN servers sv ON sv.id = coalesce(s.server_id, p.server_id)")
_SERVICE_JOINED = (("order_status", "o.status"), ("order_ref", "o.order_ref"),
                   ("module", "p.module"), ("plan", "p.plan"), ("slug", "p.slug"),
                   ("email", "c.email"), ("use_server", "coalesce(s.server_id, p.server_id)"),
                   ("server", "to_jsonb(sv)"))
# Read by the claim itself (what the job's call and outcome use, as JSON: one column next
# to the job's own); _SERVICES reads it again for a retry after a transient error.
_SERVICE_WITH_CLAIM = (
    "*, (SELECT jsonb_build_object('id', s.id, 'domain', s.domain, 'username', s.username, "
    + ", ".join(f"'{name}', {sql}" for name, sql in _SERVICE_JOINED) + ")"
    + _SERVICE_FROM + " WHERE s.id = jobs.service_id) AS service")
_SERVICES = ("SELECT s.*, " + ", ".join(f"{sql} AS {name}" for name, sql in _SERVICE_JOINED)
             + _SERVICE_FROM)


class JobRunner:
    """Its policy is its part of the settings (JobSettings: the JOB_* variables); the
    database URL is for its wake-up connection (LISTEN), not a setting of its own."""

    def __init__(self, providers: Providers, jobs: JobSettings,
                 database_url: str | None) -> None:
        self.providers = providers
        self.queue = LeasedQueue.from_settings(JOBS, jobs.queue,
                                               claim_returning=_SERVICE_WITH_CLAIM)
        self.runner = Runner(self.queue, self.execute, database_url=database_url,
                             concurrency=jobs.concurrency,
                             lane_concurrency=jobs.lane_concurrency,
                             poll_seconds=jobs.queue.poll_seconds,
                             busy_linger_seconds=jobs.busy_linger_seconds,
                             claimed=self.read_ahead,
                             lane_limit=self._lane_limit)
        self._jobs = jobs
        self._read: dict[int, Any] = {}  # job id -> its service (JSON), read with its claim
        self._outcomes: list[_Outcome] = []  # successes waiting for the next shared write
        self._writer: asyncio.Task[None] | None = None

    def _lane_limit(self, lane: str) -> int:
        """A lane's cap on jobs at once. A module's lane that names no server, of a module
        that calls none (`calls_server`, as autorelease: answering at once), has nothing to
        protect from a burst of calls: only JOB_CONCURRENCY bounds it. With 8 at a time, at a
        steady 40 payments/s on a loaded machine (each job about a shared outcome write
        long) setups were claimed 8 at a time and payment->Active grew to seconds (README,
        "Where the tail came from"). Every other lane (a server's, a registrar's) keeps
        JOB_LANE_CONCURRENCY."""
        module, _, server = lane.partition(":")
        if not server and not self.providers.calls_server(module):
            return self._jobs.concurrency
        return self._jobs.lane_concurrency

    async def run(self, pool: asyncpg.Pool, stop: asyncio.Event) -> None:
        """Run jobs until `stop`; then the outcome writer is awaited too (bounded by the stop
        timeout, then cancelled: the leases bring its jobs back), so the caller does not
        close the pool under a write in flight."""
        try:
            await self.runner.run(pool, stop)
        finally:
            writer = self._writer
            if writer is not None and not writer.done():
                await asyncio.wait({writer}, timeout=self.runner.stop_timeout)
                if not writer.done():
                    writer.cancel()
                    await asyncio.wait({writer}, timeout=5)

    async def read_ahead(self, pool: asyncpg.Pool, jobs: list[asyncpg.Record]) -> None:
        """The services of a pass's service jobs, as their claim read them (no query a job,
        lone or not: at a moderate rate most passes carry one job, and its read was a
        transaction of its own). Read when the jobs are claimed, just before they start;
        the outcome still reads the order again under its lock. A job whose claim brought
        no service (none found) reads its own, as does a retry."""
        for job in jobs:
            if job["service_id"] is not None and job.get("service") is not None:
                self._read[job["id"]] = job["service"]

    async def execute(self, pool: asyncpg.Pool, job: asyncpg.Record) -> None:
        try:
            await self._execute(pool, job)
        finally:
            self._read.pop(job["id"], None)

    async def _execute(self, pool: asyncpg.Pool, job: asyncpg.Record) -> None:
        extra = {"job_id": job["id"], "kind": job["kind"], "order_id": job["order_id"],
                 "attempt": job["attempts"]}
        # The module (or registrar) is the lane's first part: bounded by the catalog.
        timer = metrics.JOB_DURATION.labels(job["kind"], (job["lane"] or "").split(":")[0]).time()
        try:
            with timer:
                if job["service_id"] is not None:
                    await self._service_job(pool, job)
                else:
                    await self._domain_job(pool, job)
        except ClaimLost:  # another runner has the job: its outcome is that runner's to record
            log.warning("job taken over by another runner; this attempt records nothing",
                        extra=extra)
        except Exception as exc:  # a bug or an outage: counted as an attempt, retried later
            log.exception("job failed unexpectedly", extra=extra)
            with contextlib.suppress(Exception):
                await self._failed(pool, job, f"{type(exc).__name__}: {exc}", transient=True)

    # -- services ------------------------------------------------------------------------------

    async def _service_job(self, pool: asyncpg.Pool, job: asyncpg.Record) -> None:
        prepared = await _before_the_call(lambda: self._prepare_service(pool, job))
        if prepared is None:
            return
        row, username = prepared
        module = self.providers.module(row["module"], row["server"])
        account = Account(service_id=row["id"], username=username,
                          domain=row["domain"] or f"{username}.invalid",
                          plan=row["plan"] or row["slug"], contact_email=row["email"])
        call = module.create if job["kind"] == "create" else module.terminate
        result = await self.queue.guard(job, call(account))  # cancelled if taken over

        async def done(uow: UnitOfWork, state: asyncpg.Record) -> None:
            if job["kind"] == "create":
                await self._created(uow, job, row, username, state, result)
                return
            await uow.conn.execute(
                "UPDATE services SET live = false, terminated_at = now() WHERE id = $1", row["id"])
            item = {"service_id": row["id"]}
            await uow.history(job["order_id"], "service terminated", detail=item)
            uow.emit(ServiceTerminated(**_body(job, item, state["order_ref"], result.detail)))
            log.info("account terminated", extra={
                "service_id": row["id"], "order_id": job["order_id"],
                "order_ref": state["order_ref"], "username": username})

        await self._complete(pool, job, result, done)

    async def _prepare_service(self, pool: asyncpg.Pool,
                               job: asyncpg.Record) -> tuple[asyncpg.Record, str] | None:
        """The service as the call needs it, with its username saved; None if the job ended
        here (its order ended, or no longer ended for a terminate)."""
        row = self._read.pop(job["id"], None)  # read with its pass's others (once: a retry reads)
        if row is None:
            row = await pool.fetchrow(_SERVICES + " WHERE s.id = $1", job["service_id"])
        if job["kind"] == "create" and row["order_status"] in ENDED:
            await self.queue.finish(pool, job, JobStatus.CANCELLED, detail={"why": "order ended"})
            return None
        if job["kind"] == "terminate" and row["order_status"] not in ENDED:
            # Set back to Pending (or reinstated) since it was queued: the account stays.
            await self.queue.finish(pool, job, JobStatus.CANCELLED,
                                    detail={"why": "order no longer ended"})
            return None
        username = row["username"]
        if username is None:  # reconcile saves it with the job; older jobs get it here
            username = username_for(row["domain"], row["slug"], row["id"])
            await pool.execute("UPDATE services SET username = $2, server_id = $3 WHERE id = $1",
                               row["id"], username, row["use_server"])
        return row, username

    async def _created(self, uow: UnitOfWork, job: asyncpg.Record, row: asyncpg.Record,
                       username: str, state: asyncpg.Record, result: ModuleResult) -> None:
        ended = state["status"] in ENDED
        history = {"service_id": row["id"], "username": username, **result.detail}
        if ended:  # written now: reconcile, below, reads the service live
            await uow.conn.execute("UPDATE services SET live = true WHERE id = $1", row["id"])
            await uow.history(job["order_id"], "service created", detail=history)
        else:  # with every other outcome of the shared write: one statement each for all
            uow.defer(_services_created, row["id"])
            uow.history_later(job["order_id"], "service created", detail=history)
        uow.emit(ServiceCreated(**_body(job, {"service_id": row["id"]}, state["order_ref"],
                                        result.detail)))
        if not ended and (state["accept_options"] or {}).get("send_welcome_email", True):
            uow.emit(EmailSend(
                template="hosting_welcome", recipient=row["email"], order_id=job["order_id"],
                order_ref=state["order_ref"], dedupe_key=f"hosting_welcome:{row['id']}"))
        log.info("account created", extra={
            "service_id": row["id"], "order_id": job["order_id"],
            "order_ref": state["order_ref"], "adopted": bool(result.detail.get("adopted")),
            "cancelled_meanwhile": ended})
        if ended:
            # Created after a cancel: terminate it.
            await reconcile(uow.conn, job["order_id"], caused_by=job["caused_by"])

    # -- domains -------------------------------------------------------------------------------

    async def _domain_job(self, pool: asyncpg.Pool, job: asyncpg.Record) -> None:
        row = await _before_the_call(lambda: self._prepare_domain(pool, job))
        if row is None:
            return
        registrar = self.providers.registrar(row["registrar"])
        transfer = job["kind"] == "transfer"
        try:  # the code is stored sealed; opened only to hand it to the registrar
            epp_code = self.providers.epp_codes.unseal(row["epp_code"]) if transfer else None
        except EppCodeError as exc:
            await self._failed(pool, job, str(exc), transient=False)
            return
        request = DomainRequest(
            domain_id=row["id"], domain=row["domain"], years=row["years"],
            registrant=Registrant(first_name=row["first_name"], last_name=row["last_name"],
                                  email=row["email"], country=row["country"],
                                  company=row["company"]),
            epp_code=epp_code,
        )
        call = registrar.transfer if transfer else registrar.register
        result: RegistrarResult = await self.queue.guard(job, call(request))

        async def done(uow: UnitOfWork, state: asyncpg.Record) -> None:
            # A domain registered after a cancel stays registered (it cannot be undone by
            # us); its status follows the order's, and an operator decides.
            if state["status"] not in ENDED:
                await uow.conn.execute(
                    "UPDATE domains SET status = $2, registered_at = now() WHERE id = $1",
                    row["id"], result.status)
            if transfer and not result.detail.get("manual"):
                # The registry has the code now: it is not kept longer than needed (the
                # manual registrar's operator still needs it to transfer by hand).
                await uow.conn.execute("UPDATE domains SET epp_code = NULL WHERE id = $1",
                                       row["id"])
            item = {"domain_id": row["id"], "domain": row["domain"], "status": result.status}
            await uow.history(job["order_id"], f"domain {job['kind']}", detail=item)
            uow.emit(DomainRegistered(**_body(job, item, state["order_ref"], result.detail)))
            log.info("domain done", extra={**item, "order_id": job["order_id"],
                                           "order_ref": state["order_ref"]})

        await self._complete(pool, job, result, done)

    async def _prepare_domain(self, pool: asyncpg.Pool, job: asyncpg.Record) -> asyncpg.Record | None:
        row = await pool.fetchrow(
            "SELECT d.*, t.registrar, o.status AS order_status, o.order_ref,"
            " c.email, c.first_name, c.last_name, c.country, c.company"
            " FROM domains d JOIN tlds t ON t.tld = d.tld JOIN orders o ON o.id = d.order_id"
            " JOIN clients c ON c.id = o.client_id WHERE d.id = $1", job["domain_id"],
        )
        if row["order_status"] in ENDED:
            await self.queue.finish(pool, job, JobStatus.CANCELLED, detail={"why": "order ended"})
            return None
        return row

    # -- shared ---------------------------------------------------------------------------------

    async def _complete(
        self, pool: asyncpg.Pool, job: asyncpg.Record, result: ModuleResult | RegistrarResult,
        done: Callable[[UnitOfWork, asyncpg.Record], Awaitable[None]],
    ) -> None:
        """Record a call's outcome: a failure is retried or parked; a success is recorded by
        `done`, in a unit of work that first locks the order and reads it again (it may have
        been cancelled during the call), then marks the job done if this runner still holds
        it (if not, the runner that took it over records the outcome).

        Successes share transactions (group commit, as the consumers'): the first is written
        at once; those that come while a write is in flight go together in the next one,
        their orders locked in id order, their jobs finished by one statement (as the
        heartbeat renews them; neither statement promises an order of row locks, so a
        shared write that meets the heartbeat's gives way at its lock_timeout). If that
        shared transaction fails, each is written again alone, all at once, each with its
        own retries, so one outcome's error is only its own; their claims stay on the
        heartbeat until their own commit."""
        if not result.ok:
            await self._failed(pool, job, result.error or "failed", transient=result.transient)
            return
        written: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._outcomes.append((job, result.detail, done, written))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_outcomes(pool))
        await written

    async def _write_outcomes(self, pool: asyncpg.Pool) -> None:
        """Write what is waiting, again while more came meanwhile, on one connection of the
        pool kept from one write to the next (given back once nothing waits): taken again
        for each write, a busy worker's next write queued behind the consumers'
        transactions for a connection (p99 0.2-1.2 s on the shared machine) while its jobs,
        their calls done, waited for it. A write that fails, or a connection that cannot be
        had, is tried again, each outcome alone, on connections of their own.

        The writer ends only when it finds nothing waiting *after* giving its connection
        back: the release awaits, and an outcome that comes meanwhile starts no writer (this
        one is still running), so a last look before the release would leave it unwritten,
        its lease renewed for ever."""
        held: asyncpg.Connection | None = None
        try:
            while True:
                if not self._outcomes:
                    if held is None:
                        return
                    await _give_back(pool, held)
                    held = None
                    continue
                batch, self._outcomes = self._outcomes, []
                batch.sort(key=lambda item: item[0]["id"])
                try:
                    if held is not None and held.is_closed():
                        await _give_back(pool, held)
                        held = None
                    if held is None:
                        held = await pool.acquire()  # type: ignore[assignment]  # a proxy
                    await self._transaction(held, batch)
                except Exception as exc:
                    level = (logging.INFO if isinstance(exc, asyncpg.LockNotAvailableError)
                             else logging.WARNING)  # a lock held elsewhere: expected now and then
                    log.log(level, "job outcomes written together failed; each is written alone"
                            if len(batch) > 1 else "job outcome write failed; written again",
                            extra={"jobs": len(batch), "error": f"{type(exc).__name__}: {exc}"})
                    if held is not None:  # it may be broken; and the writes alone need one
                        await _give_back(pool, held)
                        held = None
                else:
                    for *_, written in batch:
                        if not written.done():
                            written.set_result(None)
                    continue
                # At once, not one after another: in an outage each job's retries take up to
                # about 9 s, and the last of a long batch must not wait behind all the others.
                await asyncio.gather(*(self._write_alone(pool, item) for item in batch))
        finally:
            if held is not None:
                await _give_back(pool, held)

    async def _write_alone(self, pool: asyncpg.Pool, item: _Outcome) -> None:
        written = item[3]
        try:
            async for attempt in transient_retrying(OUTCOME_WRITE_ATTEMPTS):
                with attempt:
                    async with pool.acquire() as conn:  # a fresh one each try
                        await self._transaction(conn, [item])
        except Exception as exc:
            if not written.done():
                written.set_exception(exc)
        else:
            if not written.done():
                written.set_result(None)

    async def _transaction(self, conn: asyncpg.Connection, batch: list[_Outcome]) -> None:
        """One transaction writing these outcomes; their claims leave the heartbeat only once
        it committed (a rolled-back one leaves them renewed for the next try)."""
        with self.queue.ending(job for job, *_ in batch):
            async with conn.transaction():
                if len(batch) > 1:
                    # Shared, it locks several orders, which a consumer's batch may lock in
                    # another order: rather than wait for PostgreSQL's deadlock check (1 s:
                    # the quick start's setups took a second longer), give up at once and
                    # write each alone (one order lock each: no cycle).
                    await conn.execute(f"SET LOCAL lock_timeout = '{SHARED_LOCK_TIMEOUT_MS}ms'")
                await self._record_outcomes(conn, batch)

    async def _record_outcomes(self, conn: asyncpg.Connection, batch: list[_Outcome]) -> None:
        """The same statements for one outcome or many: the orders locked, the jobs finished
        (those still ours), and what a setup writes (its service Active, its history, its
        events) deferred to one statement each for the whole batch. Written a statement a
        job, a batch of 20 took 60 round trips, each a turn of the busy event loop: the
        jobs that came meanwhile waited for all of them (docs/performance.md, "Where payment->Active
        waited")."""
        orders = sorted({job["order_id"] for job, *_ in batch})
        states = {r["id"]: r for r in await conn.fetch(LOCK_OUTCOME_ORDERS, orders)}
        ours = await self.queue.finish_many(
            conn, [job for job, *_ in batch], JobStatus.DONE,
            json_per_row={"detail": [detail for _, detail, *_ in batch]})
        uows = []
        for job, _, done, _ in batch:
            if job["id"] in ours:
                uow = _unit_of_work(conn, job)
                await done(uow, states[job["order_id"]])
                uows.append(uow)
        await flush_events(conn, uows)

    async def _failed(self, pool: asyncpg.Pool, job: asyncpg.Record, error: str, *,
                      transient: bool) -> None:
        async for attempt in transient_retrying(OUTCOME_WRITE_ATTEMPTS):
            with attempt, self.queue.ending([job]):  # held until committed
                async with pool.acquire() as conn, conn.transaction():
                    await self._record_failure(conn, job, error, transient=transient)

    async def _record_failure(self, conn: asyncpg.Connection, job: asyncpg.Record, error: str, *,
                              transient: bool) -> None:
        order_ref = await conn.fetchval(
            "SELECT order_ref FROM orders WHERE id = $1 FOR NO KEY UPDATE", job["order_id"])
        status = await self.queue.fail(conn, job, error, transient=transient)
        if status is None:  # no longer ours: the runner that took it over decides
            return
        extra = {"job_id": job["id"], "kind": job["kind"], "order_id": job["order_id"],
                 "order_ref": order_ref, "attempt": job["attempts"], "error": error}
        if status != JOBS.parked:
            log.warning("job failed; will retry", extra=extra)
            return
        item = ({"service_id": job["service_id"]} if job["service_id"] is not None
                else {"domain_id": job["domain_id"]})
        uow = _unit_of_work(conn, job)
        await uow.history(job["order_id"], f"{job['kind']} failed",
                          detail={**item, "error": error})
        failed = ServiceFailed if job["service_id"] is not None else DomainFailed
        uow.emit(failed(**_body(job, item, order_ref, {"error": error})))
        await flush_events(conn, [uow])
        log.error("job parked: an operator must look", extra=extra)


async def _before_the_call(read: Callable[[], Awaitable[T]]) -> T:
    """What a job reads and writes before its call, tried again in process on a transient
    database error (a PostgreSQL restart drops every connection; seen in bench/chaos.py):
    nothing has reached the server yet, so the whole step is simply done again, no attempt
    spent and no backoff waited (contract rule 5). The finish of a cancelled job is guarded
    by its claim: a retry after a commit that went through finds it ended and does nothing."""
    async for attempt in transient_retrying(OUTCOME_WRITE_ATTEMPTS):
        with attempt:
            return await read()
    raise AssertionError("unreachable")


async def _services_created(conn: asyncpg.Connection, service_ids: Sequence[int]) -> None:
    """A shared write's setups (their orders not ended): live, and Active if still Pending."""
    await conn.execute(
        "UPDATE services SET live = true,"
        " status = CASE WHEN status = 'Pending' THEN 'Active' ELSE status END"
        " WHERE id = ANY($1::bigint[])", list(service_ids))


def _unit_of_work(conn: asyncpg.Connection, job: asyncpg.Record) -> UnitOfWork:
    """A job attempt's unit of work: its events' ids derive from the job and the attempt (a
    retried commit writes the same ids), their correlation_id is the message that made the
    job needed, and the history names "provisioning"."""
    context = MessageContext(consumer="provisioning",
                             message_id=f"job:{job['id']}:{job['attempts']}",
                             routing_key=f"job.{job['kind']}", received_at=datetime.now(UTC))
    return UnitOfWork(conn, context, caused_by=job["caused_by"])


def _body(job: asyncpg.Record, item: dict[str, Any], order_ref: str,
          detail: dict[str, Any]) -> dict[str, Any]:
    return {**item, "order_id": job["order_id"], "order_ref": order_ref, "job_id": job["id"],
            "detail": detail}


async def _give_back(pool: asyncpg.Pool, conn: asyncpg.Connection) -> None:
    """Return a held connection to the pool. asyncpg terminates a connection whose reset
    fails and raises: the pool makes a new one when asked, and the writer goes on (it must
    never end with outcomes taken and unwritten)."""
    try:
        await pool.release(conn)
    except Exception as exc:
        log.info("job outcome writer's connection closed on release",
                 extra={"error": f"{type(exc).__name__}: {exc}"})
