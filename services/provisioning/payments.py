"""payment.received: record a payment once per gateway transaction and apply it to its invoice.

Money is never dropped: a payment that cannot be applied is stored `unapplied` with the
reason, announced with `payment.unapplied`, shown by `ordermill failures`, and applied
later when its order arrives.

A payment naming only an `order_ref` is applied when exactly one order has that ref. Refs are
unique per storefront (docs/contract.md, section 8), and a gateway's payment does not say which storefront
it pays for: when two storefronts use a ref, a payment by it is kept unapplied with the reason,
for an operator, never credited to either order.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

import asyncpg

from services.provisioning.batch import locked_orders
from services.provisioning.reconcile import OrderState
from shared.contracts import BIGINT_MAX, InvoicePaid, PaymentReceived, PaymentUnapplied, shown
from shared.states import ENDED, InvoiceStatus, OrderStatus, PaymentStatus, WaitingFor
from shared.uow import UnitOfWork

log = logging.getLogger("ordermill.payments")

CENT = Decimal("0.01")
MAX_AMOUNT = Decimal(10) ** 10  # payments.amount is numeric(12,2)


@dataclass(frozen=True)
class Problem:
    """Why a payment is not applied, and what it waits for (payments.waiting_for): its order
    to arrive (ORDER), an operator to set its ended order back to Pending (REVIEW), or
    nothing that will come by itself (None: a person must look)."""

    reason: str
    waiting_for: WaitingFor | None = None

# Called with the locked order after its invoice became Paid (the reconcile step), and the
# order's state as the payment's own statements left it (read under the lock they took, the
# invoice now Paid): the step needs no read of its own (`reconcile(state=...)`).
OnPaid = Callable[[UnitOfWork, int, OrderState], Awaitable[None]]


@dataclass(frozen=True)
class Payments:
    on_paid: OnPaid

    async def on_payment(self, payment: PaymentReceived, uow: UnitOfWork) -> None:
        conn = uow.conn
        amount, amount_problem = _amount(payment.amount)
        requested_invoice = int_or_none(payment.invoice_id)
        payment, too_long = _fitted(payment)
        amount_problem = amount_problem or too_long
        # The whole row back: `apply` needs it, and a row this transaction inserted is
        # already as locked as its `SELECT ... FOR UPDATE` would make it (no other
        # transaction sees it before the commit), so it is not read again.
        recorded = await conn.fetchrow(
            "INSERT INTO payments (gateway, transaction_id, amount, raw_amount, currency,"
            " requested_invoice_id, order_ref, publisher, status, message_id, trusted)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $11, $9, $10)"
            " ON CONFLICT (gateway, transaction_id) WHERE gateway IS NOT NULL"
            "  AND transaction_id IS NOT NULL AND trusted DO NOTHING RETURNING *",
            payment.gateway, payment.transaction_id, amount, str(payment.amount),
            payment.currency, requested_invoice, payment.order_ref, uow.context.user_id,
            uow.context.message_id, uow.context.authorized, PaymentStatus.UNAPPLIED,
        )
        if recorded is None:
            log.info("payment already recorded", extra={
                "gateway": payment.gateway, "transaction_id": payment.transaction_id})
            return
        problem = amount_problem or self._intake_problem(payment, uow, requested_invoice)
        if problem is None and requested_invoice is None and payment.invoice_id is not None:
            problem = f"invoice id {shown(str(payment.invoice_id))} is not an invoice id"
        if problem:
            # Nothing at intake clears up by itself: such a payment waits for nothing (one from
            # a publisher that is not a gateway above all: it is never applied).
            await _leave_unapplied(uow, recorded["id"], Problem(problem))
            return
        await self.apply(uow, recorded["id"], recorded=recorded)

    def _intake_problem(
        self, payment: PaymentReceived, uow: UnitOfWork, invoice_id: int | None
    ) -> str | None:
        if not uow.context.authorized:  # kept and shown to operators, never applied
            return f"publisher {uow.context.user_id or '(none)'!r} is not a configured gateway"
        if not payment.gateway or not payment.transaction_id:
            return "no gateway or transaction id"
        if not payment.currency:
            return "no currency"
        if invoice_id is None and not payment.order_ref and payment.invoice_id is None:
            return "names neither an invoice nor an order"
        return None

    async def apply(self, uow: UnitOfWork, payment_id: int, *,
                    recorded: asyncpg.Record | None = None) -> bool:
        """Apply a recorded payment to its invoice if it can be; True when applied.
        `recorded`: the payment's row as this transaction inserted it (not read again)."""
        conn = uow.conn
        p = recorded if recorded is not None else await conn.fetchrow(
            "SELECT * FROM payments WHERE id = $1 FOR NO KEY UPDATE", payment_id)
        if p["status"] == PaymentStatus.APPLIED or not p["trusted"]:
            # Another event about the order applied it since the caller listed it (two events
            # handled at once, each finding it waiting): counted once, never twice. One from a
            # publisher that is not a gateway is never applied.
            return False
        # The batch read the invoice and its order under its lock (batch.py); else read here.
        batch = locked_orders(uow)
        found = None
        if batch is not None:
            found = batch.invoice(p["requested_invoice_id"]) \
                if p["requested_invoice_id"] is not None else batch.invoice_by_ref(p["order_ref"])
        if found is None:
            found = await _find_invoice(conn, p["requested_invoice_id"], p["order_ref"])
        target = found if isinstance(found, Problem) else found[0]
        problem = _application_problem(p, target)
        if problem:
            await _leave_unapplied(uow, payment_id, problem)
            return False
        assert not isinstance(found, Problem)
        target, order = found
        paid_before = target["amount_paid"]
        paid_now = paid_before + p["amount"]
        newly_paid = target["status"] == InvoiceStatus.UNPAID and paid_now >= target["total"]
        # What goes over the total becomes client credit (all of it, on an invoice already paid).
        credit = max(Decimal("0.00"), paid_now - max(target["total"], paid_before))
        # The invoice and the payment in one statement (one round trip, not two).
        await conn.execute(
            "WITH paid AS (UPDATE invoices SET amount_paid = $5,"
            "  status = CASE WHEN $6 THEN $7 ELSE status END,"
            "  paid_at = CASE WHEN $6 THEN now() ELSE paid_at END WHERE id = $2)"
            " UPDATE payments SET status = $4, reason = NULL, waiting_for = NULL,"
            " invoice_id = $2, credit = $3, applied_at = now() WHERE id = $1",
            payment_id, target["id"], credit, PaymentStatus.APPLIED,
            paid_now, newly_paid, InvoiceStatus.PAID,
        )
        if batch is not None:
            batch.paid(target["order_id"])
        if credit:
            await conn.execute(
                "WITH c AS (INSERT INTO client_credit (client_id, amount, currency, payment_id,"
                "  reason) VALUES ($1, $2, $3, $4, 'overpayment'))"
                " UPDATE clients SET credit = credit + $2 WHERE id = $1",
                target["client_id"], credit, p["currency"], payment_id,
            )
        # With the other history rows of the transaction, in one statement for a batch of
        # payments (nothing in it reads the history back).
        uow.history_later(target["order_id"], "payment", detail={
            "payment_id": payment_id, "amount": str(p["amount"]), "gateway": p["gateway"],
            "transaction_id": p["transaction_id"], "credit": str(credit)})
        log.info("payment applied", extra={
            "payment_id": payment_id, "invoice_id": target["id"], "order_id": target["order_id"],
            "order_ref": target["order_ref"], "amount": str(p["amount"]),
            "invoice_paid": newly_paid})
        if newly_paid:
            uow.emit(InvoicePaid(
                invoice_id=target["id"], order_id=target["order_id"],
                order_ref=target["order_ref"], amount=target["total"]))
            # The order as locked above, with its invoice Paid now: what the reconcile
            # step's own locking read would find (this transaction holds the order's lock).
            await self.on_paid(uow, target["order_id"], OrderState.of(
                {**order, "invoice_status": InvoiceStatus.PAID}))
        return True

    async def apply_waiting(self, uow: UnitOfWork, order_id: int, *,
                            reopened: bool = False) -> OrderState | None:
        """Payments that arrived before their order are applied once it exists (called with
        every event about the order, in its transaction); `reopened` (the order was set back
        to Pending) also retries those refused because the order had ended.

        The order is locked and its state read by the same statement that lists them (the
        order row locked, the waiting payments read as the reconcile step's own locking read
        would have read its invoice). Returned when no payment was waiting (the usual case):
        the state the reconcile step needs, read under the lock this transaction now holds,
        so that step reads nothing again (one statement fewer an event). None when payments
        were applied (they changed it: read it again) or the order does not exist. In a
        batch, the batch's read after its lock gives the same row (batch.py), unless a
        handler before this one changed it."""
        waiting = [WaitingFor.ORDER, WaitingFor.REVIEW] if reopened else [WaitingFor.ORDER]
        batch = locked_orders(uow)
        row = batch.order_state(order_id, waiting) if batch is not None else None
        # `waiting_for IS NOT NULL` as written: the partial indexes' predicate (0015).
        row = row or await uow.conn.fetchrow(
            "SELECT o.id, o.order_ref, o.status, o.screening, o.screening_override,"
            " o.accept_options, i.status AS invoice_status,"
            " ARRAY(SELECT p.id FROM payments p WHERE p.waiting_for IS NOT NULL"
            "  AND (p.order_ref = o.order_ref OR p.requested_invoice_id = i.id)"
            "  AND p.waiting_for = ANY($2::text[]) ORDER BY p.id) AS waiting"
            " FROM orders o LEFT JOIN invoices i ON i.order_id = o.id WHERE o.id = $1"
            " FOR NO KEY UPDATE OF o",
            order_id, waiting,
        )
        if row is None:
            return None
        for payment_id in row["waiting"]:
            await self.apply(uow, payment_id)
        return None if row["waiting"] else OrderState.of(row)


# The order's columns a payment reads under the order's lock: its status and ref, and what
# the reconcile step decides from once the invoice is Paid (reconcile.OrderState).
_ORDER_COLUMNS = "o.id, o.status, o.order_ref, o.screening, o.screening_override, o.accept_options"


async def _find_invoice(
    conn: asyncpg.Connection, invoice_id: int | None, order_ref: str | None
) -> tuple[asyncpg.Record, asyncpg.Record] | Problem:
    """The invoice, locked with its order (order first: the lock order everyone uses), and
    the order as locked."""
    if invoice_id is not None:
        # The invoice's order, locked, in one statement: an invoice's order_id never changes,
        # and the lock returns the order's latest version (the invoice is read below).
        order = await conn.fetchrow(
            f"SELECT {_ORDER_COLUMNS} FROM invoices i JOIN orders o ON o.id = i.order_id"
            " WHERE i.id = $1 FOR NO KEY UPDATE OF o", invoice_id)
        if order is None:
            return Problem(f"unknown invoice {invoice_id}", WaitingFor.ORDER)
        order_id = order["id"]
    else:
        # A ref is unique per storefront only, and a gateway's payment does not say whose
        # order it pays: a ref that two storefronts use pays neither (kept unapplied, for an
        # operator), never the wrong one.
        orders = await conn.fetch(
            "SELECT id FROM orders WHERE order_ref = $1 ORDER BY id LIMIT 2", order_ref)
        if not orders:
            return Problem(f"order not placed yet: {order_ref}", WaitingFor.ORDER)
        if len(orders) > 1:
            return Problem(f"order_ref {order_ref} is used by more than one storefront: the"
                           " payment cannot say whose order it pays (it needs an invoice id)")
        order_id = orders[0]["id"]
        order = await conn.fetchrow(
            f"SELECT {_ORDER_COLUMNS} FROM orders o WHERE o.id = $1 FOR NO KEY UPDATE", order_id)
    # Read after the order's lock is held: a row joined into the locking statement could be
    # a stale version, and two payments would then both add to the same old amount.
    row = await conn.fetchrow(
        "SELECT i.*, $2::text AS order_status, $3::text AS order_ref FROM invoices i"
        " WHERE i.order_id = $1 FOR NO KEY UPDATE", order_id, order["status"], order["order_ref"])
    if row is None:
        return Problem(f"order {order['order_ref']} has no invoice")
    return row, order


def _application_problem(p: asyncpg.Record, target: asyncpg.Record | Problem) -> Problem | None:
    if isinstance(target, Problem):
        return target
    if p["requested_invoice_id"] is not None and p["order_ref"] and \
            p["order_ref"] != target["order_ref"]:
        return Problem(f"invoice {target['id']} belongs to order {target['order_ref']},"
                       f" not {p['order_ref']}")
    if p["currency"] != target["currency"]:
        return Problem(f"currency {p['currency']} does not match invoice {target['id']}"
                       f" in {target['currency']}")
    # Refused only because the order was ended: an operator setting it back to Pending
    # revives it.
    if target["order_status"] in ENDED:
        return Problem(f"order {target['order_ref']} is {OrderStatus(target['order_status'])}",
                       WaitingFor.REVIEW)
    if target["status"] == InvoiceStatus.CANCELLED:
        return Problem(f"invoice {target['id']} is Cancelled", WaitingFor.REVIEW)
    return None


async def _leave_unapplied(uow: UnitOfWork, payment_id: int, problem: Problem) -> None:
    # The order's ref, when the payment named only its invoice: the storefront listens by ref.
    row = await uow.conn.fetchrow(
        "UPDATE payments p SET status = $4, reason = $2, waiting_for = $3 WHERE id = $1"
        " RETURNING coalesce(order_ref, (SELECT o.order_ref FROM invoices i"
        "  JOIN orders o ON o.id = i.order_id WHERE i.id = p.requested_invoice_id)) AS order_ref,"
        " requested_invoice_id", payment_id, problem.reason, problem.waiting_for,
        PaymentStatus.UNAPPLIED,
    )
    if (batch := locked_orders(uow)) is not None:
        batch.payments_changed()
    uow.emit(PaymentUnapplied(
        payment_id=payment_id, reason=problem.reason, order_ref=row["order_ref"],
        invoice_id=row["requested_invoice_id"]))
    log.warning("payment not applied", extra={"payment_id": payment_id, "reason": problem.reason,
                                              "waiting_for": problem.waiting_for,
                                              "order_ref": row["order_ref"]})


def _amount(raw: Decimal | str) -> tuple[Decimal | None, str | None]:
    """The amount, or why it cannot be applied: the payment is stored either way."""
    try:
        amount = Decimal(str(raw))
    except InvalidOperation:
        return None, f"amount {shown(str(raw))} is not a number"
    if not amount.is_finite() or amount <= 0:
        return None, f"amount {shown(str(raw))} is not a positive amount"
    if amount >= MAX_AMOUNT:  # numeric(12,2); quantize would overflow the context first
        return None, f"amount {shown(str(raw))} is too large"
    if amount != amount.quantize(CENT):
        return None, f"amount {shown(str(raw))} has more than two decimal places"
    return amount, None


# What the payments' indexes can hold (a btree entry is at most about 2,700 bytes), with room:
# no real gateway's ids come near.
TEXT_LIMITS = {"gateway": 100, "transaction_id": 255, "order_ref": 100, "currency": 10}


def _fitted(payment: PaymentReceived) -> tuple[PaymentReceived, str | None]:
    """The payment with over-long texts shortened to fit, and why it cannot be applied. A
    shortened value ends with a hash of the whole, so two long ids that share a beginning
    stay two payments, and the payment is stored, never dropped."""
    changes: dict[str, str] = {}
    for name, limit in TEXT_LIMITS.items():
        value = getattr(payment, name)
        if value is not None and len(value) > limit:
            digest = hashlib.sha256(value.encode()).hexdigest()[:32]
            changes[name] = f"{value[:limit - 40]}...{digest}"
    if not changes:
        return payment, None
    names = ", ".join(f"{name} over {TEXT_LIMITS[name]} characters" for name in changes)
    return payment.model_copy(update=changes), f"{names} (kept shortened)"


def int_or_none(value: int | str | None) -> int | None:
    """An id as a bigint can hold it; None for anything else (superscript digits included,
    and more digits than a bigint has: Python refuses to read over 4,300 of them)."""
    if isinstance(value, str):
        text = value.strip()
        if not (text.isascii() and text.isdigit() and len(text) <= len(str(BIGINT_MAX))):
            return None
        value = int(text)
    if isinstance(value, int) and 0 < value <= BIGINT_MAX:
        return value
    return None
