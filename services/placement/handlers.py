"""order.place: store the client, the order, its items and its invoice; emit order.placed.

Statements are few and set-based (one per table, not one per item): on a 2-core
machine the worker's CPU per database round trip is what limits throughput.
"""

from __future__ import annotations

import functools
import logging
import random
from dataclasses import dataclass
from decimal import Decimal

import asyncpg

from services.placement.pricing import (
    Catalog,
    PricedDomain,
    PricedProduct,
    Promotion,
    load_promotion,
    lock_promotions,
    read_catalog,
)
from shared.contracts import (
    ExistingClient,
    InvoicePaid,
    ItemRef,
    OrderPlaced,
    PlaceOrder,
    PlaceReply,
)
from shared.epp_codes import EppCodes
from shared.errors import Rejected
from shared.parties import operator_named
from shared.uow import UnitOfWork

log = logging.getLogger("ordermill.placement")

ZERO = Decimal("0.00")


@dataclass(frozen=True)
class Publisher:
    """Who placed the order: its storefront (the broker-validated user; '' for none, the shared
    anonymous storefront) and whether that user is an operator (OPERATOR_USERS)."""

    storefront: str
    operator: bool = False

    @classmethod
    def of(cls, uow: UnitOfWork, operators: frozenset[str] = frozenset()) -> Publisher:
        user = uow.context.user_id
        return cls(user or "", operator=user is not None and user in operators)


async def place_order(cmd: PlaceOrder, uow: UnitOfWork, *,
                      operators: frozenset[str] = frozenset(),
                      epp_codes: EppCodes | None = None) -> None:
    conn = uow.conn
    publisher = Publisher.of(uow, operators)
    # The catalog rows read with the batch's other orders (the route's load step, which locked
    # the batch's limited codes), or alone, its code locked before the client is written.
    catalog = uow.loaded if isinstance(uow.loaded, Catalog) else None
    if catalog is None:
        catalog = await read_catalog(conn, [cmd])
        await lock_promotions(conn, catalog)
    existing, client_id, shared_ref = await _order_and_client(conn, cmd, publisher)
    if existing is not None:
        log.info("order already placed", extra={"order_ref": cmd.order_ref, "order_id": existing})
        await _reply_placed(uow, cmd.order_ref, publisher)
        return
    currency = catalog.currency(cmd)
    lines = catalog.price(cmd.items, currency)
    promotion = await load_promotion(conn, cmd.promo_code, catalog)
    products = [line for line in lines if isinstance(line, PricedProduct)]
    domains = [line for line in lines if isinstance(line, PricedDomain)]
    discount = sum((promotion.discount(p) for p in products), ZERO) if promotion else ZERO
    subtotal = sum((p.price + p.setup_fee for p in products), ZERO) + sum(
        (d.price for d in domains), ZERO)
    total = subtotal - discount

    stored = await _store_order(conn, cmd, uow, publisher, client_id, currency, subtotal,
                                discount, total, products, domains, promotion,
                                epp_codes or _default_codes())
    if stored is None:  # a concurrent delivery of the same order_ref won
        log.info("order already placed", extra={"order_ref": cmd.order_ref})
        await _reply_placed(uow, cmd.order_ref, publisher)
        return
    order_id, number, service_ids, domain_ids, invoice_id = stored
    uow.reply(PlaceReply(ok=True, order_ref=cmd.order_ref, order_id=order_id,
                         order_number=number))
    if shared_ref:
        await _note_shared_ref(conn, cmd.order_ref, order_id, publisher)
    uow.emit(OrderPlaced(
        order_id=order_id, order_number=number, order_ref=cmd.order_ref, client_id=client_id,
        invoice_id=invoice_id, total=total, currency=currency,
        items=[ItemRef(type="product", id=i) for i in service_ids]
        + [ItemRef(type="domain", id=i) for i in domain_ids],
        storefront=uow.context.user_id,
    ))
    if invoice_id is not None and total == ZERO:
        # Paid at once (docs/contract.md, section 1): announced like any invoice paid, so a storefront
        # bound to invoice.paid hears of it; no payment will ever come for it.
        uow.emit(InvoicePaid(
            invoice_id=invoice_id, order_id=order_id, order_ref=cmd.order_ref, amount=ZERO))
    log.info("order placed", extra={"order_id": order_id, "order_ref": cmd.order_ref,
                                    "total": str(total), "currency": currency,
                                    "invoice_id": invoice_id})


async def _reply_placed(uow: UnitOfWork, order_ref: str, publisher: Publisher) -> None:
    """The same answer for an order placed before (a repeated or redelivered order.place)."""
    if not uow.context.reply_to:
        return
    row = await uow.conn.fetchrow(
        "SELECT id, order_number FROM orders WHERE order_ref = $1 AND storefront = $2",
        order_ref, publisher.storefront)
    if row is not None:
        uow.reply(PlaceReply(ok=True, order_ref=order_ref, order_id=row["id"],
                             order_number=row["order_number"]))


@functools.cache
def _default_codes() -> EppCodes:
    return EppCodes.from_environ()


# The order this storefront already placed under the ref, whether other storefronts use the ref
# too (both from one read of the ref's orders), and the client named by id if this storefront
# may use it: its creator (clients.storefront), a storefront an operator linked it to
# (client_storefronts), or any operator ($4).
_BY_ID = """
WITH refs AS MATERIALIZED (SELECT id, storefront FROM orders WHERE order_ref = $1)
SELECT (SELECT id FROM refs WHERE storefront = $3) AS existing,
  EXISTS (SELECT 1 FROM refs WHERE storefront <> $3) AS shared_ref,
  (SELECT c.id FROM clients c WHERE c.id = $2 AND ($4 OR c.storefront = $3 OR EXISTS (
     SELECT 1 FROM client_storefronts l WHERE l.storefront = $3 AND l.client_id = c.id)))
  AS client_id
"""

# By email: a client of this storefront's with that email (its own first, then one an operator
# linked to it; for an operator, any), or a new one of its own. Insert-or-reuse in one
# statement, so two orders from one new client race safely; nothing is inserted for an order
# already placed. A client reused by email keeps the details (name, billing address) stored with
# it: an order never rewrites them. A new client is its storefront's by clients.storefront
# alone: client_storefronts holds the links operators add (and, from before, creators' links),
# so placing an order for a new client writes no link row.
_BY_EMAIL = """
WITH refs AS MATERIALIZED (SELECT id, storefront FROM orders WHERE order_ref = $6),
existing AS (SELECT id FROM refs WHERE storefront = $13),
found AS (
  SELECT c.id FROM clients c WHERE lower(c.email) = lower($1) AND ($14 OR c.storefront = $13
    OR EXISTS (SELECT 1 FROM client_storefronts l WHERE l.storefront = $13 AND l.client_id = c.id))
  ORDER BY c.storefront = $13 DESC, c.id LIMIT 1
), ins AS (
  INSERT INTO clients (email, first_name, last_name, company, country,
    address1, address2, city, state, postcode, phone, storefront)
  SELECT $1, $2, $3, $4, $5, $7, $8, $9, $10, $11, $12, $13
  WHERE NOT EXISTS (SELECT 1 FROM existing) AND NOT EXISTS (SELECT 1 FROM found)
  ON CONFLICT (storefront, lower(email)) DO NOTHING RETURNING id
)
SELECT (SELECT id FROM existing) AS existing,
  EXISTS (SELECT 1 FROM refs WHERE storefront <> $13) AS shared_ref,
  COALESCE((SELECT id FROM found), (SELECT id FROM ins)) AS client_id
"""


async def _order_and_client(
    conn: asyncpg.Connection, cmd: PlaceOrder, publisher: Publisher
) -> tuple[int | None, int, bool]:
    """The order this storefront already placed under this ref, if any; the client (found or
    created); and whether another storefront uses the ref too."""
    client = cmd.client
    if isinstance(client, ExistingClient):
        row = await conn.fetchrow(_BY_ID, cmd.order_ref, client.id, publisher.storefront,
                                  publisher.operator)
        if row["existing"] is None and row["client_id"] is None:
            # The same answer for a client that does not exist and one of another storefront's:
            # a storefront learns nothing about others' customers.
            raise Rejected(f"unknown client {client.id}")
        return row["existing"], row["client_id"], row["shared_ref"]
    row = await conn.fetchrow(
        _BY_EMAIL, client.email, client.first_name, client.last_name, client.company,
        client.country, cmd.order_ref, client.address1, client.address2, client.city,
        client.state, client.postcode, client.phone, publisher.storefront, publisher.operator,
    )
    client_id = row["client_id"]
    if client_id is None and row["existing"] is None:
        # The client was created by a transaction that committed after this statement began.
        client_id = await conn.fetchval(
            "SELECT id FROM clients WHERE storefront = $2 AND lower(email) = lower($1)",
            client.email, publisher.storefront)
    return row["existing"], client_id, row["shared_ref"]


async def _note_shared_ref(conn: asyncpg.Connection, order_ref: str, order_id: int,
                           publisher: Publisher) -> None:
    """Another storefront already uses this ref: each has its own order, and a payment naming
    only the ref is no longer applied (it cannot say whose order it pays). One that was applied
    before this order came is listed in its history, for an operator to check."""
    paid = await conn.fetch(
        "SELECT p.id, o.id AS order_id FROM payments p JOIN invoices i ON i.id = p.invoice_id"
        " JOIN orders o ON o.id = i.order_id"
        " WHERE p.order_ref = $1 AND p.requested_invoice_id IS NULL AND o.storefront <> $2"
        " ORDER BY p.id", order_ref, publisher.storefront)
    detail = {"order_ref": order_ref,
              "payments_by_ref_applied_to": [[r["id"], r["order_id"]] for r in paid]}
    await conn.execute(
        "INSERT INTO order_history (order_id, actor, action, detail)"
        " VALUES ($1, 'placement', 'order_ref shared with another storefront', $2)",
        order_id, detail)
    log.warning("order_ref used by another storefront too", extra={
        "order_ref": order_ref, "order_id": order_id, "storefront": publisher.storefront,
        "payments_by_ref_applied_elsewhere": len(paid)})


# The order, its history row, services, domains, invoice and invoice lines in one statement:
# each CTE feeds the next, and ids assigned in item order (ORDER BY n) map invoice lines to
# their items by position.
_STORE_ORDER = """
WITH o AS (
  INSERT INTO orders (order_ref, order_number, client_id, client_named_by_id, currency,
    payment_method, promo_code, ip_address, send_confirmation, generate_invoice, total,
    placed_by, placed_message_id, storefront)
  VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $33)
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


def _placed_history(cmd: PlaceOrder, uow: UnitOfWork, total: Decimal,
                    currency: str) -> tuple[str, dict[str, object]]:
    """The placement history row's actor and detail: the operator the console signed in when
    a console user places it (as review commands name them, shared/parties.py), with the
    console's broker user in the detail; the publisher (or this service) otherwise."""
    ctx = uow.context
    detail: dict[str, object] = {"total": str(total), "currency": currency,
                                 "message_id": ctx.message_id}
    actor = operator_named(ctx.user_id, ctx.parties, cmd.operator)
    if actor is None:
        return uow.actor, detail
    if actor != ctx.user_id and ctx.user_id is not None:
        detail["publisher"] = ctx.user_id  # the console that vouched for the operator
    return actor, detail


async def _store_order(
    conn: asyncpg.Connection, cmd: PlaceOrder, uow: UnitOfWork, publisher: Publisher,
    client_id: int, currency: str, subtotal: Decimal, discount: Decimal, total: Decimal,
    products: list[PricedProduct], domains: list[PricedDomain], promotion: Promotion | None,
    epp_codes: EppCodes,
) -> tuple[int, int, list[int], list[int], int | None] | None:
    """Store everything; None when an order with this ref already exists."""
    lines = _invoice_lines(products, domains, promotion, discount)
    args = (
        # order and history
        client_id, isinstance(cmd.client, ExistingClient), currency, cmd.payment_method,
        promotion.code if promotion else None, str(cmd.ip_address) if cmd.ip_address else None,
        cmd.send_confirmation, cmd.generate_invoice, total, uow.context.user_id,
        uow.context.message_id, *_placed_history(cmd, uow, total, currency),
        # services
        [p.product_id for p in products], [p.item.billing_cycle for p in products],
        [p.item.domain for p in products], [p.price for p in products],
        # domains
        [d.item.domain for d in domains], [d.tld for d in domains],
        [d.item.action for d in domains], [d.item.years for d in domains],
        # A transfer's EPP code, encrypted when EPP_CODE_KEY is set (shared.epp_codes).
        [epp_codes.seal(d.item.epp_code.get_secret_value()) if d.item.epp_code else None
         for d in domains],
        [d.price for d in domains],
        # invoice and its lines
        subtotal, discount, *(list(column) for column in zip(*lines, strict=True)),
        publisher.storefront,
    )
    # WHMCS-style random 10-digit order numbers: not guessable, not a count of sales.
    # ON CONFLICT without a target covers both the (ref, storefront) and the number.
    for _ in range(5):
        number = random.randint(1_000_000_000, 9_999_999_999)
        row = await conn.fetchrow(_STORE_ORDER, cmd.order_ref, number, *args)
        if row is not None:
            return (row["id"], number, list(row["service_ids"]), list(row["domain_ids"]),
                    row["invoice_id"])
        if await conn.fetchval("SELECT 1 FROM orders WHERE order_ref = $1 AND storefront = $2",
                               cmd.order_ref, publisher.storefront):
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
