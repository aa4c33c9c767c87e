"""The provisioning consumer's batch locks its orders first, in id order, as every other
batch does (fraud's, the job outcome writer's).

Its handlers lock each order as its message comes (a payment by invoice id or order ref, an
order event by id), so a batch of payments locked its orders in the order they were paid:
against the fraud worker's batch or the job outcome writer, both locking in id order, that
made cycles, and PostgreSQL broke each after its 1 s `deadlock_timeout` (seen in
bench/sustained.py: a three-way deadlock of a payment batch, an order event and a job
outcome write). Locked here first, in one statement, the handlers' own locks are already
held and cost no wait. A message alone is not loaded: it locks its one order (and, an event
applying a payment that names another order's invoice, that order after it: see below).

Every order a handler of the batch may lock is locked here: an order event's order, a
payment's (by invoice id or by ref), and the orders whose invoices the payments waiting for an
event's order name. An event applies the payments waiting for its order (`apply_waiting`),
found by the order's ref or its invoice; one that names the ref and another order's invoice
(two storefronts use the ref, and it pays the other's order) locked that order in its handler,
after the batch's orders, an older one included: out of id order, a cycle with any batch
locking both (docs/performance.md, "A batch's last order locks"). What commits after this
statement (an order placed meanwhile, a payment that starts waiting) is not locked here: its
handler locks it as a message alone does (an event alone that applies such a payment still
locks its order, then the other: as rare as the payment).

`load_orders`, the routes' load step, then reads the locked orders for the handlers, in one
statement for the batch (services/provisioning/batch.py): their own reads of the order and
its invoice (a payment by ref: the order too) are not made again, message by message."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg

from services.provisioning.batch import LockedOrders
from services.provisioning.payments import TEXT_LIMITS, int_or_none
from shared import db
from shared.contracts import OrderEvent, PaymentReceived


async def load_orders(messages: Sequence[Any], conn: asyncpg.Connection) -> list[LockedOrders]:
    """Lock the batch's orders (`lock_orders`), then read them, their invoices and the
    payments waiting for them, once for every message (the same object: the handlers share
    it, and what one of them changes it forgets)."""
    order_ids, refs = await _lock(messages, conn)
    locked = await LockedOrders.read(conn, order_ids, refs)
    return [locked] * len(messages)


async def lock_orders(messages: Sequence[Any], conn: asyncpg.Connection) -> list[None]:
    """Lock every order the batch's messages name, in id order; nothing is read for the
    handlers. An order whose payment its handler will not apply (an unauthorized publisher,
    no currency) is locked all the same, for the batch's transaction only: cheaper than
    deciding twice."""
    await _lock(messages, conn)
    return [None] * len(messages)


async def _lock(messages: Sequence[Any],
                conn: asyncpg.Connection) -> tuple[list[int], frozenset[str]]:
    """The orders locked, in id order, and the refs whose every order is among them (the
    payments' by ref)."""
    order_ids: set[int] = set()
    invoice_ids: set[int] = set()
    refs: set[str] = set()
    for message in messages:
        if isinstance(message, OrderEvent):
            order_ids.add(message.order_id)
        elif isinstance(message, PaymentReceived):
            invoice_id = int_or_none(message.invoice_id)
            if invoice_id is not None:
                invoice_ids.add(invoice_id)
            elif message.order_ref is not None:
                # A longer one is none (the payment keeps a shortened copy, no order's).
                if len(message.order_ref) <= TEXT_LIMITS["order_ref"]:
                    refs.add(message.order_ref)
    if not (order_ids or invoice_ids or refs):
        return [], frozenset()
    rows = await conn.fetch(
        # The ids first, as an array: the lock is then an index scan of the primary key
        # (an OR of them would scan every order). The last: the invoices' orders of the
        # payments waiting for an event's order by its ref (`apply_waiting` applies them);
        # `waiting_for IS NOT NULL` as written, the partial index's predicate (0015). The
        # arrays through `db.planned_once`: a generic plan, not one planned for each batch.
        "SELECT o.id FROM orders o WHERE o.id = ANY(ARRAY("
        f"  SELECT unnest({db.planned_once('$1', 'bigint[]')})"
        "  UNION ALL SELECT i.order_id FROM invoices i"
        f"   WHERE i.id = ANY({db.planned_once('$2', 'bigint[]')})"
        "  UNION ALL SELECT x.id FROM orders x"
        f"   WHERE x.order_ref = ANY({db.planned_once('$3', 'text[]')})"
        "  UNION ALL SELECT i.order_id FROM orders e JOIN payments p"
        "   ON p.order_ref = e.order_ref AND p.waiting_for IS NOT NULL"
        "   JOIN invoices i ON i.id = p.requested_invoice_id"
        f"   WHERE e.id = ANY({db.planned_once('$1', 'bigint[]')})))"
        " ORDER BY o.id FOR NO KEY UPDATE",
        sorted(order_ids), sorted(invoice_ids), sorted(refs))
    return [r["id"] for r in rows], frozenset(refs)
