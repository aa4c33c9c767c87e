"""The Slack sender: a background task of the alerts worker that claims due Slack messages
from the leased queue (shared/leased_queue.py, table `alert_deliveries`) and POSTs them to
their channel's incoming webhook.

The same rules as outbound webhooks (services/webhooks/): the connection goes only to an
address that passed the SSRF check (the webhooks' VettingResolver and WEBHOOK_ALLOW_NETWORKS),
no redirect is followed, a timeout per attempt, the answer read only up to a limit; retries on
WEBHOOK_RETRY_SECONDS (+-10 % jitter), then parked. Slack's definitive refusals (400 invalid
payload, 403 and 404 a revoked or unknown hook, 410 an archived channel) park at once; 429
and 5xx are retried. The URL is a secret: it is never logged and never kept in an error —
what is said names the channel and the host."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

import aiohttp
import asyncpg

from services.alerts import slack
from services.alerts.store import slack_url
from services.webhooks.addresses import AddressRefused, Policy, literal, parse
from services.webhooks.sealing import Sealer, SealError
from services.webhooks.sender import Schedule
from services.webhooks.sessions import VettedSessions
from shared.leased_queue import NOW, ClaimLost, LeasedQueue, Runner, Table
from shared.settings_parts import WebhookSettings

log = logging.getLogger("ordermill.alerts")

DELIVERIES = Table(name="alert_deliveries", channel="ordermill_alerts", claimed="sending",
                   order="next_attempt_at", touch="updated_at = now()")
USER_AGENT = "Ordermill-Alerts/1.0"
DEFINITIVE = frozenset({400, 403, 404, 410})  # Slack: invalid payload, revoked, no such hook
RESPONSE_READ = 4096


class Failure(Exception):
    def __init__(self, text: str, *, status: int | None = None, definitive: bool = False) -> None:
        super().__init__(text)
        self.status, self.definitive = status, definitive


def _scrubbed(text: str, url: str) -> str:
    """An error's text without the URL (aiohttp may quote it) or its path (the secret)."""
    path = url.split("://", 1)[-1].partition("/")[2]
    text = text.replace(url, "<the Slack URL>")
    if path:  # as given, JSON-escaped or percent-encoded
        for form in (path, path.replace("/", "\\/"), path.replace("/", "%2F")):
            text = text.replace(form, "<secret>")
    return slack.redact(text) or text


class SlackSender:
    def __init__(self, hooks: WebhookSettings, database_url: str | None) -> None:
        self.hooks = hooks
        self.policy = Policy.of(hooks.allow_networks)
        self.sealer = Sealer.from_key(hooks.secret_key)
        self.queue = LeasedQueue(DELIVERIES, lease=timedelta(seconds=hooks.queue.lease_seconds),
                                 backoff=Schedule(waits=hooks.retry_seconds))
        self.runner = Runner(self.queue, self.deliver, database_url=database_url,
                             concurrency=8, lane_concurrency=8,
                             poll_seconds=hooks.queue.poll_seconds)
        self.sessions = VettedSessions(self.policy, user_agent=USER_AGENT, limit=8)

    async def run(self, pool: asyncpg.Pool, stop: asyncio.Event) -> None:
        try:
            await self.runner.run(pool, stop)
        finally:
            await self.close()

    async def close(self) -> None:
        await self.sessions.close()

    async def deliver(self, pool: asyncpg.Pool, row: asyncpg.Record) -> None:
        rule_set_id = await pool.fetchval("SELECT rule_set_id FROM alerts WHERE id = $1",
                                          row["alert_id"])
        extra = {"alert_delivery_id": row["id"], "alert_id": row["alert_id"],
                 "channel": row["channel"], "attempt": row["attempts"]}
        try:
            url = await slack_url(pool, rule_set_id, row["channel"], self.sealer)
            if url is None:
                raise Failure(f"channel {row['channel']!r} has no Slack URL", definitive=True)
            status = await self.queue.guard(row, self.post(url, row["body"].encode()))
        except ClaimLost:
            log.warning("slack alert taken over by another sender; this attempt records nothing",
                        extra=extra)
        except SealError as exc:
            await self._failed(pool, row, Failure(str(exc)), extra)
        except Failure as exc:
            await self._failed(pool, row, exc, extra)
        else:
            if await self.queue.finish(pool, row, "delivered", delivered_at=NOW,
                                       status_code=status, last_error=None):
                log.info("slack alert delivered", extra={**extra, "status_code": status})

    async def post(self, url: str, body: bytes) -> int:
        """One attempt; the answer's status, or Failure saying why (without the URL)."""
        try:
            scheme, host, _ = parse(url)
            ip = literal(host)
            if ip is not None:  # aiohttp asks no resolver for an address: checked here
                self.policy.check(ip, host=host, scheme=scheme)
        except AddressRefused as exc:
            raise Failure(str(exc)) from None
        except ValueError as exc:
            raise Failure(f"invalid Slack URL: {_scrubbed(str(exc), url)}", definitive=True) from None
        try:
            async with self.sessions.get(scheme).post(
                    url, data=body, headers={"Content-Type": "application/json"},
                    allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(total=self.hooks.timeout)) as answer:
                text = (await answer.content.read(RESPONSE_READ)).decode("utf-8", "replace")
                status = answer.status
        except TimeoutError:
            raise Failure(f"{host}: timed out after {self.hooks.timeout:g} s") from None
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, AddressRefused):
                raise Failure(str(exc.os_error)) from None
            raise Failure(f"{host}: cannot connect: {_scrubbed(str(exc.os_error or exc), url)}") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise Failure(f"{host}: {type(exc).__name__}: {_scrubbed(str(exc), url)}"[:500]) from None
        if 200 <= status < 300:
            return status
        said = _scrubbed(" ".join(text.split()), url)[:200]  # an answer may quote the URL
        why = " (redirects are not followed)" if 300 <= status < 400 else ""
        raise Failure(f"{host} answered HTTP {status}{why}: {said}", status=status,
                      definitive=status in DEFINITIVE)

    async def _failed(self, pool: asyncpg.Pool, row: asyncpg.Record, failure: Failure,
                      extra: dict[str, object]) -> None:
        async with pool.acquire() as conn, conn.transaction():
            status = await self.queue.fail(conn, row, str(failure),
                                           transient=not failure.definitive)
            if failure.status is not None:
                await conn.execute("UPDATE alert_deliveries SET status_code = $2 WHERE id = $1",
                                   row["id"], failure.status)
        if status == DELIVERIES.parked:
            log.error("slack alert not delivered; parked", extra={**extra, "error": str(failure)})
        elif status is not None:
            log.warning("slack alert not delivered; will retry",
                        extra={**extra, "error": str(failure)})
