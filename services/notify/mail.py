"""Render an email from the repository's templates and the order's data."""

from __future__ import annotations

import contextlib
import hashlib
from decimal import Decimal
from email.charset import QP, Charset
from email.header import Header
from email.message import Message
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.policy import SMTPUTF8, compat32
from email.utils import formataddr, formatdate, parseaddr
from typing import Any

import asyncpg
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

SUBJECTS = {
    "order_confirmation": "Order confirmation {order_number}",
    "invoice_created": "Invoice for order {order_number}",
    "hosting_welcome": "Your hosting account is ready (order {order_number})",
}

_ENV = Environment(loader=PackageLoader("services.notify", "templates"),
                   autoescape=select_autoescape(["html.j2"]), undefined=StrictUndefined)


def message_id_for(dedupe_key: str, domain: str) -> str:
    """The same email always has the same Message-ID: a client can drop a rare resend."""
    return f"<{hashlib.sha256(dedupe_key.encode()).hexdigest()[:32]}@{domain}>"


async def order_context(conn: asyncpg.Connection, order_id: int) -> dict[str, Any]:
    """What the templates show: the order, its client, invoice and items."""
    return (await order_contexts(conn, [order_id]))[order_id]


async def order_contexts(conn: asyncpg.Connection, order_ids: list[int]) -> dict[int, dict[str, Any]]:
    """The templates' context of several orders in one round trip (a batch of mails)."""
    return {row["id"]: _context(row) for row in await conn.fetch(_CONTEXT, order_ids)}


def _context(row: asyncpg.Record) -> dict[str, Any]:
    invoice = None
    if row["invoice_id"] is not None:
        invoice = {"id": row["invoice_id"], "status": row["invoice_status"],
                   "total": row["invoice_total"], "currency": row["invoice_currency"]}
    return {
        "order": {"id": row["id"], "order_number": row["order_number"],
                  "order_ref": row["order_ref"], "total": row["total"], "currency": row["currency"]},
        "client": {"first_name": row["first_name"], "last_name": row["last_name"],
                   "email": row["email"]},
        "invoice": invoice,
        "items": [{"label": label, "amount": Decimal(amount), "domain": domain, "username": user}
                  for label, amount, domain, user in row["items"]],
    }


_CONTEXT = """
SELECT o.id, o.order_number, o.order_ref, o.total, o.currency, c.first_name, c.last_name, c.email,
  i.id AS invoice_id, i.status AS invoice_status, i.total AS invoice_total,
  i.currency AS invoice_currency,
  (SELECT coalesce(json_agg(json_build_array(label, amount, domain, username) ORDER BY n, id), '[]')
     FROM (SELECT 1 AS n, s.id, p.name || coalesce(' - ' || s.domain, '') AS label,
                  s.amount::text AS amount, s.domain, s.username
             FROM services s JOIN products p ON p.id = s.product_id WHERE s.order_id = o.id
           UNION ALL
           SELECT 2, d.id, 'Domain ' || d.action || ' - ' || d.domain, d.amount::text, d.domain, NULL
             FROM domains d WHERE d.order_id = o.id) x) AS items
FROM orders o JOIN clients c ON c.id = o.client_id
LEFT JOIN invoices i ON i.order_id = o.id
WHERE o.id = ANY($1::bigint[])
"""


_SUFFIX = {"plain": "txt", "html": "html"}
# Quoted-printable: the raw mail stays readable (in the quick start's mail log too).
_UTF8 = Charset("utf-8")
_UTF8.body_encoding = QP


def _header(value: str) -> str:
    return value if value.isascii() else Header(value, "utf-8").encode()


def render(template: str, recipient: str, sender: str, message_id: str,
           context: dict[str, Any]) -> Message:
    """A multipart/alternative mail: plain text, then HTML. Built with the classic MIME
    classes: `EmailMessage`'s header machinery cost three times as much CPU per mail."""
    local, _, domain = recipient.rpartition("@")
    with contextlib.suppress(UnicodeError):
        domain = domain.encode("idna").decode("ascii")  # bücher.example: xn--bcher-kva.example
    # A non-ASCII mailbox name cannot be an encoded-word (RFC 2047): it goes as UTF-8 (SMTPUTF8).
    policy = compat32 if local.isascii() else SMTPUTF8
    message = MIMEMultipart("alternative", policy=policy)
    name, address = parseaddr(sender)
    message["From"] = formataddr((name, address), charset="utf-8")
    message["To"] = f"{local}@{domain}"
    message["Subject"] = _header(
        SUBJECTS[template].format(order_number=context["order"]["order_number"]))
    message["Message-ID"] = message_id
    message["Date"] = formatdate(usegmt=True)
    for subtype in ("plain", "html"):
        text = _ENV.get_template(f"{template}.{_SUFFIX[subtype]}.j2").render(context)
        message.attach(MIMEText(text, subtype, _UTF8, policy=policy))
    return message
