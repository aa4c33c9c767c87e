"""order.place: store the client, the order, its items and its invoice; emit order.placed.

Statements are few and set-based (one per table, not one per item): on a 2-core
machine the worker's CPU per database round trip is what limits throughput.
"""

from __future__ import annotations

import logging
import random
from decimal import Decimal

import asyncpg

from services.placement.pricing import (
    PricedDomain,
    PricedProduct,
    Promotion,
    default_currency,
    load_promotion,
    price_items,
)
from shared.contracts import ExistingClient, InvoicePaid, ItemRef, OrderPlaced, PlaceOrder
from shared.errors import Rejected
from shared.uow import UnitOfWork

log = logging.getLogger("ordermill.placement")

ZERO = Decimal("0.00")


async def place_order(cmd: PlaceOrder, uow: UnitOfWork) -> None:
    conn = uow.conn
    existing, client_id = await _order_and_client(conn, cmd)
    if existing is not None:
        log.info("order already placed", extra={"order_ref": cmd.order_ref, "order_id": existing})
        return
    currency = cmd.currency or await default_currency(conn)
    lines = await price_items(conn, cmd.items, currency)
    promotion = await load_promotion(conn, cmd.promo_code)
    products = [line for line in lines if isinstance(line, PricedProduct)]
    domains = [line for line in lines if isinstance(line, PricedDomain)]
    discount = sum((promotion.discount(p) for p in products), ZERO) if promotion else ZERO
    subtotal = sum((p.price + p.setup_fee for p in products), ZERO) + sum(
        (d.price for d in domains), ZERO)
    total = subtotal - discount

    stored = await _store_order(conn, cmd, uow, client_id, currency, subtotal, discount, total,
                                products, domains, promotion)
    if stored is None:  # a concurrent delivery of the same order_ref won
        log.info("order already placed", extra={"order_ref": cmd.order_ref})
        return
    order_id, number, service_ids, domain_ids, invoice_id = stored
    uow.emit("order.placed", OrderPlaced(
        order_id=order_id, order_number=number, order_ref=cmd.order_ref, client_id=client_id,
        invoice_id=invoice_id, total=total, currency=currency,
        items=[ItemRef(type="product", id=i) for i in service_ids]
        + [ItemRef(type="domain", id=i) for i in domain_ids],
    ))
    if invoice_id is not None and total == ZERO:
        # Paid at once (design section 1): announced like any invoice paid, so a storefront
        # bound to invoice.paid hears of it; no payment will ever come for it.
        uow.emit("invoice.paid", InvoicePaid(
            invoice_id=invoice_id, order_id=order_id, order_ref=cmd.order_ref, amount=ZERO))
    log.info("order placed", extra={"order_id": order_id, "order_ref": cmd.order_ref,
                                    "total": str(total), "currency": currency,
                                    "invoice_id": invoice_id})


async def _order_and_client(conn: asyncpg.Connection, cmd: PlaceOrder) -> tuple[int | None, int]:
    """The order already placed under this ref, if any, and the client (found or created)."""
    client = cmd.client
    if isinstance(client, ExistingClient):
        row = await conn.fetchrow(
            "SELECT (SELECT id FROM orders WHERE order_ref = $1) AS existing,"
            " (SELECT id FROM clients WHERE id = $2) AS client_id", cmd.order_ref, client.id)
        if row["existing"] is None and row["client_id"] is None:
            raise Rejected(f"unknown client {client.id}")
        return row["existing"], row["client_id"]
    # Insert-or-reuse in one statement, so two orders from one new client race safely;
    # nothing is inserted for an order already placed. A client reused by email keeps the
    # details (name, billing address) stored with it: an order never rewrites them.
    row = await conn.fetchrow(
        "WITH existing AS (SELECT id FROM orders WHERE order_ref = $6),"
        " ins AS (INSERT INTO clients (email, first_name, last_name, company, country,"
        "   address1, address2, city, state, postcode, phone)"
        "  SELECT $1, $2, $3, $4, $5, $7, $8, $9, $10, $11, $12"
        "  WHERE NOT EXISTS (SELECT 1 FROM existing)"
        "  ON CONFLICT (lower(email)) DO NOTHING RETURNING id)"
        " SELECT (SELECT id FROM existing) AS existing,"
        " COALESCE((SELECT id FROM ins),"
        "  (SELECT id FROM clients WHERE lower(email) = lower($1))) AS client_id",
        client.email, client.first_name, client.last_name, client.company, client.country,
        cmd.order_ref, client.address1, client.address2, client.city, client.state,
        client.postcode, client.phone,
    )
    client_id = row["client_id"]
    if client_id is None and row["existing"] is None:
        # The client was created by a transaction that committed after this statement began.
        client_id = await conn.fetchval(
            "SELECT id FROM clients WHERE lower(email) = lower($1)", client.email)
    return row["existing"], client_id


# The order, its history row, services, domains, invoice and invoice lines in one statement:
# each CTE feeds the next, and ids assigned in item order (ORDER BY n) map invoice lines to
# their items by position.
_STORE_ORDER = """
WITH o AS (
  INSERT INTO orders (order_ref, order_number, client_id, client_named_by_id, currency,
    payment_method, promo_code, ip_address, send_confirmation, generate_invoice, total,
    placed_by, placed_message_id)
  VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
  ON CONFLICT DO NOTHING RETURNING id
), h AS (
  INSERT INTO order_history (order_id, actor, action, to_status, detail)
  SELECT id, $14, 'placed', 'Pending', $15 FROM o
), s AS (
  INSERT INTO services (order_id, product_id, billing_cycle, domain, amount)
  SELECT o.id, u.product_id, u.cycle, u.domain, u.amount
  FROM o, unnest($16::bigint[], $17::text[], $18::text[], $19::numeric[])
    WITH ORDINALITY AS u(product_id, cycle, domain, amount, n)
  ORDER BY u.n RETURNING id
), d AS (
  INSERT INTO domains (order_id, domain, tld, action, years, epp_code, amount)
  SELECT o.id, u.domain, u.tld, u.action, u.years, u.epp_code, u.amount
  FROM o, unnest($20::text[], $21::text[], $22::text[], $23::int[], $24::text[],
    $25::numeric[]) WITH ORDINALITY AS u(domain, tld, action, years, epp_code, amount, n)
  ORDER BY u.n RETURNING id
), sn AS (SELECT id, row_number() OVER (ORDER BY id) AS n FROM s
), dn AS (SELECT id, row_number() OVER (ORDER BY id) AS n FROM d
), inv AS (
  INSERT INTO invoices (order_id, client_id, status, currency, subtotal, discount, total, paid_at)
  SELECT o.id, $3, CASE WHEN $11::numeric = 0 THEN 'Paid' ELSE 'Unpaid' END, $5, $26, $27, $11,
    CASE WHEN $11::numeric = 0 THEN now() END
  FROM o WHERE $10
  RETURNING id
), lines AS (
  INSERT INTO invoice_items (invoice_id, kind, service_id, domain_id, description, amount)
  SELECT inv.id, l.kind, sn.id, dn.id, l.description, l.amount
  FROM inv CROSS JOIN unnest($28::text[], $29::int[], $30::int[], $31::text[], $32::numeric[])
    AS l(kind, service_n, domain_n, description, amount)
  LEFT JOIN sn ON sn.n = l.service_n LEFT JOIN dn ON dn.n = l.domain_n
)
SELECT o.id, ARRAY(SELECT id FROM sn ORDER BY n) AS service_ids,
  ARRAY(SELECT id FROM dn ORDER BY n) AS domain_ids, (SELECT id FROM inv) AS invoice_id
FROM o
"""


async def _store_order(
    conn: asyncpg.Connection, cmd: PlaceOrder, uow: UnitOfWork, client_id: int, currency: str,
    subtotal: Decimal, discount: Decimal, total: Decimal, products: list[PricedProduct],
    domains: list[PricedDomain], promotion: Promotion | None,
) -> tuple[int, int, list[int], list[int], int | None] | None:
    """Store everything; None when an order with this ref already exists."""
    lines = _invoice_lines(products, domains, promotion, discount)
    args = (
        # order and history
        client_id, isinstance(cmd.client, ExistingClient), currency, cmd.payment_method,
        promotion.code if promotion else None, str(cmd.ip_address) if cmd.ip_address else None,
        cmd.send_confirmation, cmd.generate_invoice, total, uow.context.user_id,
        uow.context.message_id, uow.actor,
        {"total": str(total), "currency": currency, "message_id": uow.context.message_id},
        # services
        [p.product_id for p in products], [p.item.billing_cycle for p in products],
        [p.item.domain for p in products], [p.price for p in products],
        # domains
        [d.item.domain for d in domains], [d.tld for d in domains],
        [d.item.action for d in domains], [d.item.years for d in domains],
        [d.item.epp_code.get_secret_value() if d.item.epp_code else None for d in domains],
        [d.price for d in domains],
        # invoice and its lines
        subtotal, discount, *(list(column) for column in zip(*lines, strict=True)),
    )
    # WHMCS-style random 10-digit order numbers: not guessable, not a count of sales.
    # ON CONFLICT without a target covers both the ref and the number.
    for _ in range(5):
        number = random.randint(1_000_000_000, 9_999_999_999)
        row = await conn.fetchrow(_STORE_ORDER, cmd.order_ref, number, *args)
        if row is not None:
            return (row["id"], number, list(row["service_ids"]), list(row["domain_ids"]),
                    row["invoice_id"])
        if await conn.fetchval("SELECT 1 FROM orders WHERE order_ref = $1", cmd.order_ref):
            return None
    raise RuntimeError("could not draw a free order number")


def _invoice_lines(
    products: list[PricedProduct], domains: list[PricedDomain], promotion: Promotion | None,
    discount: Decimal,
) -> list[tuple[str, int | None, int | None, str, Decimal]]:
    """One line per item (and setup fee), the promotion last; items named by position."""
    lines: list[tuple[str, int | None, int | None, str, Decimal]] = []
    for n, line in enumerate(products, start=1):
        label = f"{line.name} ({line.item.billing_cycle})"
        if line.item.domain:
            label += f" - {line.item.domain}"
        lines.append(("service", n, None, label, line.price))
        if line.setup_fee:
            lines.append(("setup", n, None, f"{line.name} setup fee", line.setup_fee))
    for n, line in enumerate(domains, start=1):
        label = f"Domain {line.item.action} - {line.item.domain}"
        if line.item.action == "register":
            label += f" - {line.item.years} year(s)"
        lines.append(("domain", None, n, label, line.price))
    if promotion and discount:
        lines.append(("promotion", None, None, f"Promotion {promotion.code}", -discount))
    return lines
