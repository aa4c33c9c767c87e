"""The mail sender: claims pending emails with a lease, sends them over SMTP, marks them
sent; SMTP failures are retried with backoff and then parked for an operator."""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass
from datetime import timedelta

import aiosmtplib
import asyncpg

from services.notify.mail import order_context, render
from shared import db
from shared.wakeup import Wakeup

log = logging.getLogger("ordermill.notify")

_CLAIM = """
UPDATE emails SET status = 'sending', attempts = attempts + 1,
  lease_until = now() + $1::interval
WHERE id IN (SELECT id FROM emails
  WHERE (status = 'pending' AND next_attempt_at <= now())
     OR (status = 'sending' AND lease_until < now())
  ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED)
RETURNING *
"""


@dataclass(frozen=True)
class SmtpConfig:
    host: str
    port: int
    sender: str
    username: str | None = None
    password: str | None = None
    security: str = "none"  # none, starttls, tls
    timeout: float = 10.0


class MailSender:
    def __init__(self, smtp: SmtpConfig, database_url: str, *, max_attempts: int,
                 backoff_seconds: float, poll_seconds: float) -> None:
        self.smtp = smtp
        self._wakeup = Wakeup(database_url, "ordermill_emails")
        self.max_attempts = max_attempts
        self.backoff_seconds = backoff_seconds
        self.poll_seconds = poll_seconds
        self.concurrency = 8  # SMTP conversations at once
        # aiosmtplib looks up the FQDN in a thread on every connection (and a broken
        # resolver makes that slow): once per process is enough.
        self._local_hostname: str | None = None

    async def run(self, pool: asyncpg.Pool, stop: asyncio.Event) -> None:
        """Send what is due; woken when a request is recorded, and by the timer for retries."""
        try:
            while not stop.is_set():
                await self._wakeup.ensure()
                self._wakeup.event.clear()
                try:
                    sent = await self.send_due(pool)
                except db.TRANSIENT_DB_ERRORS as exc:
                    log.warning("mail pass failed; will retry", extra={"error": str(exc)})
                    sent = 0
                if sent:
                    continue
                waiting = [asyncio.create_task(self._wakeup.event.wait()),
                           asyncio.create_task(stop.wait())]
                await asyncio.wait(waiting, timeout=self.poll_seconds,
                                   return_when=asyncio.FIRST_COMPLETED)
                for task in waiting:
                    task.cancel()
        finally:
            await self._wakeup.close()

    async def send_due(self, pool: asyncpg.Pool, limit: int = 20) -> int:
        emails = await pool.fetch(_CLAIM, timedelta(seconds=60), limit)
        if emails and self._local_hostname is None:
            self._local_hostname = await asyncio.to_thread(socket.getfqdn)
        gate = asyncio.Semaphore(self.concurrency)

        async def one(email: asyncpg.Record) -> None:
            async with gate:
                await self._send(pool, email)

        results = await asyncio.gather(*(one(email) for email in emails), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result  # the others finished; a lease brings this one back
        return len(emails)

    async def _send(self, pool: asyncpg.Pool, email: asyncpg.Record) -> None:
        async with pool.acquire() as conn:
            context = await order_context(conn, email["order_id"])
        message = render(email["template"], email["recipient"], self.smtp.sender,
                         email["message_id"], context)
        try:
            await aiosmtplib.send(
                message, hostname=self.smtp.host, port=self.smtp.port,
                username=self.smtp.username, password=self.smtp.password,
                use_tls=self.smtp.security == "tls", start_tls=self.smtp.security == "starttls",
                timeout=self.smtp.timeout, local_hostname=self._local_hostname)
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            park = email["attempts"] >= self.max_attempts
            delay = timedelta(seconds=self.backoff_seconds * 2 ** (email["attempts"] - 1))
            await pool.execute(
                "UPDATE emails SET status = $2, last_error = $3, lease_until = NULL,"
                " next_attempt_at = now() + $4::interval WHERE id = $1",
                email["id"], "parked" if park else "pending", f"{type(exc).__name__}: {exc}",
                delay)
            (log.error if park else log.warning)(
                "email not sent" + ("; parked" if park else "; will retry"), extra={
                    "email_id": email["id"], "template": email["template"],
                    "order_id": email["order_id"], "error": str(exc)})
            return
        await pool.execute("UPDATE emails SET status = 'sent', sent_at = now(), lease_until = NULL,"
                           " last_error = NULL WHERE id = $1", email["id"])
        log.info("email sent", extra={"email_id": email["id"], "template": email["template"],
                                      "order_id": email["order_id"]})
