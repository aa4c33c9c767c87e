"""The mail worker: email.send requests are recorded once (by dedupe key), then sent.

The factory takes the whole Settings (what `ordermill run` and the registry have); the
sender gets only `settings.mail` (SMTP and its queue's policy)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from services.notify.mail import SUBJECTS, message_id_for
from services.notify.sender import EMAILS, MailSender
from shared.contracts import EmailSend
from shared.errors import Rejected
from shared.metrics import EMAILS_BY_STATE
from shared.runtime import WorkerSpec, route
from shared.settings import Settings
from shared.uow import UnitOfWork
from shared.wakeup import heard_here


@dataclass(frozen=True)
class _Mail:
    """One `email.send` request, to be recorded with the others of its transaction."""

    dedupe_key: str
    template: str
    recipient: str
    order_id: int
    message_id: str


async def on_email(request: EmailSend, uow: UnitOfWork, *, domain: str) -> None:
    if request.template not in SUBJECTS:
        raise Rejected(f"unknown email template {request.template!r}")
    uow.defer(record_mails, _Mail(request.dedupe_key, request.template, request.recipient,
                                  request.order_id, message_id_for(request.dedupe_key, domain)))


async def record_mails(conn: asyncpg.Connection, mails: Sequence[_Mail]) -> None:
    """The mail requests of every message sharing the transaction, in one statement (a
    steady flow's batches carry a few orders' mails: one insert, not one a mail), in the
    messages' order (the sender takes them by id). A request recorded before (a resend, by
    its dedupe key) writes nothing. One for an order that does not exist refuses the batch:
    it is handled again message by message, and that request alone is dead-lettered. The
    sender of this process, when it runs here, is woken in memory after the commit
    (wakeup.heard_here), not by a NOTIFY to every process."""
    inserted = await conn.fetch(
        "INSERT INTO emails (dedupe_key, template, recipient, order_id, message_id)"
        " SELECT u.k, u.t, u.r, o.id, u.m FROM unnest($1::text[], $2::text[], $3::text[],"
        "  $4::bigint[], $5::text[]) WITH ORDINALITY AS u(k, t, r, order_id, m, n)"
        " JOIN orders o ON o.id = u.order_id WHERE (SELECT ordermill_heard_here($6::text))"
        " ORDER BY u.n ON CONFLICT (dedupe_key) DO NOTHING RETURNING true",
        [m.dedupe_key for m in mails], [m.template for m in mails],
        [m.recipient for m in mails], [m.order_id for m in mails],
        [m.message_id for m in mails], heard_here(conn, EMAILS.channel))
    if len(inserted) == len(mails):
        return
    # Fewer written: requests recorded before, or orders that do not exist.
    unknown = await conn.fetchval(
        "SELECT min(u.order_id) FROM unnest($1::bigint[]) AS u(order_id)"
        " WHERE NOT EXISTS (SELECT 1 FROM orders o WHERE o.id = u.order_id)", [m.order_id for m in mails])
    if unknown is not None:
        raise Rejected(f"unknown order {unknown}")


def worker(settings: Settings) -> WorkerSpec:
    mail = settings.mail
    sender = MailSender(mail, settings.listen_url)
    domain = mail.domain

    async def handle(request: EmailSend, uow: UnitOfWork) -> None:
        await on_email(request, uow, domain=domain)

    # Mail is off the order's critical path: requests wait up to 50 ms to share a
    # transaction, so a steady flow costs a few transactions a second, not two per order.
    # One batcher: several would each take a message and linger with it.
    return WorkerSpec(service="notify", routes={"email.send": route(handle)},
                      concurrency=1, linger=0.05, background=(sender.run,),
                      gauges=(EMAILS_BY_STATE,))
