"""The job runner: module creates, terminations and registrations, outside any transaction.

A job is claimed with a lease (FOR UPDATE SKIP LOCKED, so any number of runners share
the table); the deterministic identity (cPanel username, server) is saved before the
first call; after the call the order is read again under its lock, because it may have
been cancelled meanwhile. Transient failures are retried with exponential backoff
scheduled in the database; definitive ones, or spent retries, park the job for an
operator. A runner that dies leaves its lease to expire, and another takes the job.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from typing import Any

import asyncpg

from services.provisioning.modules.base import Account, ModuleResult
from services.provisioning.providers import Providers
from services.provisioning.reconcile import ENDED, reconcile, username_for
from services.provisioning.registrars.base import DomainRequest, Registrant, RegistrarResult
from shared import db
from shared.contracts import EmailSend
from shared.epp_codes import EppCodeError
from shared.states import JobStatus
from shared.uow import event_id
from shared.wakeup import Wakeup

log = logging.getLogger("ordermill.jobs")

CHANNEL = "ordermill_jobs"
_DUE = """(status = 'pending' AND next_attempt_at <= now())
     OR (status = 'running' AND lease_until < now())"""
_DUE_LANES = f"SELECT DISTINCT lane FROM jobs WHERE {_DUE}"
_CLAIM = f"""
UPDATE jobs SET status = 'running', attempts = attempts + 1, leased_by = $1,
  lease_until = now() + $2::interval, updated_at = now()
WHERE id IN (
  SELECT id FROM jobs WHERE lane = $4 AND ({_DUE})
  ORDER BY next_attempt_at LIMIT $3 FOR UPDATE SKIP LOCKED)
RETURNING *
"""


@dataclass(frozen=True)
class JobPolicy:
    max_attempts: int = 6
    backoff_seconds: float = 30.0
    backoff_max_seconds: float = 3600.0
    lease_seconds: float = 300.0
    concurrency: int = 64  # calls in flight in this runner
    lane_concurrency: int = 8  # calls in flight per server (per module or registrar without one)
    poll_seconds: float = 5.0

    def backoff(self, attempts: int) -> timedelta:
        seconds = min(self.backoff_max_seconds, self.backoff_seconds * 2 ** (attempts - 1))
        return timedelta(seconds=seconds * random.uniform(0.9, 1.1))


class JobRunner:
    def __init__(self, providers: Providers, policy: JobPolicy, database_url: str) -> None:
        self.providers = providers
        self.policy = policy
        self.database_url = database_url
        self.worker_id = uuid.uuid4().hex[:12]
        self._wakeup = Wakeup(database_url, CHANNEL)
        self._wake = self._wakeup.event
        self._running: set[asyncio.Task[None]] = set()
        self._lane_load: Counter[str] = Counter()

    async def run(self, pool: asyncpg.Pool, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                await self._wakeup.ensure()
                self._wake.clear()
                free = self.policy.concurrency - len(self._running)
                if free > 0:
                    try:
                        for job in await self.claim(pool, free):
                            self._lane_load[job["lane"]] += 1
                            task = asyncio.create_task(self.execute(pool, job))
                            self._running.add(task)
                            task.add_done_callback(partial(self._finished, job["lane"]))
                    except db.TRANSIENT_DB_ERRORS as exc:
                        log.warning("claiming jobs failed; will retry", extra={"error": str(exc)})
                with contextlib.suppress(TimeoutError):
                    waiting = [asyncio.create_task(self._wake.wait()),
                               asyncio.create_task(stop.wait())]
                    await asyncio.wait(waiting, timeout=self.policy.poll_seconds,
                                       return_when=asyncio.FIRST_COMPLETED)
                    for w in waiting:
                        w.cancel()
        finally:
            if self._running:
                # Calls in flight finish (bounded); one that does not leaves its lease to expire.
                await asyncio.wait(self._running, timeout=30)
            await self._wakeup.close()

    def _finished(self, lane: str, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._lane_load[lane] -= 1
        self._wake.set()  # a slot is free

    async def claim(self, pool: asyncpg.Pool, limit: int) -> list[asyncpg.Record]:
        """Due jobs, lane by lane: a lane (a server) never has more than its share in flight,
        so a slow or failing server holds back only its own jobs."""
        lanes = [r["lane"] for r in await pool.fetch(_DUE_LANES)]
        random.shuffle(lanes)  # no lane waits behind the others when the runner is full
        lease = timedelta(seconds=self.policy.lease_seconds)
        claimed: list[asyncpg.Record] = []
        for lane in lanes:
            free = min(limit - len(claimed), self.policy.lane_concurrency - self._lane_load[lane])
            if free > 0:
                claimed += await pool.fetch(_CLAIM, self.worker_id, lease, free, lane)
        return claimed

    async def execute(self, pool: asyncpg.Pool, job: asyncpg.Record) -> None:
        extra = {"job_id": job["id"], "kind": job["kind"], "order_id": job["order_id"],
                 "attempt": job["attempts"]}
        try:
            if job["service_id"] is not None:
                await self._service_job(pool, job)
            else:
                await self._domain_job(pool, job)
        except Exception as exc:  # a bug or an outage: counted as an attempt, retried later
            log.exception("job failed unexpectedly", extra=extra)
            with contextlib.suppress(Exception):
                await self._failed(pool, job, f"{type(exc).__name__}: {exc}", transient=True)

    # -- services ------------------------------------------------------------------------------

    async def _service_job(self, pool: asyncpg.Pool, job: asyncpg.Record) -> None:
        row = await pool.fetchrow(
            "SELECT s.*, o.status AS order_status, o.order_ref, p.module, p.plan, p.slug, c.email,"
            " coalesce(s.server_id, p.server_id) AS use_server, to_jsonb(sv) AS server"
            " FROM services s JOIN orders o ON o.id = s.order_id"
            " JOIN products p ON p.id = s.product_id JOIN clients c ON c.id = o.client_id"
            " LEFT JOIN servers sv ON sv.id = coalesce(s.server_id, p.server_id)"
            " WHERE s.id = $1", job["service_id"],
        )
        if job["kind"] == "create" and row["order_status"] in ENDED:
            await self._close(pool, job, JobStatus.CANCELLED, detail={"why": "order ended"})
            return
        if job["kind"] == "terminate" and row["order_status"] not in ENDED:
            # Set back to Pending (or reinstated) since it was queued: the account stays.
            await self._close(pool, job, JobStatus.CANCELLED, detail={"why": "order no longer ended"})
            return
        username = row["username"]
        if username is None:  # reconcile saves it with the job; older jobs get it here
            username = username_for(row["domain"], row["slug"], row["id"])
            await pool.execute("UPDATE services SET username = $2, server_id = $3 WHERE id = $1",
                               row["id"], username, row["use_server"])
        module = self.providers.module(row["module"], row["server"])
        account = Account(service_id=row["id"], username=username,
                          domain=row["domain"] or f"{username}.invalid",
                          plan=row["plan"] or row["slug"], contact_email=row["email"])
        if job["kind"] == "create":
            result = await module.create(account)
        else:
            result = await module.terminate(account)

        async def done(conn: asyncpg.Connection, state: asyncpg.Record) -> None:
            if job["kind"] == "create":
                await self._created(conn, job, row, username, state, result)
                return
            await conn.execute(
                "UPDATE services SET live = false, terminated_at = now() WHERE id = $1", row["id"])
            await self._record(conn, job, "service terminated", {"service_id": row["id"]}, [
                self._event(job, "service.terminated", {"service_id": row["id"]},
                            state["order_ref"], result.detail)])
            log.info("account terminated", extra={
                "service_id": row["id"], "order_id": job["order_id"],
                "order_ref": state["order_ref"], "username": username})

        await self._complete(pool, job, result, done)

    async def _created(self, conn: asyncpg.Connection, job: asyncpg.Record, row: asyncpg.Record,
                       username: str, state: asyncpg.Record, result: ModuleResult) -> None:
        ended = state["status"] in ENDED
        await conn.execute(
            "UPDATE services SET live = true,"
            " status = CASE WHEN status = 'Pending' AND NOT $2 THEN 'Active' ELSE status END"
            " WHERE id = $1", row["id"], ended)
        events = [self._event(job, "service.created", {"service_id": row["id"]},
                              state["order_ref"], result.detail)]
        if not ended and (state["accept_options"] or {}).get("send_welcome_email", True):
            welcome = EmailSend(
                template="hosting_welcome", recipient=row["email"], order_id=job["order_id"],
                order_ref=state["order_ref"], dedupe_key=f"hosting_welcome:{row['id']}")
            events.append((event_id("jobs", job["id"], "welcome"), "email.send",
                           welcome.model_dump(mode="json")))
        await self._record(conn, job, "service created",
                           {"service_id": row["id"], "username": username, **result.detail},
                           events)
        log.info("account created", extra={
            "service_id": row["id"], "order_id": job["order_id"],
            "order_ref": state["order_ref"], "adopted": bool(result.detail.get("adopted")),
            "cancelled_meanwhile": ended})
        if ended:
            # Created after a cancel: terminate it.
            await reconcile(conn, job["order_id"], caused_by=job["caused_by"])

    # -- domains -------------------------------------------------------------------------------

    async def _domain_job(self, pool: asyncpg.Pool, job: asyncpg.Record) -> None:
        row = await pool.fetchrow(
            "SELECT d.*, t.registrar, o.status AS order_status, o.order_ref,"
            " c.email, c.first_name, c.last_name, c.country, c.company"
            " FROM domains d JOIN tlds t ON t.tld = d.tld JOIN orders o ON o.id = d.order_id"
            " JOIN clients c ON c.id = o.client_id WHERE d.id = $1", job["domain_id"],
        )
        if row["order_status"] in ENDED:
            await self._close(pool, job, JobStatus.CANCELLED, detail={"why": "order ended"})
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
        if transfer:
            result: RegistrarResult = await registrar.transfer(request)
        else:
            result = await registrar.register(request)

        async def done(conn: asyncpg.Connection, state: asyncpg.Record) -> None:
            # A domain registered after a cancel stays registered (it cannot be undone by
            # us); its status follows the order's, and an operator decides.
            if state["status"] not in ENDED:
                await conn.execute(
                    "UPDATE domains SET status = $2, registered_at = now() WHERE id = $1",
                    row["id"], result.status)
            if transfer and not result.detail.get("manual"):
                # The registry has the code now: it is not kept longer than needed (the
                # manual registrar's operator still needs it to transfer by hand).
                await conn.execute("UPDATE domains SET epp_code = NULL WHERE id = $1", row["id"])
            item = {"domain_id": row["id"], "domain": row["domain"], "status": result.status}
            await self._record(conn, job, f"domain {job['kind']}", item, [
                self._event(job, "domain.registered", item, state["order_ref"], result.detail)])
            log.info("domain done", extra={**item, "order_id": job["order_id"],
                                           "order_ref": state["order_ref"]})

        await self._complete(pool, job, result, done)

    # -- shared ---------------------------------------------------------------------------------

    async def _complete(
        self, pool: asyncpg.Pool, job: asyncpg.Record, result: ModuleResult | RegistrarResult,
        done: Callable[[asyncpg.Connection, asyncpg.Record], Awaitable[None]],
    ) -> None:
        """Record a call's outcome: a failure is retried or parked; a success is recorded by
        `done`, in a transaction that first reads the order again under its lock (it may
        have been cancelled during the call)."""
        if not result.ok:
            await self._failed(pool, job, result.error or "failed", transient=result.transient)
            return
        async with pool.acquire() as conn, conn.transaction():
            state = await self._finish(conn, job, result.detail)
            if state is not None:  # None: the lease was lost; the runner that took over records it
                await done(conn, state)

    async def _finish(self, conn: asyncpg.Connection, job: asyncpg.Record,
                      detail: dict[str, Any]) -> asyncpg.Record | None:
        """Lock the order and mark the job done, in one statement. None if the lease was lost."""
        state = await conn.fetchrow(
            "WITH o AS (SELECT status, order_ref, accept_options FROM orders WHERE id = $1"
            "  FOR UPDATE),"
            " j AS (UPDATE jobs SET status = 'done', lease_until = NULL, detail = $4,"
            "  updated_at = now() WHERE id = $2 AND status = 'running' AND leased_by = $3"
            "  RETURNING id)"
            " SELECT o.*, EXISTS (SELECT 1 FROM j) AS mine FROM o",
            job["order_id"], job["id"], self.worker_id, detail)
        return state if state["mine"] else None

    async def _close(self, pool: asyncpg.Pool, job: asyncpg.Record, status: JobStatus, *,
                     detail: dict[str, Any]) -> bool:
        """End the job if this runner still holds it. False when the lease was lost."""
        done = await pool.fetchval(
            "UPDATE jobs SET status = $2, lease_until = NULL, detail = $4, updated_at = now()"
            " WHERE id = $1 AND status = 'running' AND leased_by = $3 RETURNING true",
            job["id"], status, self.worker_id, detail)
        return bool(done)

    async def _record(self, conn: asyncpg.Connection, job: asyncpg.Record, action: str,
                      detail: dict[str, Any],
                      events: list[tuple[uuid.UUID, str, dict[str, Any]]]) -> None:
        """The order's history row and the events, in one statement."""
        await conn.execute(
            "WITH h AS (INSERT INTO order_history (order_id, actor, action, detail)"
            "  VALUES ($1, 'provisioning', $2, $3))"
            " INSERT INTO outbox (message_id, routing_key, body, correlation_id, source)"
            " SELECT u.*, $7, 'provisioning' FROM unnest($4::uuid[], $5::text[], $6::jsonb[]) AS u"
            " ON CONFLICT (message_id) DO NOTHING",
            job["order_id"], action, detail, [e[0] for e in events], [e[1] for e in events],
            [e[2] for e in events], job["caused_by"])

    def _event(self, job: asyncpg.Record, key: str, item: dict[str, Any], order_ref: str,
               detail: dict[str, Any]) -> tuple[uuid.UUID, str, dict[str, Any]]:
        return (event_id("jobs", job["id"], job["attempts"], key), key,
                {**item, "order_id": job["order_id"], "order_ref": order_ref,
                 "job_id": job["id"], "detail": detail})

    async def _failed(self, pool: asyncpg.Pool, job: asyncpg.Record, error: str, *,
                      transient: bool) -> None:
        park = not transient or job["attempts"] >= self.policy.max_attempts
        async with pool.acquire() as conn, conn.transaction():
            order_ref = await conn.fetchval(
                "SELECT order_ref FROM orders WHERE id = $1 FOR UPDATE", job["order_id"])
            still_mine = await conn.fetchval(
                "UPDATE jobs SET status = $2, last_error = $3, lease_until = NULL,"
                " next_attempt_at = now() + $5::interval, updated_at = now()"
                " WHERE id = $1 AND status = 'running' AND leased_by = $4 RETURNING true",
                job["id"], JobStatus.PARKED if park else JobStatus.PENDING, error[:2000], self.worker_id,
                timedelta(0) if park else self.policy.backoff(job["attempts"]))
            if not still_mine:
                return
            extra = {"job_id": job["id"], "kind": job["kind"], "order_id": job["order_id"],
                     "order_ref": order_ref, "attempt": job["attempts"], "error": error}
            if not park:
                log.warning("job failed; will retry", extra=extra)
                return
            item = ({"service_id": job["service_id"]} if job["service_id"] is not None
                    else {"domain_id": job["domain_id"]})
            key = "service.failed" if job["service_id"] is not None else "domain.failed"
            await self._record(conn, job, f"{job['kind']} failed", {**item, "error": error},
                               [self._event(job, key, item, order_ref, {"error": error})])
            log.error("job parked: an operator must look", extra=extra)
