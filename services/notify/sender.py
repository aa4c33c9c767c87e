"""The mail sender: claims due emails from the leased queue (shared/leased_queue.py), sends
them over SMTP, marks them sent; SMTP failures are retried with backoff and then parked for
an operator. A claim's lease is renewed while a slow server takes its time."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Mapping, Sequence
from datetime import timedelta
from functools import partial
from typing import Any

import aiosmtplib
import asyncpg

from services.notify.mail import order_contexts, render
from shared import db
from shared.leased_queue import NOW, Finisher, LeasedQueue, Table, wake_loop
from shared.runtime.middleware.retry import transient_retrying
from shared.settings_parts import MailSettings
from shared.wakeup import Wakeup

log = logging.getLogger("ordermill.notify")
_SMTP_ERRORS = (aiosmtplib.SMTPException, OSError, TimeoutError)
# A mail's own failures: the above, or an address aiosmtplib will not write (ValueError,
# UnicodeEncodeError), possibly after MAIL FROM went: the envelope is reset like a refusal's.
_MAIL_ERRORS = (*_SMTP_ERRORS, ValueError)

# Claimed in the order they became due, then created (0042's index): a backlog's mails leave
# oldest first, and mails waiting out a backoff are never read by a claim.
EMAILS = Table(name="emails", channel="ordermill_emails", claimed="sending",
               order="next_attempt_at, id")
# A mail the server took (or refused) is recorded so even if the database connection drops
# meanwhile (a PostgreSQL restart, seen in bench/chaos.py): the write is tried again in
# process on a fresh connection, about 9 s in all (contract rule 5), instead of leaving the
# claim to run out and the mail to go a second time. The claim's token guards the write: a
# commit that went through before its connection dropped is not recorded twice.
OUTCOME_WRITE_ATTEMPTS = 8


async def _reset(smtp: aiosmtplib.SMTP) -> bool:
    """Whether the server cleared a refused mail's envelope. aiosmtplib sends RSET after a
    refusal but hides its answer; a connection whose RSET fails is not used again."""
    try:
        await smtp.rset()
    except _SMTP_ERRORS:
        return False
    return True


class MailSender:
    def __init__(self, mail: MailSettings, database_url: str | None) -> None:
        """`mail` is the sender's part of the settings (SMTP_*, MAIL_FROM and the JOB_*
        queue policy); the database URL is for its wake-up connection (LISTEN)."""
        self.smtp = mail.smtp
        self._wakeup = Wakeup(database_url, EMAILS.channel)
        # A claim's lease is renewed every third of it while its connection goes (however
        # slow the server), so it can be short: a dead sender's mails go out soon after.
        self.queue = LeasedQueue.from_settings(EMAILS, mail.queue)
        self.poll_seconds = mail.queue.poll_seconds
        # SMTP connections at once, each sending several mails of a pass: at most this many
        # (SMTP_CONNECTIONS), the ceiling of the count a pass is allowed (`_limit`).
        self.connections = mail.smtp.connections
        # Mails claimed by one pass: a few for each connection, so that the pass's claim,
        # context query and marks (about 40 ms on a busy machine) are shared by many mails.
        self.batch = max(64, 8 * self.connections)
        # The count a pass is allowed adapts, as Postfix's per-destination concurrency does
        # (initial_destination_concurrency 5, growing toward its limit while deliveries go
        # and backing off on failures): a small relay is not met with SMTP_CONNECTIONS at once.
        # It starts at `initial_connections` and doubles after a pass that opened all it was
        # allowed and had mails for more. A server that refused connections beyond some (a
        # limit per client, as Exim's smtp_accept_max_per_host) is allowed what it took, with
        # no growth for `capped_seconds`, then asked for one more than it took. A server
        # that took none (down, a wrong password) gets one connection a pass, a probe: not a
        # burst of failed logins that trips fail2ban or locks the account.
        self.initial_connections = 4
        self.capped_seconds = 60.0
        self._allowed: int | None = None  # None: initial_connections (read at the first pass)
        self._no_growth_until = 0.0  # monotonic
        self._refused_above: int | None = None  # what the server took when it last refused more
        self._warned: int | None = None  # the limit last warned of: one warning per change
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
        # aiosmtplib looks up the FQDN in a thread on every connection (and a broken
        # resolver makes that slow): once per process is enough.
        self._local_hostname: str | None = None

    @property
    def lease(self) -> timedelta:
        return self.queue.lease

    @lease.setter
    def lease(self, lease: timedelta) -> None:
        self.queue.lease = lease

    async def run(self, pool: asyncpg.Pool, stop: asyncio.Event) -> None:
        """Send what is due; woken when a request is recorded (then lingering a moment, to
        send the next few with it), and by the timer for retries and idle connections."""
        try:
            await wake_loop(self._wakeup, stop, partial(self._pass, pool),
                            poll_seconds=min(self.poll_seconds, self.keepalive_seconds),
                            linger_seconds=self.linger_seconds)
        finally:
            await self.close()
            await self.queue.close()

    async def _pass(self, pool: asyncpg.Pool) -> bool:
        try:
            sent = await self.send_due(pool)
        finally:
            await self._close_idle(self.keepalive_seconds)
        return sent >= self.batch  # a backlog: the next pass at once

    async def close(self) -> None:
        """Say QUIT on every connection kept open."""
        await self._close_idle(0)

    async def send_due(self, pool: asyncpg.Pool) -> int:
        """Claim what is due and send it over a few SMTP connections, each carrying several
        mails: a connection's greeting, EHLO, TLS and login cost more than a mail."""
        emails = await self.queue.claim(pool, self.batch)
        if not emails:
            return 0
        async with self.queue.hold(pool, emails):
            await self._send(pool, emails)
        return len(emails)

    async def _send(self, pool: asyncpg.Pool, emails: list[asyncpg.Record]) -> None:
        if self._local_hostname is None:
            self._local_hostname = await asyncio.to_thread(socket.getfqdn)
        try:
            # A staff alert carries its own context; the others are an order's.
            orders = list({e["order_id"] for e in emails if e["context"] is None})
            async with pool.acquire() as conn:
                contexts = await order_contexts(conn, orders) if orders else {}
        except db.TRANSIENT_DB_ERRORS:
            # Nothing was sent: the claim goes back at once, no attempt spent (or, if the
            # database is away, when its lease runs out).
            with contextlib.suppress(*db.TRANSIENT_DB_ERRORS):
                await self.queue.release(pool, emails)
            raise
        connections = await self._open(self._limit(), len(emails))
        if isinstance(connections, BaseException):  # not one opened: the server is away
            for email in emails:
                await self._failed(pool, email, connections)
            return
        # The mails the server took are marked sent together, as many in each statement as
        # went while the previous one was written (not one transaction a mail).
        sent = Finisher(self.queue, pool, "sent", attempts=OUTCOME_WRITE_ATTEMPTS,
                        ended=self._log_sent, sent_at=NOW, last_error=None)
        n = len(connections)
        try:
            results = await asyncio.gather(
                *(self._send_over_one_connection(pool, smtp, reused, emails[i::n], contexts, sent)
                  for i, (smtp, reused) in enumerate(connections)),
                return_exceptions=True)
        finally:
            await sent.flush()  # whatever went is recorded, even if a connection failed
        for result in results:
            if isinstance(result, BaseException):
                raise result  # the others finished; a lease brings these back

    def _limit(self) -> int:
        """Connections a pass may open: what the server took lately, never above
        SMTP_CONNECTIONS."""
        allowed = self.initial_connections if self._allowed is None else self._allowed
        return max(1, min(allowed, self.connections))

    async def _open(self, allowed: int, mails: int
                    ) -> list[tuple[aiosmtplib.SMTP, bool]] | BaseException:
        """Up to `allowed` connections for `mails` mails, opened together; the error if none
        could be. What opened sets what the next passes are allowed (see __init__).

        Some opened and some refused (a 421 at the greeting, a reset): the server limits its
        clients' connections. The pass's mails go over those it took, no attempt spent."""
        wanted = min(allowed, mails)
        results = await asyncio.gather(*(self._connection() for _ in range(wanted)),
                                       return_exceptions=True)
        opened = [r for r in results if not isinstance(r, BaseException)]
        errors = [r for r in results if isinstance(r, BaseException)]
        unexpected = [e for e in errors if not isinstance(e, _SMTP_ERRORS)]
        if unexpected:  # a cancellation or a bug: no connection is left behind
            for smtp, _ in opened:
                smtp.close()
            raise unexpected[0]
        if not opened:
            if allowed > 1:
                log.warning("no SMTP connection opened: one a pass until one does", extra={
                    "connections": 1, "error": f"{type(errors[0]).__name__}: {errors[0]}"})
            self._allowed = 1
            return errors[0]
        if errors:
            self._refused(len(opened), errors)
        elif wanted == allowed < mails:
            self._grow(allowed)
        return opened

    def _refused(self, took: int, errors: Sequence[BaseException]) -> None:
        """The server took `took` connections and refused the others: it is allowed that
        many, with no growth for `capped_seconds`; warned of once while its limit stays."""
        self._allowed = self._refused_above = took
        self._no_growth_until = time.monotonic() + self.capped_seconds
        (log.warning if took != self._warned else log.debug)(
            "the SMTP server refused connections beyond some: using only those", extra={
                "connections": took, "refused": len(errors),
                "error": f"{type(errors[0]).__name__}: {errors[0]}"})
        self._warned = took

    def _grow(self, allowed: int) -> None:
        """A pass opened all it was allowed and had mails for more: allow more, doubling, but
        no further than one past the count a server last refused beyond (a probe costs it
        one refusal, not many)."""
        if allowed >= self.connections or time.monotonic() < self._no_growth_until:
            return
        if self._refused_above is not None and allowed > self._refused_above:
            self._refused_above = self._warned = None  # the server takes more now
        grown = 2 * allowed
        if self._refused_above is not None:
            grown = min(grown, self._refused_above + 1)
        self._allowed = min(grown, self.connections)
        log.info("SMTP connections allowed: more", extra={"connections": self._allowed})

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
            password=self.smtp.password and self.smtp.password.get_secret_value(),
            use_tls=self.smtp.security == "tls",
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

    async def _send_over_one_connection(self, pool: asyncpg.Pool, smtp: aiosmtplib.SMTP,
                                        reused: bool, emails: list[asyncpg.Record],
                                        contexts: Mapping[int, dict[str, Any]],
                                        sent: Finisher) -> None:
        kept = False
        try:
            for n, email in enumerate(emails):
                if sent.error is not None:
                    raise sent.error  # sent mails cannot be recorded: send no more
                if self.queue.lost(email):
                    continue  # taken over by another sender (this one was too slow): its to send
                try:
                    context = (email["context"] if email["context"] is not None
                               else contexts[email["order_id"]])
                    mail = render(email["template"], email["recipient"], self.smtp.sender,
                                  email["message_id"], context)
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
                        await self.queue.release(pool, emails[n + 1:])
                        return
                    # The connection is gone (a drop, a timeout, a 421). Mails not yet tried
                    # are not at fault: back to pending at once, no attempt spent; nor is this
                    # one when the connection was a kept one (a stale connection, a server's
                    # per-connection limit).
                    if reused:
                        await self.queue.release(pool, emails[n:])
                    else:
                        await self._failed(pool, email, exc)
                        await self.queue.release(pool, emails[n + 1:])
                    return
                sent.add(email)
            if smtp.is_connected:
                self._idle.append((smtp, time.monotonic()))
                kept = True
        finally:
            if not kept:
                smtp.close()  # never leaked: a DB error or a cancellation closes it too

    @staticmethod
    def _log_sent(emails: Sequence[asyncpg.Record], recorded: set[int]) -> None:
        """Each mail the server took: "email sent" if it was recorded sent; if its claim was
        lost meanwhile (another sender has it and may send it again), said so instead."""
        for email in emails:
            extra = {"email_id": email["id"], "template": email["template"],
                     "order_id": email["order_id"]}
            if email["id"] in recorded:
                log.info("email sent", extra=extra)
            else:
                log.warning("email sent but its claim was lost: not recorded here; another"
                            " sender has it and may send it again", extra=extra)

    async def _failed(self, pool: asyncpg.Pool, email: asyncpg.Record, exc: BaseException) -> None:
        status = None
        async for attempt in transient_retrying(OUTCOME_WRITE_ATTEMPTS):
            with attempt:
                status = await self.queue.fail(pool, email, f"{type(exc).__name__}: {exc}")
        if status is None:
            return  # no longer ours: the sender that took it over decides
        park = status == EMAILS.parked
        (log.error if park else log.warning)(
            "email not sent" + ("; parked" if park else "; will retry"), extra={
                "email_id": email["id"], "template": email["template"],
                "order_id": email["order_id"], "error": str(exc)})
