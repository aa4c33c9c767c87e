"""Render an email from the repository's templates and the order's data."""

from __future__ import annotations

import hashlib
from email.message import EmailMessage
from email.utils import formatdate
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
    order = await conn.fetchrow("SELECT * FROM orders WHERE id = $1", order_id)
    client = await conn.fetchrow("SELECT * FROM clients WHERE id = $1", order["client_id"])
    invoice = await conn.fetchrow("SELECT * FROM invoices WHERE order_id = $1", order_id)
    items = await conn.fetch(
        "SELECT p.name || coalesce(' - ' || s.domain, '') AS label, s.amount, s.domain,"
        " s.username FROM services s JOIN products p ON p.id = s.product_id WHERE s.order_id = $1"
        " UNION ALL SELECT 'Domain ' || d.action || ' - ' || d.domain, d.amount, d.domain, NULL"
        " FROM domains d WHERE d.order_id = $1", order_id)
    return {"order": dict(order), "client": dict(client),
            "invoice": dict(invoice) if invoice else None, "items": [dict(i) for i in items]}


def render(template: str, recipient: str, sender: str, message_id: str,
           context: dict[str, Any]) -> EmailMessage:
    message = EmailMessage()
    message["From"] = sender
    message["To"] = recipient
    message["Subject"] = SUBJECTS[template].format(order_number=context["order"]["order_number"])
    message["Message-ID"] = message_id
    message["Date"] = formatdate(usegmt=True)
    message.set_content(_ENV.get_template(f"{template}.txt.j2").render(context))
    message.add_alternative(_ENV.get_template(f"{template}.html.j2").render(context),
                            subtype="html")
    return message
