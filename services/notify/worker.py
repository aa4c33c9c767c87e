"""The mail worker: email.send requests are recorded once (by dedupe key), then sent.

The factory takes the whole Settings (what `ordermill run` and the registry have); the
sender gets only `settings.mail` (SMTP and its queue's policy)."""

from __future__ import annotations

from services.notify.mail import SUBJECTS, message_id_for
from services.notify.sender import MailSender
from shared.contracts import EmailSend
from shared.errors import Rejected
from shared.metrics import EMAILS_BY_STATE
from shared.runtime import WorkerSpec, route
from shared.settings import Settings
from shared.uow import UnitOfWork


async def on_email(request: EmailSend, uow: UnitOfWork, *, domain: str) -> None:
    if request.template not in SUBJECTS:
        raise Rejected(f"unknown email template {request.template!r}")
    recorded = await uow.conn.fetchval(
        "INSERT INTO emails (dedupe_key, template, recipient, order_id, message_id)"
        " SELECT $1, $2, $3, id, $5 FROM orders WHERE id = $4"
        " ON CONFLICT (dedupe_key) DO NOTHING RETURNING true",
        request.dedupe_key, request.template, request.recipient, request.order_id,
        message_id_for(request.dedupe_key, domain))
    # Nothing written: a request recorded before (a resend), or an order that does not exist.
    if not recorded and not await uow.conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM orders WHERE id = $1)", request.order_id):
        raise Rejected(f"unknown order {request.order_id}")


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
