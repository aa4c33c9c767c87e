"""Customer email over real SMTP (aiosmtpd on 127.0.0.1): once each, never for Fraud."""

from __future__ import annotations

import asyncio
import email
import socket
from collections.abc import Iterator
from email.message import Message

import pytest
from aiosmtpd.controller import Controller

from conftest import Harness, eventually, order_body
from services.fraud.worker import worker as fraud_worker
from services.notify.worker import worker as notify_worker
from services.placement.worker import worker as placement_worker


class Inbox:
    def __init__(self) -> None:
        self.messages: list[Message] = []

    async def handle_DATA(self, server, session, envelope) -> str:
        self.messages.append(email.message_from_bytes(envelope.content))
        return "250 OK"

    def to(self, recipient: str) -> list[Message]:
        return [m for m in self.messages if m["To"] == recipient]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def smtp() -> Iterator[tuple[Inbox, int]]:
    inbox, port = Inbox(), free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    yield inbox, port
    controller.stop()


def workers(h: Harness, port: int):
    s = h.settings.model_copy(update={"smtp_port": port, "job_backoff_seconds": 0.2,
                                      "job_poll_seconds": 0.2})
    return [placement_worker(s), fraud_worker(s), notify_worker(s)]


async def test_confirmation_and_invoice_mails_once_each_and_none_for_fraud(
    harness: Harness, smtp: tuple[Inbox, int],
) -> None:
    inbox, port = smtp
    store = await harness.listen("email.send")
    await harness.start(workers(harness, port))
    await harness.publish("order.place", order_body("mail-1"))
    await harness.publish("order.place", order_body("mail-fraud", ip_address="192.0.2.66"))
    order = await harness.screened("mail-1")
    assert (await harness.screened("mail-fraud"))["status"] == "Fraud"

    async def two() -> list[Message] | None:
        got = inbox.to("mail-1@shop.example")
        return got if len(got) >= 2 else None
    mails = await eventually(two)
    subjects = sorted(m["Subject"] for m in mails)
    assert subjects == [f"Invoice for order {order['order_number']}",
                        f"Order confirmation {order['order_number']}"]
    confirmation = next(m for m in mails if m["Subject"].startswith("Order confirmation"))
    parts = {p.get_content_type(): p.get_payload(decode=True).decode()
             for p in confirmation.walk() if not p.is_multipart()}
    assert "mail-1" in parts["text/plain"] and "28.95 USD" in parts["text/plain"]
    assert "<strong>28.95 USD</strong>" in parts["text/html"]
    # A redelivered request sends nothing again.
    request = next(b for b in store.bodies("email.send") if b["order_ref"] == "mail-1")
    await harness.publish("email.send", request)
    await asyncio.sleep(1.5)
    assert len(inbox.to("mail-1@shop.example")) == 2
    assert inbox.to("mail-fraud@shop.example") == []
    ids = {m["Message-ID"] for m in mails}
    assert len(ids) == 2


async def test_smtp_down_then_up(harness: Harness) -> None:
    port = free_port()  # nothing listens yet
    await harness.start(workers(harness, port))
    await harness.publish("order.place", order_body("mail-down"))
    await harness.screened("mail-down")

    async def failing() -> bool:
        return await harness.pool.fetchval(
            "SELECT bool_or(last_error IS NOT NULL) FROM emails") is True
    await eventually(failing)
    inbox = Inbox()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        # The SMTP server sees the mail a moment before the sender commits 'sent'.
        async def sent() -> bool:
            return await harness.pool.fetchval(
                "SELECT count(*) FROM emails WHERE status = 'sent'") == 2
        await eventually(sent, timeout=30)
        assert len(inbox.to("mail-down@shop.example")) == 2
    finally:
        controller.stop()
