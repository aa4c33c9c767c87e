"""The mail sender: claims pending emails with a lease, sends them over SMTP, marks them
sent; SMTP failures are retried with backoff and then parked for an operator."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import aiosmtplib
import asyncpg

from services.notify.mail import order_contexts, render
from shared import db
from shared.states import EmailStatus
from shared.wakeup import Wakeup

log = logging.getLogger("ordermill.notify")
_SMTP_ERRORS = (aiosmtplib.SMTPException, OSError, TimeoutError)
# A mail's own failures: the above, or an address aiosmtplib will not write (ValueError,
# UnicodeEncodeError), possibly after MAIL FROM went: the envelope is reset like a refusal's.
_MAIL_ERRORS = (*_SMTP_ERRORS, ValueError)

# The lease of a connection's mails still to go, renewed when due.
_RENEW = ("UPDATE emails SET lease_until = now() + $2::interval"
          " WHERE id = ANY($1::bigint[]) AND status = 'sending'")
# A mail's outcome is written only while our claim on it holds: a sender whose lease ran out
# never overwrites the one that took the mail over.
_WHILE_CLAIMED = " WHERE id = $1 AND status = 'sending' AND attempts = $2"

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


class _Renewal:
    """When the mails still to go on a connection get their lease renewed: once half of it
    has passed. A fast server never needs it; renewing after every mail rewrote each of
    a connection's waiting rows once per mail sent before it."""

    def __init__(self, lease: timedelta, since: float) -> None:
        self._half = lease.total_seconds() / 2
        self._at = since  # when the lease was set: the claim, not the connection

    def due(self, waiting: Sequence[asyncpg.Record]) -> list[int]:
        if not waiting or time.monotonic() - self._at < self._half:
            return []
        self._at = time.monotonic()
        return [e["id"] for e in waiting]


async def _reset(smtp: aiosmtplib.SMTP) -> bool:
    """Whether the server cleared a refused mail's envelope. aiosmtplib sends RSET after a
    refusal but hides its answer; a connection whose RSET fails is not used again."""
    try:
        await smtp.rset()
    except _SMTP_ERRORS:
        return False
    return True


class MailSender:
    def __init__(self, smtp: SmtpConfig, database_url: str, *, max_attempts: int,
                 backoff_seconds: float, poll_seconds: float) -> None:
        self.smtp = smtp
        self._wakeup = Wakeup(database_url, "ordermill_emails")
        self.max_attempts = max_attempts
        self.backoff_seconds = backoff_seconds
        self.poll_seconds = poll_seconds
        self.connections = 4  # SMTP connections at once, each sending several mails
        self.batch = 64  # mails claimed by one pass
        # An open connection is kept this long for the next mails (Postfix's connection cache
        # does the same): at a steady flow, passes are small and a connection's greeting,
        # EHLO, TLS and login would cost more than its mails. Far below the 5 minutes a
        # server waits for a quiet client (RFC 5321, 4.5.3.2.7).
        self.keepalive_seconds = 5.0
        # Once woken from idle, wait this long before claiming, so one pass carries the mails
        # of several orders (one claim, one context query) rather than one order's. A backlog
        # is sent without pause.
        self.linger_seconds = 0.1
        # A kept connection idle for longer than this is checked (NOOP) before it is used.
        self.check_after_seconds = 1.0
        self._idle: list[tuple[aiosmtplib.SMTP, float]] = []
        # Long enough to connect (greeting, EHLO, STARTTLS, EHLO, AUTH) and send one mail
        # (MAIL, RCPT, DATA, the body), each step bounded by the timeout; the mails still to
        # go on a connection get it again once half of it has passed.
        self.lease = timedelta(seconds=smtp.timeout * 10)
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
                except Exception:  # never lose the sender; the leases bring the mails back
                    log.exception("mail pass failed; will retry")
                    sent = 0
                await self._close_idle(self.keepalive_seconds)
                if sent >= self.batch:
                    continue  # a backlog: the next pass at once
                waiting = [asyncio.create_task(self._wakeup.event.wait()),
                           asyncio.create_task(stop.wait())]
                await asyncio.wait(waiting, timeout=min(self.poll_seconds, self.keepalive_seconds),
                                   return_when=asyncio.FIRST_COMPLETED)
                for task in waiting:
                    task.cancel()
                if self._wakeup.event.is_set() and not stop.is_set():
                    # Woken by a new request: let the next few arrive, to send them together.
                    await asyncio.sleep(self.linger_seconds)
        finally:
            await self.close()
            await self._wakeup.close()

    async def close(self) -> None:
        """Say QUIT on every connection kept open."""
        await self._close_idle(0)

    async def send_due(self, pool: asyncpg.Pool) -> int:
        """Claim what is due and send it over a few SMTP connections, each carrying several
        mails: a connection's greeting, EHLO, TLS and login cost more than a mail."""
        claimed_at = time.monotonic()  # before the claim: the lease was set no earlier
        emails = await pool.fetch(_CLAIM, self.lease, self.batch)
        if not emails:
            return 0
        if self._local_hostname is None:
            self._local_hostname = await asyncio.to_thread(socket.getfqdn)
        try:
            async with pool.acquire() as conn:
                contexts = await order_contexts(conn, list({e["order_id"] for e in emails}))
        except db.TRANSIENT_DB_ERRORS:
            # Nothing was sent: the claim goes back at once, no attempt spent (or, if the
            # database is away, when its lease runs out).
            with contextlib.suppress(*db.TRANSIENT_DB_ERRORS):
                await self._release(pool, emails)
            raise
        chunks = [emails[i::self.connections] for i in range(min(self.connections, len(emails)))]
        results = await asyncio.gather(*(self._send_over_one_connection(pool, chunk, contexts,
                                                                       claimed_at)
                                         for chunk in chunks), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result  # the others finished; a lease brings these back
        return len(emails)

    async def _connection(self) -> tuple[aiosmtplib.SMTP, bool]:
        """A kept connection that still answers, or a new one."""
        while self._idle:
            smtp, since = self._idle.pop()
            if not smtp.is_connected:
                continue  # the server closed it
            if time.monotonic() - since > self.check_after_seconds:
                try:  # a connection a firewall dropped silently must not cost a full timeout
                    await smtp.noop(timeout=min(self.smtp.timeout, 2.0))
                except _SMTP_ERRORS:
                    smtp.close()
                    continue
            return smtp, True
        smtp = aiosmtplib.SMTP(
            hostname=self.smtp.host, port=self.smtp.port, username=self.smtp.username,
            password=self.smtp.password, use_tls=self.smtp.security == "tls",
            start_tls=self.smtp.security == "starttls", timeout=self.smtp.timeout,
            local_hostname=self._local_hostname)
        await smtp.connect()
        return smtp, False

    async def _close_idle(self, older_than: float) -> None:
        now = time.monotonic()
        keep = [(smtp, since) for smtp, since in self._idle if now - since < older_than]
        closing = [smtp for smtp, since in self._idle if now - since >= older_than]
        self._idle = keep
        for smtp in closing:
            if smtp.is_connected:
                try:
                    await smtp.quit()
                except _SMTP_ERRORS:
                    smtp.close()

    async def _send_over_one_connection(self, pool: asyncpg.Pool, emails: list[asyncpg.Record],
                                        contexts: Mapping[int, dict[str, Any]],
                                        claimed_at: float) -> None:
        renewal = _Renewal(self.lease, claimed_at)
        try:
            smtp, reused = await self._connection()
        except _SMTP_ERRORS as exc:
            for email in emails:
                await self._failed(pool, email, exc)
            return
        kept = False
        try:
            for n, email in enumerate(emails):
                # Before each mail, not after: the connect (or NOOP) and this mail must both
                # fit in what is left of the lease.
                if renew := renewal.due(emails[n:]):
                    await pool.execute(_RENEW, renew, self.lease)
                try:
                    mail = render(email["template"], email["recipient"], self.smtp.sender,
                                  email["message_id"], contexts[email["order_id"]])
                except Exception as exc:  # this mail cannot be written; the others can
                    log.exception("email not rendered", extra={"email_id": email["id"]})
                    await self._failed(pool, email, exc)
                    continue
                try:
                    await smtp.sendmail(mail.sender, [mail.recipient], mail.data,
                                        mail_options=mail.mail_options)
                except _MAIL_ERRORS as exc:
                    if smtp.is_connected:  # this mail refused; the next may go
                        await self._failed(pool, email, exc)
                        if await _reset(smtp):
                            continue
                        # The server would not clear the refused envelope: the mails not
                        # yet tried go to a fresh connection, no attempt spent.
                        await self._release(pool, emails[n + 1:])
                        return
                    # The connection is gone (a drop, a timeout, a 421). Mails not yet tried
                    # are not at fault: back to pending at once, no attempt spent; nor is this
                    # one when the connection was a kept one (a stale connection, a server's
                    # per-connection limit).
                    if reused:
                        await self._release(pool, emails[n:])
                    else:
                        await self._failed(pool, email, exc)
                        await self._release(pool, emails[n + 1:])
                    return
                await self._sent(pool, email)
            if smtp.is_connected:
                self._idle.append((smtp, time.monotonic()))
                kept = True
        finally:
            if not kept:
                smtp.close()  # never leaked: a DB error or a cancellation closes it too

    async def _release(self, pool: asyncpg.Pool, emails: Sequence[asyncpg.Record]) -> None:
        if emails:
            await pool.execute(
                "UPDATE emails e SET status = 'pending', attempts = e.attempts - 1,"
                " lease_until = NULL, next_attempt_at = now()"
                " FROM unnest($1::bigint[], $2::int[]) AS c(id, attempts)"
                " WHERE e.id = c.id AND e.status = 'sending' AND e.attempts = c.attempts",
                [e["id"] for e in emails], [e["attempts"] for e in emails])

    async def _sent(self, pool: asyncpg.Pool, email: asyncpg.Record) -> None:
        await pool.execute(
            "UPDATE emails SET status = 'sent', sent_at = now(), lease_until = NULL,"
            " last_error = NULL" + _WHILE_CLAIMED, email["id"], email["attempts"])
        log.info("email sent", extra={"email_id": email["id"], "template": email["template"],
                                      "order_id": email["order_id"]})

    async def _failed(self, pool: asyncpg.Pool, email: asyncpg.Record, exc: BaseException) -> None:
        park = email["attempts"] >= self.max_attempts
        delay = timedelta(seconds=self.backoff_seconds * 2 ** (email["attempts"] - 1))
        await pool.execute(
            "UPDATE emails SET status = $3, last_error = $4, lease_until = NULL,"
            " next_attempt_at = now() + $5::interval" + _WHILE_CLAIMED,
            email["id"], email["attempts"], EmailStatus.PARKED if park else EmailStatus.PENDING,
            f"{type(exc).__name__}: {exc}", delay)
        (log.error if park else log.warning)(
            "email not sent" + ("; parked" if park else "; will retry"), extra={
                "email_id": email["id"], "template": email["template"],
                "order_id": email["order_id"], "error": str(exc)})
