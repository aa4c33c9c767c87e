"""The mail as written for SMTP: quoted-printable within RFC 2045's rules, and only addresses
that can be written into a header and an SMTP envelope get that far."""

from __future__ import annotations

import email
import random
from decimal import Decimal
from email import policy

import pytest
from pydantic import ValidationError

from services.notify.mail import _part, render
from shared.contracts import EmailSend, NewClient

CONTEXT = {
    "order": {"id": 1, "order_number": 123456, "order_ref": "ref-1", "total": Decimal("12.34"),
              "currency": "USD"},
    "client": {"first_name": "Anna", "last_name": "Lee", "email": "anna@shop.example"},
    "invoice": {"id": 1, "status": "Unpaid", "total": Decimal("12.34"), "currency": "USD"},
    "items": [{"label": "Starter", "amount": Decimal("12.34"), "domain": "anna.example",
               "username": None}],
}


def _decoded(raw: bytes) -> str:
    part = email.message_from_bytes(b"MIME-Version: 1.0\r\n" + raw, policy=policy.default)
    return part.get_payload(decode=True).decode().replace("\r\n", "\n")  # lines end CRLF on the wire


def test_a_line_break_in_a_name_stays_one_line_break() -> None:
    context = {**CONTEXT, "client": {**CONTEXT["client"], "first_name": "Anna\r\nMaria"}}
    mail = render("order_confirmation", "anna@shop.example", "Shop <billing@shop.example>",
                  "<x@shop.example>", context)
    assert b"\r\r" not in mail.data
    assert b"\n" not in mail.data.replace(b"\r\n", b"")
    message = email.message_from_bytes(mail.data, policy=policy.default)
    text = message.get_body(("plain",)).get_content()
    assert text.startswith("Dear Anna\r\nMaria,\r\n\r\nThank you")


def test_quoted_printable_lines_keep_to_the_rules_and_decode_to_the_text() -> None:
    pieces = ["a", " ", "\t", "=", "ü", "€", ".", "From ", "\n", "\r\n", "\r", "x" * 30, "-- "]
    rng = random.Random(7)
    texts = ["x" * 75 + " \nnext\n", "From here\nFrom " + "z" * 73 + "\n"] + [
        "".join(rng.choice(pieces) for _ in range(rng.randint(0, 60))) for _ in range(3000)]
    for text in texts:
        raw = _part("plain", text)
        body = raw.partition(b"\r\n\r\n")[2]
        assert b"\r" not in body.replace(b"\r\n", b"") and b"\n" not in body.replace(b"\r\n", b"")
        for line in body.split(b"\r\n"):
            assert len(line) <= 76, (text, line)
            assert not line.endswith((b" ", b"\t")), (text, line)
            assert not line.startswith(b"From "), (text, line)
        assert _decoded(raw) == text.replace("\r\n", "\n").replace("\r", "\n"), text


@pytest.mark.parametrize("address", [
    "anna@shop.example", "anna+billing@shop.example", "zoë@bücher.example", "o'neil@shop.example",
])
def test_addresses_a_storefront_sends_are_taken(address: str) -> None:
    assert NewClient(email=address, first_name="A", last_name="B").email == address
    assert EmailSend(template="order_confirmation", recipient=address, order_id=1,
                     order_ref="r", dedupe_key="k").recipient == address


@pytest.mark.parametrize("address", [
    "anna@shop.example\r\nBcc: all@victim.example", "an\x01na@shop.example",
    "a,b@shop.example", "a>b@shop.example", "a<b@shop.example", '"anna lee"@shop.example',
    "anna@ü..de", "anna@" + "x" * 64 + ".example", "a" * 250 + "@shop.example",
])
def test_addresses_that_would_break_a_header_or_the_envelope_are_refused(address: str) -> None:
    with pytest.raises(ValidationError, match="is not an email address"):
        EmailSend(template="order_confirmation", recipient=address, order_id=1, order_ref="r",
                  dedupe_key="k")
    with pytest.raises(ValidationError, match=r"is not an email address|at most 254"):
        NewClient(email=address, first_name="A", last_name="B")


def test_a_domain_left_as_unicode_needs_smtputf8() -> None:
    # A row recorded before the contract checked domains: never an 8-bit RCPT without SMTPUTF8.
    mail = render("order_confirmation", "anna@ü..de", "Shop <billing@shop.example>",
                  "<x@shop.example>", CONTEXT)
    assert mail.smtputf8 and mail.mail_options == ["SMTPUTF8", "BODY=8BITMIME"]
