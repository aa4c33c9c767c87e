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
import re
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import asyncpg

from services.provisioning.modules.base import Account, ModuleResult
from services.provisioning.providers import Providers
from services.provisioning.reconcile import ENDED, reconcile
from services.provisioning.registrars.base import DomainRequest, Registrant, RegistrarResult
from shared import db
from shared.contracts import EmailSend
from shared.orders import add_history
from shared.uow import event_id, write_event

log = logging.getLogger("ordermill.jobs")

CHANNEL = "ordermill_jobs"
_CLAIM = """
UPDATE jobs SET status = 'running', attempts = attempts + 1, leased_by = $1,
  lease_until = now() + $2::interval, updated_at = now()
WHERE id IN (
  SELECT id FROM jobs
  WHERE (status = 'pending' AND next_attempt_at <= now())
     OR (status = 'running' AND lease_until < now())
  ORDER BY next_attempt_at LIMIT $3 FOR UPDATE SKIP LOCKED)
RETURNING *
"""


@dataclass(frozen=True)
class JobPolicy:
    max_attempts: int = 6
    backoff_seconds: float = 30.0
    backoff_max_seconds: float = 3600.0
    lease_seconds: float = 120.0
    concurrency: int = 16
    poll_seconds: float = 5.0

    def backoff(self, attempts: int) -> timedelta:
        seconds = min(self.backoff_max_seconds, self.backoff_seconds * 2 ** (attempts - 1))
        return timedelta(seconds=seconds * random.uniform(0.9, 1.1))


def username_for(domain: str | None, fallback: str, service_id: int) -> str:
    """A cPanel-valid username (a letter first, lowercase letters and digits, at most 16),
    the same on every attempt: derived from the domain and the service id."""
    letters = re.sub(r"[^a-z]", "", (domain or fallback).lower())[:7] or "svc"
    return f"{letters}{_base36(service_id)}"[:16]


def _base36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = digits[r] + out
        if n == 0:
            return out


class JobRunner:
    def __init__(self, providers: Providers, policy: JobPolicy, database_url: str) -> None:
        self.providers = providers
        self.policy = policy
        self.database_url = database_url
        self.worker_id = uuid.uuid4().hex[:12]
        self._wake = asyncio.Event()
        self._running: set[asyncio.Task[None]] = set()

    async def run(self, pool: asyncpg.Pool, stop: asyncio.Event) -> None:
        listener: asyncpg.Connection | None = None
        try:
            while not stop.is_set():
                if listener is None or listener.is_closed():
                    listener = await self._listen()
                self._wake.clear()
                free = self.policy.concurrency - len(self._running)
                if free > 0:
                    try:
                        for job in await self.claim(pool, free):
                            task = asyncio.create_task(self.execute(pool, job))
                            self._running.add(task)
                            task.add_done_callback(self._finished)
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
            if listener is not None and not listener.is_closed():
                await listener.close()

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._wake.set()  # a slot is free

    async def _listen(self) -> asyncpg.Connection | None:
        try:
            conn = await asyncpg.connect(self.database_url)
            await conn.add_listener(CHANNEL, lambda *_: self._wake.set())
            return conn
        except db.TRANSIENT_DB_ERRORS as exc:
            log.warning("job listener unavailable; polling", extra={"error": str(exc)})
            return None

    async def claim(self, pool: asyncpg.Pool, limit: int) -> list[asyncpg.Record]:
        return await pool.fetch(_CLAIM, self.worker_id,
                                timedelta(seconds=self.policy.lease_seconds), limit)

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
        async with pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "SELECT s.*, o.status AS order_status, o.order_ref, o.accept_options,"
                " p.module, p.plan, p.slug, coalesce(s.server_id, p.server_id) AS use_server,"
                " c.email FROM services s JOIN orders o ON o.id = s.order_id"
                " JOIN products p ON p.id = s.product_id JOIN clients c ON c.id = o.client_id"
                " WHERE s.id = $1 FOR UPDATE OF o, s", job["service_id"],
            )
            if job["kind"] == "create" and row["order_status"] in ENDED:
                await self._close(conn, job, "cancelled", detail={"why": "order ended"})
                return
            username = row["username"] or username_for(row["domain"], row["slug"], row["id"])
            if row["username"] is None or row["server_id"] != row["use_server"]:
                # Saved before the first call: every retry addresses the same account.
                await conn.execute(
                    "UPDATE services SET username = $2, server_id = $3 WHERE id = $1",
                    row["id"], username, row["use_server"])
            server = await conn.fetchrow("SELECT * FROM servers WHERE id = $1",
                                         row["use_server"]) if row["use_server"] else None
        module = self.providers.module(row["module"], server)
        account = Account(service_id=row["id"], username=username,
                          domain=row["domain"] or f"{username}.invalid",
                          plan=row["plan"] or row["slug"], contact_email=row["email"])
        if job["kind"] == "create":
            result = await module.create(account)
        else:
            result = await module.terminate(account)
        if not result.ok:
            await self._failed(pool, job, result.error or "failed", transient=result.transient)
            return
        async with pool.acquire() as conn, conn.transaction():
            # Read the order again under its lock: it may have been cancelled during the call.
            state = await conn.fetchrow(
                "SELECT o.status, o.order_ref, o.accept_options FROM orders o"
                " WHERE o.id = $1 FOR UPDATE", job["order_id"])
            if not await self._close(conn, job, "done", detail=result.detail):
                return  # the lease was lost: the runner that took the job over records it
            if job["kind"] == "create":
                await self._created(conn, job, row, state, result)
            else:
                await conn.execute(
                    "UPDATE services SET live = false, terminated_at = now() WHERE id = $1",
                    row["id"])
                await self._event(conn, job, "service.terminated", {"service_id": row["id"]},
                                  state["order_ref"], result.detail)
                await add_history(conn, job["order_id"], actor="provisioning",
                                  action="service terminated", detail={"service_id": row["id"]})
                log.info("account terminated", extra={
                    "service_id": row["id"], "order_id": job["order_id"],
                    "order_ref": state["order_ref"], "username": username})

    async def _created(self, conn: asyncpg.Connection, job: asyncpg.Record, row: asyncpg.Record,
                       state: asyncpg.Record, result: ModuleResult) -> None:
        ended = state["status"] in ENDED
        await conn.execute(
            "UPDATE services SET live = true,"
            " status = CASE WHEN status = 'Pending' AND NOT $2 THEN 'Active' ELSE status END"
            " WHERE id = $1", row["id"], ended)
        await self._event(conn, job, "service.created", {"service_id": row["id"]},
                          state["order_ref"], result.detail)
        await add_history(conn, job["order_id"], actor="provisioning", action="service created",
                          detail={"service_id": row["id"], "username": row["username"],
                                  **result.detail})
        log.info("account created", extra={
            "service_id": row["id"], "order_id": job["order_id"],
            "order_ref": state["order_ref"], "adopted": bool(result.detail.get("adopted")),
            "cancelled_meanwhile": ended})
        if ended:
            await reconcile(conn, job["order_id"])  # created after a cancel: terminate it
            return
        options = state["accept_options"] or {}
        if options.get("send_welcome_email", True):
            await write_event(conn, "email.send", EmailSend(
                template="hosting_welcome", recipient=row["email"], order_id=job["order_id"],
                order_ref=state["order_ref"], dedupe_key=f"hosting_welcome:{row['id']}"),
                message_id=event_id("jobs", job["id"], "welcome"), correlation_id=None)

    # -- domains -------------------------------------------------------------------------------

    async def _domain_job(self, pool: asyncpg.Pool, job: asyncpg.Record) -> None:
        async with pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "SELECT d.*, t.registrar, o.status AS order_status, o.order_ref,"
                " c.email, c.first_name, c.last_name, c.country, c.company"
                " FROM domains d JOIN tlds t ON t.tld = d.tld JOIN orders o ON o.id = d.order_id"
                " JOIN clients c ON c.id = o.client_id WHERE d.id = $1 FOR UPDATE OF o, d",
                job["domain_id"],
            )
            if row["order_status"] in ENDED:
                await self._close(conn, job, "cancelled", detail={"why": "order ended"})
                return
        registrar = self.providers.registrar(row["registrar"])
        request = DomainRequest(
            domain_id=row["id"], domain=row["domain"], years=row["years"],
            registrant=Registrant(first_name=row["first_name"], last_name=row["last_name"],
                                  email=row["email"], country=row["country"],
                                  company=row["company"]),
            epp_code=row["epp_code"],
        )
        if job["kind"] == "transfer":
            result: RegistrarResult = await registrar.transfer(request)
        else:
            result = await registrar.register(request)
        if not result.ok:
            await self._failed(pool, job, result.error or "failed", transient=result.transient)
            return
        async with pool.acquire() as conn, conn.transaction():
            state = await conn.fetchrow(
                "SELECT status, order_ref FROM orders WHERE id = $1 FOR UPDATE", job["order_id"])
            if not await self._close(conn, job, "done", detail=result.detail):
                return
            # A domain registered after a cancel stays registered (it cannot be undone by
            # us); its status follows the order's, and an operator decides.
            if state["status"] not in ENDED:
                await conn.execute(
                    "UPDATE domains SET status = $2, registered_at = now() WHERE id = $1",
                    row["id"], result.status)
            await self._event(conn, job, "domain.registered",
                              {"domain_id": row["id"], "domain": row["domain"],
                               "status": result.status}, state["order_ref"], result.detail)
            await add_history(conn, job["order_id"], actor="provisioning",
                              action=f"domain {job['kind']}",
                              detail={"domain_id": row["id"], "status": result.status})
            log.info("domain done", extra={
                "domain_id": row["id"], "domain": row["domain"], "status": result.status,
                "order_id": job["order_id"], "order_ref": state["order_ref"]})

    # -- shared ---------------------------------------------------------------------------------

    async def _close(self, conn: asyncpg.Connection, job: asyncpg.Record, status: str, *,
                     detail: dict[str, Any]) -> bool:
        """Finish the job if this runner still holds it. False when the lease was lost."""
        done = await conn.fetchval(
            "UPDATE jobs SET status = $2, lease_until = NULL, detail = $4, updated_at = now()"
            " WHERE id = $1 AND status = 'running' AND leased_by = $3 RETURNING true",
            job["id"], status, self.worker_id, detail)
        return bool(done)

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
                job["id"], "parked" if park else "pending", error[:2000], self.worker_id,
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
            await self._event(conn, job, key, item, order_ref, {"error": error})
            await add_history(conn, job["order_id"], actor="provisioning",
                              action=f"{job['kind']} failed", detail={**item, "error": error})
            log.error("job parked: an operator must look", extra=extra)

    async def _event(self, conn: asyncpg.Connection, job: asyncpg.Record, key: str,
                     item: dict[str, Any], order_ref: str, detail: dict[str, Any]) -> None:
        await write_event(
            conn, key, {**item, "order_id": job["order_id"], "order_ref": order_ref,
                        "job_id": job["id"], "detail": detail},
            message_id=event_id("jobs", job["id"], job["attempts"], key), correlation_id=None)
