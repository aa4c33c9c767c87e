"""Customer email over real SMTP (aiosmtpd on 127.0.0.1): once each, never for Fraud."""

from __future__ import annotations

import asyncio
import email
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from email.message import Message
from typing import Any

import aiosmtplib
import asyncpg
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, Session

from conftest import Harness, eventually, order_body
from services.fraud.worker import worker as fraud_worker
from services.notify.mail import Mail, order_context, render
from services.notify.sender import MailSender
from services.notify.worker import worker as notify_worker
from services.placement.worker import worker as placement_worker
from shared.leased_queue import Finisher


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


@contextmanager
def serving(inbox: Inbox) -> Iterator[int]:
    """An SMTP server on 127.0.0.1 handing mail to `inbox`; yields its port."""
    port = free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield port
    finally:
        controller.stop()


@pytest.fixture
def smtp() -> Iterator[tuple[Inbox, int]]:
    inbox = Inbox()
    with serving(inbox) as port:
        yield inbox, port


def mail_sender(harness: Harness, port: int, *, connections: int = 4,
                **smtp: str) -> MailSender:
    """A sender to the test's SMTP server; the test calls send_due itself. It is built
    from its part of the settings (`smtp` names SMTP_* settings: username, password, ...)."""
    s = harness.settings.model_copy(update={
        "smtp_host": "127.0.0.1", "smtp_port": port, "mail_from": "shop@host.example",
        "job_max_attempts": 3, "job_backoff_seconds": 60, "job_poll_seconds": 1,
        "job_lease_seconds": 30.0, **{f"smtp_{name}": value for name, value in smtp.items()}})
    sender = MailSender(s.mail, s.database_url)
    sender.connections = connections
    return sender


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


class PickyInbox(Inbox):
    """Counts SMTP connections, and refuses one recipient as a real server may (550)."""

    def __init__(self, refuse: str) -> None:
        super().__init__()
        self.refuse = refuse
        self.sessions: set[tuple] = set()

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options) -> str:
        self.sessions.add(session.peer)  # every connection names a recipient, refused or not
        if address == self.refuse:
            return "550 5.1.1 no such user"
        envelope.rcpt_tos.append(address)
        return "250 OK"


async def test_one_connection_carries_several_mails_and_a_refused_one_stops_none(
    harness: Harness,
) -> None:
    inbox = PickyInbox(refuse="mail-b1@shop.example")
    with serving(inbox) as port:
        s = harness.settings.model_copy(update={"smtp_port": port})
        notify = notify_worker(s)
        notify.background = ()  # the mails are recorded, not sent: the test sends them below
        await harness.start([placement_worker(s), fraud_worker(s), notify])
        refs = ["mail-b0", "mail-b1", "mail-b2", "mail-b3", "mail-b4"]
        for n, ref in enumerate(refs):  # from different IPs: no velocity rule
            await harness.publish("order.place", order_body(ref, ip_address=f"203.0.113.{n + 20}"))

        async def recorded() -> bool:
            return await harness.pool.fetchval("SELECT count(*) FROM emails") == 10
        await eventually(recorded)
        sender = mail_sender(harness, port)
        assert await sender.send_due(harness.pool) == 10
        await sender.close()
        assert len(inbox.messages) == 8
        assert len(inbox.sessions) == sender.connections  # 8 mails over 4 connections
        statuses = await harness.pool.fetch(
            "SELECT recipient, status, last_error FROM emails ORDER BY id")
        refused = [r for r in statuses if r["recipient"] == "mail-b1@shop.example"]
        assert {r["status"] for r in refused} == {"pending"}  # retried later, then parked
        assert all("no such user" in r["last_error"] for r in refused)
        assert {r["status"] for r in statuses if r not in refused} == {"sent"}


class ResetRefusingInbox(PickyInbox):
    """Refuses the first recipient it is given, then every RSET: a server whose state after
    a refusal is unknown."""

    def __init__(self) -> None:
        super().__init__(refuse="")
        self.refused = False

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options) -> str:
        if not self.refused:
            self.refused = True
            self.sessions.add(session.peer)
            return "550 5.1.1 no such user"
        return await super().handle_RCPT(server, session, envelope, address, rcpt_options)

    async def handle_RSET(self, server, session, envelope) -> str:
        return "451 4.3.0 cannot reset now" if self.refused else "250 OK"


async def test_a_connection_whose_reset_fails_after_a_refusal_is_not_used_again(
    harness: Harness,
) -> None:
    inbox = ResetRefusingInbox()
    with serving(inbox) as port:
        await _start_recording(harness, port)
        await _place_and_record(harness, ["rset-a", "rset-b"], first_ip=120)
        sender = mail_sender(harness, port, connections=1)
        assert await sender.send_due(harness.pool) == 4
        assert inbox.messages == [] and sender._idle == []  # the connection was closed
        rows = await harness.pool.fetch(
            "SELECT status, attempts, last_error IS NOT NULL AS failed FROM emails ORDER BY id")
        assert [tuple(r) for r in rows] == [("pending", 1, True)] + [("pending", 0, False)] * 3
        assert await sender.send_due(harness.pool) == 3  # the refused one waits for its backoff
        await sender.close()
        assert len(inbox.messages) == 3 and len(inbox.sessions) == 2


async def test_a_mail_that_cannot_be_written_fails_alone(harness: Harness, smtp) -> None:
    inbox, port = smtp
    s = harness.settings.model_copy(update={"smtp_port": port})
    notify = notify_worker(s)
    notify.background = ()
    await harness.start([placement_worker(s), fraud_worker(s), notify])
    await harness.publish("order.place", order_body("mail-noinv", generate_invoice=False))
    await harness.publish("order.place", order_body("mail-ok", ip_address="203.0.113.31"))

    async def recorded() -> bool:  # confirmation for both, invoice for mail-ok only
        return await harness.pool.fetchval("SELECT count(*) FROM emails") == 3
    await eventually(recorded)
    # A request for an invoice mail of an order that has no invoice: its template fails.
    order = await harness.order("mail-noinv")
    await harness.pool.execute(
        "INSERT INTO emails (dedupe_key, template, recipient, order_id, message_id)"
        " SELECT 'bogus', 'invoice_created', recipient, order_id, '<bogus@x>' FROM emails"
        " WHERE order_id = $1", order["id"])
    sender = mail_sender(harness, port, connections=1)  # the bad mail shares it with the good
    assert await sender.send_due(harness.pool) == 4
    await sender.close()
    assert len(inbox.messages) == 3
    bogus = await harness.pool.fetchrow("SELECT * FROM emails WHERE dedupe_key = 'bogus'")
    assert bogus["status"] == "pending" and "UndefinedError" in bogus["last_error"]


async def _start_recording(harness: Harness, port: int) -> None:
    """Placement, fraud and a notify worker that records mail requests but sends nothing."""
    s = harness.settings.model_copy(update={"smtp_port": port})
    notify = notify_worker(s)
    notify.background = ()
    await harness.start([placement_worker(s), fraud_worker(s), notify])


async def _place_and_record(harness: Harness, refs: list[str], first_ip: int) -> None:
    before = await harness.pool.fetchval("SELECT count(*) FROM emails")
    for n, ref in enumerate(refs):  # from different IPs: no velocity rule
        await harness.publish("order.place", order_body(ref, ip_address=f"203.0.113.{first_ip + n}"))

    async def recorded() -> bool:  # a confirmation and an invoice each
        return await harness.pool.fetchval("SELECT count(*) FROM emails") == before + 2 * len(refs)
    await eventually(recorded)


class EnvelopeInbox(Inbox):
    """Keeps each mail as the server got it (MAIL FROM's options and the bytes), and counts
    the connections that greeted it."""

    def __init__(self) -> None:
        super().__init__()
        self.received: list[tuple[list[str], bytes]] = []
        self.greetings = 0

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        self.greetings += 1
        session.host_name = hostname
        return responses

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.received.append((list(envelope.mail_options), envelope.original_content))
        return await super().handle_DATA(server, session, envelope)


async def test_a_connection_carries_the_mails_as_written(
    harness: Harness, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Over one connection, every mail reaches the server byte for byte as render() wrote
    it, MAIL FROM announcing its size (the refs are the run's own: the harness's database
    holds other tests' orders)."""
    written: list[bytes] = []

    def rendering(*args: Any, **kwargs: Any) -> Mail:
        mail = render(*args, **kwargs)
        written.append(mail.data)
        return mail

    monkeypatch.setattr("services.notify.sender.render", rendering)
    inbox = EnvelopeInbox()
    with serving(inbox) as port:
        await _start_recording(harness, port)
        refs = [f"lean-{uuid.uuid4().hex[:8]}-{n}" for n in range(3)]
        await _place_and_record(harness, refs, first_ip=140)
        sender = mail_sender(harness, port, connections=1)
        assert await sender.send_due(harness.pool) == 6
        await sender.close()
    assert sorted(data for _, data in inbox.received) == sorted(written)
    assert len(written) == 6 and inbox.greetings == 1
    for options, data in inbox.received:
        assert f"SIZE={len(data)}" in options


async def test_a_pass_records_its_sent_mails_together_and_a_refused_one_not(
    harness: Harness, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Sent mails are marked in as few statements as the database's pace allows (not one
    transaction each): the first at once, the ones sent while that write was in flight in
    one more. A refused mail is not marked sent."""
    inbox = PickyInbox(refuse="group-b@shop.example")
    with serving(inbox) as port:
        await _start_recording(harness, port)
        await _place_and_record(harness, ["group-a", "group-b", "group-c"], first_ip=130)
        sender = mail_sender(harness, port, connections=1)
        writes: list[list[str]] = []
        finish_many = sender.queue.finish_many
        handed: list[int] = []  # the mails handed to the pass's Finisher (sent ones)
        add = Finisher.add

        def counted_add(finisher: Finisher, row: asyncpg.Record) -> None:
            handed.append(row["id"])
            add(finisher, row)

        monkeypatch.setattr(Finisher, "add", counted_add)

        async def slow_first(conn, rows, status, **values) -> set[int]:
            writes.append([r["recipient"] for r in rows])
            if len(writes) == 1:  # the other mails go while this write is in flight
                # The Finisher's own count, not the server's: the inbox keeps a mail before
                # it says 250, so the sender may not have handed it over yet.
                await eventually(lambda: asyncio.sleep(0, len(handed) == 4), timeout=10)
            return await finish_many(conn, rows, status, **values)

        sender.queue.finish_many = slow_first
        assert await sender.send_due(harness.pool) == 6
        await sender.close()
        assert [len(w) for w in writes] == [1, 3]
        assert not any("group-b@shop.example" in w for w in writes)
        rows = await harness.pool.fetch("SELECT recipient, status, sent_at FROM emails")
        assert {(r["status"], r["sent_at"] is not None) for r in rows
                if r["recipient"] != "group-b@shop.example"} == {("sent", True)}
        assert {(r["status"], r["sent_at"]) for r in rows
                if r["recipient"] == "group-b@shop.example"} == {("pending", None)}


async def test_a_connection_is_kept_for_the_next_mails_then_closed(harness: Harness) -> None:
    inbox = PickyInbox(refuse="nobody@shop.example")
    with serving(inbox) as port:
        await _start_recording(harness, port)
        sender = mail_sender(harness, port, connections=1)
        await _place_and_record(harness, ["keep-a"], first_ip=40)
        assert await sender.send_due(harness.pool) == 2
        await _place_and_record(harness, ["keep-b"], first_ip=41)
        assert await sender.send_due(harness.pool) == 2
        assert len(inbox.messages) == 4
        assert len(inbox.sessions) == 1  # the second pass used the first pass's connection

        await sender.close()  # QUIT: the next pass opens a new one
        await _place_and_record(harness, ["keep-c"], first_ip=42)
        assert await sender.send_due(harness.pool) == 2
        assert len(inbox.sessions) == 2
        sender.keepalive_seconds = 0  # what the send loop does once a connection sat idle
        await sender._close_idle(sender.keepalive_seconds)
        await _place_and_record(harness, ["keep-d"], first_ip=43)
        assert await sender.send_due(harness.pool) == 2
        assert len(inbox.sessions) == 3
        await sender.close()
        assert await harness.pool.fetchval("SELECT count(*) FROM emails WHERE status = 'sent'") == 8


async def test_a_kept_connection_the_server_dropped_is_replaced(harness: Harness) -> None:
    inbox = PickyInbox(refuse="nobody@shop.example")
    port = free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        await _start_recording(harness, port)
        sender = mail_sender(harness, port, connections=1)
        sender.check_after_seconds = 0  # check the kept connection before every use
        await _place_and_record(harness, ["drop-a"], first_ip=44)
        assert await sender.send_due(harness.pool) == 2
        controller.stop()  # the server restarts: the connection the sender kept is gone
        controller = Controller(inbox, hostname="127.0.0.1", port=port)
        controller.start()
        await _place_and_record(harness, ["drop-b"], first_ip=45)
        assert await sender.send_due(harness.pool) == 2
        await sender.close()
        assert len(inbox.messages) == 4 and len(inbox.sessions) == 2
        assert await harness.pool.fetchval("SELECT count(*) FROM emails WHERE status = 'sent'") == 4
    finally:
        controller.stop()


class SlowInbox(Inbox):
    """Answers EHLO after `ehlo_delay` and each mail's DATA after `delay`."""

    def __init__(self, delay: float, ehlo_delay: float = 0.0) -> None:
        super().__init__()
        self.delay = delay
        self.ehlo_delay = ehlo_delay

    async def handle_EHLO(self, server, session, envelope, hostname, responses) -> list[str]:
        await asyncio.sleep(self.ehlo_delay)
        session.host_name = hostname
        return responses

    async def handle_DATA(self, server, session, envelope) -> str:
        await asyncio.sleep(self.delay)
        return await super().handle_DATA(server, session, envelope)


async def test_a_slow_connection_keeps_its_lease_and_no_mail_goes_twice(harness: Harness) -> None:
    """Six mails on one slow connection (0.9 s to log in, 0.4 s a mail) take longer than the
    2 s lease, counted from the claim: it is renewed as the connection goes, so a second
    sender polling all along takes none of them."""
    inbox = SlowInbox(delay=0.4, ehlo_delay=0.9)
    port = free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port, auth_require_tls=False,
                            authenticator=lambda *_: AuthResult(success=True))
    controller.start()
    try:
        await _start_recording(harness, port)
        await _place_and_record(harness, ["slow-a", "slow-b", "slow-c"], first_ip=50)

        def sender() -> MailSender:
            made = mail_sender(harness, port, connections=1, username="shop", password="secret")
            made.lease = timedelta(seconds=2)
            return made

        first, second = sender(), sender()
        sending = asyncio.create_task(first.send_due(harness.pool))
        await asyncio.sleep(0.2)  # the first has claimed all six
        taken = 0
        while not sending.done():
            taken += await second.send_due(harness.pool)
            await asyncio.sleep(0.1)
        assert await sending == 6 and taken == 0
        await first.close()
        ids = [m["Message-ID"] for m in inbox.messages]
        assert len(ids) == 6 and len(set(ids)) == 6
        assert await harness.pool.fetchval("SELECT count(*) FROM emails WHERE status = 'sent'") == 6
    finally:
        controller.stop()


class CappedInbox(Inbox):
    """Takes at most `cap` mails per connection, then answers 421, as Exim's
    smtp_accept_max_per_connection or an ISP's relay does."""

    def __init__(self, cap: int) -> None:
        super().__init__()
        self.cap = cap
        self.count: dict[int, int] = {}

    async def handle_MAIL(self, server, session, envelope, address, mail_options) -> str:
        n = self.count[id(session)] = self.count.get(id(session), 0) + 1
        if n > self.cap:
            return "421 4.7.0 too many messages in this connection"
        envelope.mail_from = address
        return "250 OK"


async def test_a_server_closing_a_kept_connection_costs_no_attempt(harness: Harness) -> None:
    inbox = CappedInbox(cap=3)
    with serving(inbox) as port:
        await _start_recording(harness, port)
        sender = mail_sender(harness, port, connections=1)
        await _place_and_record(harness, ["cap-a"], first_ip=30)
        assert await sender.send_due(harness.pool) == 2
        await _place_and_record(harness, ["cap-b", "cap-c"], first_ip=31)
        # The kept connection takes one more mail, then the server says 421 and hangs up:
        # the three mails not sent go back to pending at once, their attempt not counted.
        assert await sender.send_due(harness.pool) == 4
        assert len(inbox.messages) == 3
        back = await harness.pool.fetch("SELECT attempts FROM emails WHERE status = 'pending'")
        assert [r["attempts"] for r in back] == [0, 0, 0]
        assert await sender.send_due(harness.pool) == 3  # on a new connection
        await sender.close()
        assert len(inbox.messages) == 6
        assert await harness.pool.fetchval("SELECT count(*) FROM emails WHERE status = 'sent'") == 6


async def test_a_database_error_mid_connection_closes_it(
    harness: Harness, smtp, monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, port = smtp
    await _start_recording(harness, port)
    await _place_and_record(harness, ["leak-a"], first_ip=90)
    sender = mail_sender(harness, port, connections=1)
    opened: list[aiosmtplib.SMTP] = []
    connect = sender._connection

    async def tracked() -> tuple[aiosmtplib.SMTP, bool]:
        got = await connect()
        opened.append(got[0])
        return got

    async def lost(pool, emails, status, **values) -> set[int]:  # PostgreSQL restarted
        raise asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed")

    sender._connection = tracked
    sender.queue.finish_many = lost
    monkeypatch.setattr("services.notify.sender.OUTCOME_WRITE_ATTEMPTS", 1)  # retries spent
    with pytest.raises(asyncpg.exceptions.ConnectionDoesNotExistError):
        await sender.send_due(harness.pool)
    assert len(opened) == 1 and not opened[0].is_connected and not sender._idle


async def test_an_internationalised_address_is_written_as_smtp_allows(
    harness: Harness, smtp: tuple[Inbox, int],
) -> None:
    inbox, port = smtp
    await harness.start(workers(harness, port))
    await harness.publish("order.place", order_body(
        "mail-idn", client={"email": "zoe@bücher.example", "first_name": "Zoë"}))

    async def two() -> list[Message] | None:
        got = inbox.to("zoe@xn--bcher-kva.example")  # the domain as IDNA: plain ASCII
        return got if len(got) == 2 else None
    mails = await eventually(two)
    text = next(p for p in mails[0].walk() if p.get_content_type() == "text/plain")
    assert "Zoë" in text.get_payload(decode=True).decode()
    # A mailbox name beyond ASCII goes as UTF-8 (SMTPUTF8), never as an encoded-word.
    order = await harness.order("mail-idn")
    async with harness.pool.acquire() as conn:
        context = await order_context(conn, order["id"])
    mail = render("order_confirmation", "zoë@bücher.example", "Shop <billing@shop.example>",
                  "<x@shop.example>", context)
    assert "To: zoë@xn--bcher-kva.example" in mail.data.decode()
    assert (mail.recipient, mail.smtputf8) == ("zoë@xn--bcher-kva.example", True)


async def test_a_claim_whose_orders_cannot_be_read_goes_back_at_once(
    harness: Harness, smtp, monkeypatch: pytest.MonkeyPatch,
) -> None:
    inbox, port = smtp
    await _start_recording(harness, port)
    await _place_and_record(harness, ["ctx-a"], first_ip=95)
    sender = mail_sender(harness, port)

    async def lost(conn, order_ids):  # PostgreSQL restarted between the claim and the read
        raise asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed")

    monkeypatch.setattr("services.notify.sender.order_contexts", lost)
    with pytest.raises(asyncpg.exceptions.ConnectionDoesNotExistError):
        await sender.send_due(harness.pool)
    rows = await harness.pool.fetch("SELECT status, attempts, lease_until FROM emails")
    assert [(r["status"], r["attempts"], r["lease_until"]) for r in rows] == [("pending", 0, None)] * 2
    monkeypatch.undo()
    assert await sender.send_due(harness.pool) == 2
    await sender.close()
    assert len(inbox.messages) == 2


async def test_a_bad_mail_request_is_dead_lettered_and_a_line_break_never_a_header(
    harness: Harness, smtp,
) -> None:
    _, port = smtp
    await harness.start(workers(harness, port))
    injected = "mail-x@shop.example\r\nBcc: everyone@victim.example"
    bad_id = await harness.publish("email.send", {
        "template": "order_confirmation", "recipient": injected, "order_id": 1,
        "order_ref": "mail-x", "dedupe_key": "mail-x:confirmation"})
    dead = await eventually(lambda: harness.dead_letters("notify"))
    assert [m.message_id for m in dead] == [bad_id]
    assert "is not an email address" in dead[0].headers["x-ordermill-reason"]
    unknown_id = await harness.publish("email.send", {
        "template": "order_confirmation", "recipient": "mail-x@shop.example", "order_id": 999999,
        "order_ref": "mail-x", "dedupe_key": "mail-x:confirmation"})

    dead = await eventually(lambda: harness.dead_letters("notify"))  # takes what it reads
    assert [(m.message_id, m.headers["x-ordermill-reason"]) for m in dead] == [
        (unknown_id, "unknown order 999999")]
    assert await harness.pool.fetchval("SELECT count(*) FROM emails") == 0
    # Nor can the writer itself be made to write one (a request recorded before this check).
    await harness.publish("order.place", order_body("mail-y"))
    order = await harness.screened("mail-y")
    async with harness.pool.acquire() as conn:
        context = await order_context(conn, order["id"])
    with pytest.raises(ValueError, match="line break"):
        render("order_confirmation", injected, "Shop <billing@shop.example>", "<x@shop.example>",
               context)


async def test_an_address_smtp_cannot_carry_fails_alone_and_the_others_go(
    harness: Harness, smtp,
) -> None:
    inbox, port = smtp
    await _start_recording(harness, port)
    await _place_and_record(harness, ["poison-a", "poison-b"], first_ip=130)
    # A row recorded before the contract refused such addresses.
    await harness.pool.execute(
        "UPDATE emails SET recipient = 'an\x01na@shop.example' WHERE id = (SELECT min(id) FROM emails)")
    sender = mail_sender(harness, port, connections=1)
    assert await sender.send_due(harness.pool) == 4
    await sender.close()
    assert len(inbox.messages) == 3
    rows = await harness.pool.fetch("SELECT status, last_error FROM emails ORDER BY id")
    assert rows[0]["status"] == "pending" and rows[0]["last_error"].startswith("ValueError")
    assert [r["status"] for r in rows[1:]] == ["sent"] * 3


async def test_a_connection_dropped_while_recording_a_sent_mail_is_retried_in_process(
    harness: Harness, smtp,
) -> None:
    """The server took the mail, then the write that records it loses its database
    connection (a PostgreSQL restart, seen in bench/chaos.py). The write is tried again at
    once on a fresh connection: the pass goes on, every mail is recorded sent after one
    attempt, and none waits for its lease to run out and goes a second time."""
    inbox, port = smtp
    await _start_recording(harness, port)
    await _place_and_record(harness, ["drop-sent"], first_ip=95)
    sender = mail_sender(harness, port, connections=1)
    finish_many, dropped = sender.queue.finish_many, []

    async def finish_once_cut(conn, rows, status, **values) -> set[int]:
        if status == "sent" and not dropped:
            dropped.append(rows[0]["id"])  # this session ends: the server "restarts" under it
            async with conn.acquire() as own:
                await own.execute("SELECT pg_terminate_backend(pg_backend_pid())")
        return await finish_many(conn, rows, status, **values)

    sender.queue.finish_many = finish_once_cut
    assert await sender.send_due(harness.pool) == 2
    await sender.close()
    assert dropped
    assert len(inbox.to("drop-sent@shop.example")) == 2
    rows = await harness.pool.fetch("SELECT status, attempts FROM emails")
    assert [(r["status"], r["attempts"]) for r in rows] == [("sent", 1), ("sent", 1)]


def test_a_sent_mail_whose_claim_was_lost_is_not_logged_as_sent(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Only the mails the write recorded are "email sent"; one whose claim was lost (another
    sender has it and may send it again) is said to be so."""
    mails = [{"id": i, "template": "order_confirmation", "order_id": 7} for i in (1, 2)]
    with caplog.at_level("INFO", logger="ordermill.notify"):
        MailSender._log_sent(mails, {1})  # type: ignore[arg-type]
    said = [(r.levelname, r.getMessage().split(":")[0], r.email_id) for r in caplog.records]
    assert said == [("INFO", "email sent", 1),
                    ("WARNING", "email sent but its claim was lost", 2)]
