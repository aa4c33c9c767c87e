"""The webhook sender: a background task of the webhooks worker that claims due deliveries
from the leased queue (shared/leased_queue.py), POSTs them signed (signing.py) through a
connector that connects only to vetted addresses (addresses.py), and records each attempt.

At least once, one `webhook-id` for every attempt: a delivery's lease is renewed while its
request runs, and a sender that dies renews it no more, so another takes the delivery over.
A 2xx answer delivers; a 410 Gone disables the endpoint; anything else (a 3xx too: no
redirect is followed, a timeout, a refused address) is retried on WEBHOOK_RETRY_SECONDS
and, once they are spent (24 hours by default), parked, the endpoint flagged `failing`.

Before each claim the sender gives way to the order pipeline of its process for the first
WEBHOOK_GIVE_WAY_SECONDS of a busy spell (shared/runtime/activity.py)."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from typing import Any

import aiohttp
import asyncpg

from services.webhooks import signing
from services.webhooks.addresses import (
    AddressRefused,
    Lookup,
    Policy,
    literal,
    parse,
    system_lookup,
)
from services.webhooks.sealing import Sealer, SealError
from services.webhooks.sessions import VettedSessions
from shared import metrics
from shared.leased_queue import NOW, Backoff, ClaimLost, LeasedQueue, Runner, Table
from shared.runtime.activity import give_way
from shared.settings_parts import WebhookSettings

log = logging.getLogger("ordermill.webhooks")

DELIVERIES = Table(name="webhook_deliveries", channel="ordermill_webhooks", claimed="sending",
                   lane="endpoint_id", order="next_attempt_at", touch="updated_at = now()")
RESPONSE_KEPT = 500  # bytes of an answer kept in the delivery log
# Delivered attempts are recorded together, a few milliseconds' worth in one transaction:
# one statement per delivery would cost the database (and this worker) more than the POST.
RECORD_LINGER_SECONDS = 0.005
RECORD_BATCH = 256
USER_AGENT = "Ordermill-Webhooks/1.0"
ENDPOINT_CACHE_SECONDS = 2.0


@dataclass(frozen=True)
class Schedule(Backoff):
    """Retries on a fixed schedule (the Standard Webhooks one), +-10 % jitter each."""

    waits: tuple[float, ...] = (5,)

    def spent(self, attempts: int) -> bool:
        return attempts > len(self.waits)

    def delay(self, attempts: int) -> timedelta:
        wait = self.waits[min(max(attempts, 1), len(self.waits)) - 1]
        return timedelta(seconds=wait * random.uniform(1 - self.jitter, 1 + self.jitter))


@dataclass(frozen=True)
class Outcome:
    kind: str  # delivered, failed, gone, refused (webhook_attempts.outcome)
    status_code: int | None = None
    response: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class Endpoint:
    id: int
    url: str
    status: str
    secrets: tuple[str, ...]  # current first, then the previous one while it still signs
    problem: str | None = None  # a secret that cannot be read


class WebhookSender:
    def __init__(self, hooks: WebhookSettings, database_url: str | None, *,
                 lookup: Lookup = system_lookup) -> None:
        """`hooks` is the webhooks' part of the settings; `lookup` resolves names (a test's
        own resolver stands in for DNS)."""
        self.hooks = hooks
        self.policy = Policy.of(hooks.allow_networks)
        self.sealer = Sealer.from_key(hooks.secret_key)
        self.lookup = lookup
        self.queue = LeasedQueue(DELIVERIES, lease=timedelta(seconds=hooks.queue.lease_seconds),
                                 backoff=Schedule(waits=hooks.retry_seconds))
        # A pass claims what a few milliseconds of wake-ups brought, not a pass per wake-up.
        self.runner = Runner(self.queue, self.deliver, database_url=database_url,
                             concurrency=hooks.concurrency,
                             lane_concurrency=hooks.endpoint_concurrency,
                             poll_seconds=hooks.queue.poll_seconds, linger_seconds=0.01,
                             before_claim=(partial(give_way, hooks.give_way_seconds)
                                           if hooks.give_way_seconds > 0 else None))
        self.sessions = VettedSessions(
            self.policy, user_agent=USER_AGENT, limit=hooks.concurrency,
            limit_per_host=hooks.endpoint_concurrency, lookup=lookup, auto_decompress=False)
        self._endpoints: dict[int, tuple[float, Endpoint | None]] = {}
        self._delivered: list[tuple[asyncpg.Record, Endpoint, Outcome, int,
                                    asyncio.Future[None]]] = []
        self._recorder: asyncio.Task[None] | None = None

    async def run(self, pool: asyncpg.Pool, stop: asyncio.Event) -> None:
        self.sealer.warn_if_plain()
        try:
            await self.runner.run(pool, stop)
        finally:
            await self.close()

    async def close(self) -> None:
        await self.sessions.close()

    # -- one delivery ----------------------------------------------------------------------

    async def deliver(self, pool: asyncpg.Pool, row: asyncpg.Record) -> None:
        extra = {"delivery_id": row["id"], "webhook_id": row["webhook_id"],
                 "endpoint_id": row["endpoint_id"], "event_type": row["event_type"],
                 "attempt": row["attempts"]}
        endpoint = await self._endpoint(pool, row["endpoint_id"])
        if endpoint is None or endpoint.status == "disabled":
            await self.queue.finish(pool, row, "cancelled", last_error="endpoint disabled or removed")
            return
        started = time.monotonic()
        try:
            if endpoint.problem:
                outcome = Outcome("failed", error=endpoint.problem)
            else:
                outcome = await self.queue.guard(row, self.post(endpoint, row))
        except ClaimLost:
            log.warning("delivery taken over by another sender; this attempt records nothing",
                        extra=extra)
            return
        took = time.monotonic() - started
        metrics.WEBHOOK_ATTEMPTS.labels(outcome.kind).inc()
        metrics.WEBHOOK_ATTEMPT_SECONDS.observe(took)
        await self._record(pool, row, endpoint, outcome, int(took * 1000), extra)

    async def post(self, endpoint: Endpoint, row: asyncpg.Record) -> Outcome:
        """One attempt: the same body and webhook-id every time, a fresh timestamp."""
        body = row["body"].encode()
        try:
            scheme, host, _ = parse(endpoint.url)
            ip = literal(host)
            if ip is not None:  # aiohttp asks no resolver for an address: checked here
                self.policy.check(ip, host=host, scheme=scheme)
        except AddressRefused as exc:
            return Outcome("refused", error=str(exc))
        except ValueError as exc:
            return Outcome("failed", error=f"invalid URL: {exc}")
        headers = signing.headers(endpoint.secrets, row["webhook_id"], int(time.time()), body)
        try:
            async with self.sessions.get(scheme).post(
                    endpoint.url, data=body, headers=headers, allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(total=self.hooks.timeout)) as answer:
                head, complete = await self._read_head(answer)
                if not complete:
                    answer.close()  # the rest is never read: the connection is not reused
                status = answer.status
        except TimeoutError:
            return Outcome("failed", error=f"timed out after {self.hooks.timeout:g} s")
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, AddressRefused):
                return Outcome("refused", error=str(exc.os_error))
            return Outcome("failed", error=f"cannot connect: {exc.os_error or exc}")
        except (aiohttp.ClientError, OSError) as exc:
            return Outcome("failed", error=f"{type(exc).__name__}: {exc}"[:500])
        text = head[:RESPONSE_KEPT].decode("utf-8", "replace")
        if 200 <= status < 300:
            return Outcome("delivered", status, text)
        if status == 410:
            return Outcome("gone", status, text, "410 Gone: the endpoint is disabled")
        why = " (redirects are not followed)" if 300 <= status < 400 else ""
        return Outcome("failed", status, text, f"HTTP {status}{why}")

    async def _read_head(self, answer: aiohttp.ClientResponse) -> tuple[bytes, bool]:
        """At most WEBHOOK_RESPONSE_LIMIT_BYTES of the answer; whether that was all of it."""
        limit, chunks, size = self.hooks.response_limit, [], 0
        while size < limit:
            chunk = await answer.content.read(limit - size)
            if not chunk:
                return b"".join(chunks), True
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks), answer.content.at_eof()

    async def _endpoint(self, pool: asyncpg.Pool, endpoint_id: int) -> Endpoint | None:
        """The endpoint, its secrets unsealed; kept a moment (many deliveries, one endpoint)."""
        cached = self._endpoints.get(endpoint_id)
        if cached is not None and time.monotonic() - cached[0] < ENDPOINT_CACHE_SECONDS:
            return cached[1]
        row = await pool.fetchrow(
            "SELECT id, url, status, secret, previous_secret,"
            " previous_secret_until > now() AS previous_signs FROM webhook_endpoints WHERE id = $1",
            endpoint_id)
        endpoint = None if row is None else self._unsealed(row)
        self._endpoints[endpoint_id] = (time.monotonic(), endpoint)
        return endpoint

    def _unsealed(self, row: asyncpg.Record) -> Endpoint:
        try:
            secrets = [self.sealer.unseal(row["secret"])]
            if row["previous_secret"] and row["previous_signs"]:
                secrets.append(self.sealer.unseal(row["previous_secret"]))
        except SealError as exc:
            return Endpoint(row["id"], row["url"], row["status"], (), str(exc))
        return Endpoint(row["id"], row["url"], row["status"], tuple(secrets))

    async def _record_delivered(self, pool: asyncpg.Pool) -> None:
        """Write the delivered attempts waiting, a batch per transaction, until none waits."""
        await asyncio.sleep(RECORD_LINGER_SECONDS)
        while self._delivered:
            batch, self._delivered = self._delivered[:RECORD_BATCH], self._delivered[RECORD_BATCH:]
            try:
                async with pool.acquire() as conn, conn.transaction():
                    await _record_delivered_batch(self.queue, conn, batch)
            except Exception as exc:  # their leases bring them back: sent again, same webhook-id
                for *_, done in batch:
                    if not done.done():
                        done.set_exception(exc)
                continue
            for row, endpoint, outcome, duration_ms, done in batch:
                if endpoint.status == "failing":
                    self._endpoints.pop(endpoint.id, None)
                log.info("webhook delivered", extra={
                    "delivery_id": row["id"], "webhook_id": row["webhook_id"],
                    "endpoint_id": endpoint.id, "attempt": row["attempts"],
                    "status_code": outcome.status_code, "duration_ms": duration_ms})
                if not done.done():
                    done.set_result(None)

    async def _record(self, pool: asyncpg.Pool, row: asyncpg.Record, endpoint: Endpoint,
                      outcome: Outcome, duration_ms: int, extra: dict[str, Any]) -> None:
        """The attempt's log row and the delivery's next state, in one transaction (with
        other deliveries' when it was delivered)."""
        if outcome.kind == "delivered":
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._delivered.append((row, endpoint, outcome, duration_ms, done))
            if self._recorder is None or self._recorder.done():
                self._recorder = asyncio.create_task(self._record_delivered(pool))
            await done  # the claim is held (renewed) until its outcome is written
            return
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO webhook_attempts (delivery_id, attempt, outcome, status_code,"
                " duration_ms, response, error) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                row["id"], row["attempts"], outcome.kind, outcome.status_code, duration_ms,
                outcome.response, outcome.error)
            extra = {**extra, "status_code": outcome.status_code, "duration_ms": duration_ms}
            if outcome.kind == "gone":
                await self.queue.finish(conn, row, "parked", last_error=outcome.error)
                await _set_status(conn, endpoint.id, "disabled", "410 Gone")
                await conn.execute(
                    "UPDATE webhook_deliveries SET status = 'cancelled', updated_at = now(),"
                    " last_error = 'endpoint disabled: 410 Gone'"
                    " WHERE endpoint_id = $1 AND status = 'pending'", endpoint.id)
                log.error("webhook endpoint answered 410 Gone: disabled", extra=extra)
                self._endpoints.pop(endpoint.id, None)
                return
            status = await self.queue.fail(conn, row, outcome.error or outcome.kind)
            if status == DELIVERIES.parked:
                await _set_status(conn, endpoint.id, "failing",
                                  f"delivery {row['webhook_id']} parked: {outcome.error}"[:500],
                                  only_from="active")
                log.error("webhook not delivered; parked, endpoint flagged failing",
                          extra={**extra, "error": outcome.error})
                self._endpoints.pop(endpoint.id, None)
            elif status is not None:
                log.warning("webhook not delivered; will retry",
                            extra={**extra, "error": outcome.error})


async def _record_delivered_batch(queue: LeasedQueue, conn: asyncpg.Connection,
                                  batch: list[tuple[asyncpg.Record, Endpoint, Outcome, int,
                                                    asyncio.Future[None]]]) -> None:
    rows = [b[0] for b in batch]
    await conn.execute(
        "INSERT INTO webhook_attempts (delivery_id, attempt, outcome, status_code, duration_ms,"
        " response) SELECT d, a, 'delivered', c, m, r"
        " FROM unnest($1::bigint[], $2::int[], $3::int[], $4::int[], $5::text[]) AS x(d, a, c, m, r)",
        [r["id"] for r in rows], [r["attempts"] for r in rows],
        [b[2].status_code for b in batch], [b[3] for b in batch], [b[2].response for b in batch])
    ended = await queue.finish_many(conn, rows, "delivered", delivered_at=NOW, last_error=None)
    recovered = sorted({b[1].id for b in batch if b[1].status == "failing" and b[0]["id"] in ended})
    if recovered:
        await conn.execute(
            "UPDATE webhook_endpoints SET status = 'active', status_reason = NULL,"
            " updated_at = now() WHERE id = ANY ($1::bigint[]) AND status = 'failing'", recovered)


async def _set_status(conn: asyncpg.Connection, endpoint_id: int, status: str,
                      reason: str | None, *, only_from: str | None = None) -> None:
    await conn.execute(
        "UPDATE webhook_endpoints SET status = $2, status_reason = $3, updated_at = now()"
        " WHERE id = $1 AND ($4::text IS NULL OR status = $4)",
        endpoint_id, status, reason, only_from)
