"""What a batch of the provisioning consumer read once its orders were locked, shared by its
handlers (`uow.loaded`, from `locks.load_orders`), and the reconcile steps they leave to the
end of the batch.

Read in one statement after the batch's lock (a statement of its own: begun once every lock
is held, it sees what their last holders committed; the locking statement's own snapshot is
older than a lock it waited for): each order's row, its invoice, and the payments waiting
for it. That is what each handler read on its own, one statement each (a payment: its order
and its invoice, found by its ref too: `refs`, every order with the ref, locked by it; an
order event: its order, invoice status and waiting payments), as long as nothing of the batch
changed it since: a payment applied to an order drops the order (its invoice changed), a
payment left unapplied drops everything (it may now wait for any of them); a handler that
finds nothing reads for itself, as a message alone does.

Every invoice writer holds its order's lock (payments here, `shared.orders.transition`): with
the batch's orders locked, their invoices change only by this batch.

The reconcile steps of orders not ended are queued (`reconcile_later`) and run together at
the end of the batch, before its events (`reconcile.reconcile_many`: two statements for the
batch, not two or three a message). A step that cannot wait (an ended order's) and an
`order.retry` (it changes the order's jobs) first run the steps queued for their order, so
each order's steps and job changes keep the order their messages came in."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from services.provisioning.reconcile import OrderState, Step, reconcile_many
from shared import db
from shared.uow import UnitOfWork

# The order's columns as the batch reads them (as `o__id`, ...: apart from the invoice's `i.*`).
_ORDER = ("id", "order_ref", "status", "screening", "screening_override", "accept_options")


@dataclass
class LockedOrder:
    order: dict[str, Any]  # _ORDER's columns
    invoice: dict[str, Any] | None  # the invoice's row, None if the order has none
    waiting: list[tuple[int, str]]  # (payment id, what it waits for), by id


@dataclass(eq=False)
class LockedOrders:
    orders: dict[int, LockedOrder]
    invoices: dict[int, int]  # invoice id -> order id
    # The refs whose every order the batch locked (the payments' by ref) -> those orders' ids.
    refs: dict[str, list[int]] = field(default_factory=dict)
    steps: list[Step] = field(default_factory=list)
    flushing: bool = False  # its flush is deferred to the end of the batch already

    @classmethod
    async def read(cls, conn: asyncpg.Connection, order_ids: Sequence[int],
                   refs: Collection[str] = ()) -> LockedOrders:
        """The locked orders, their invoices and waiting payments, in one statement. `refs`:
        those whose every order was locked (by ref, in the same statement as the others)."""
        if not order_ids:
            return cls({}, {}, {ref: [] for ref in refs})
        # `waiting_for IS NOT NULL` as written: the partial indexes' predicate (0015).
        rows = await conn.fetch(
            "SELECT " + ", ".join(f"o.{c} AS o__{c}" for c in _ORDER) + ","
            " ARRAY(SELECT p.id FROM payments p WHERE p.waiting_for IS NOT NULL"
            "  AND (p.order_ref = o.order_ref OR p.requested_invoice_id = i.id)"
            "  ORDER BY p.id) AS o__waiting,"
            " ARRAY(SELECT p.waiting_for FROM payments p WHERE p.waiting_for IS NOT NULL"
            "  AND (p.order_ref = o.order_ref OR p.requested_invoice_id = i.id)"
            "  ORDER BY p.id) AS o__waiting_for, i.*"
            " FROM orders o LEFT JOIN invoices i ON i.order_id = o.id"
            " WHERE o.id = ANY(" + db.planned_once("$1", "bigint[]") + ")",  # a generic plan
            list(order_ids),
        )
        orders: dict[int, LockedOrder] = {}
        invoices: dict[int, int] = {}
        for row in rows:
            order = {c: row[f"o__{c}"] for c in _ORDER}
            invoice = None
            if row["id"] is not None:  # i.id
                invoice = {k: v for k, v in row.items() if not k.startswith("o__")}
                invoices[row["id"]] = order["id"]
            waiting = list(zip(row["o__waiting"], row["o__waiting_for"], strict=True))
            orders[order["id"]] = LockedOrder(order, invoice, waiting)
        by_ref: dict[str, list[int]] = {ref: [] for ref in refs}
        for order_id in sorted(orders):
            if (ref := orders[order_id].order["order_ref"]) in by_ref:
                by_ref[ref].append(order_id)
        return cls(orders, invoices, by_ref)

    # -- what the handlers read ----------------------------------------------------------------

    def order_state(self, order_id: int, waiting_for: Sequence[str]) -> dict[str, Any] | None:
        """As `Payments.apply_waiting`'s own statement returns it (the order, its invoice's
        status, the payments waiting for it as `waiting_for` says); None: read it."""
        locked = self.orders.get(order_id)
        if locked is None:
            return None
        return {
            **locked.order,
            "invoice_status": locked.invoice["status"] if locked.invoice else None,
            "waiting": [p for p, kind in locked.waiting if kind in waiting_for],
        }

    def invoice(self, invoice_id: int) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """As `payments._find_invoice` returns it for an invoice id (the invoice with its
        order's status and ref, and the order); None: read it."""
        return self._invoice_of(self.invoices.get(invoice_id, 0))

    def invoice_by_ref(self, order_ref: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """As `payments._find_invoice` returns it for a ref that one order has; None: read it
        (a ref the batch did not lock by, no order or two with it, its order's read dropped)."""
        order_ids = self.refs.get(order_ref)
        return self._invoice_of(order_ids[0]) if order_ids and len(order_ids) == 1 else None

    def _invoice_of(self, order_id: int) -> tuple[dict[str, Any], dict[str, Any]] | None:
        locked = self.orders.get(order_id)
        if locked is None or locked.invoice is None:
            return None
        order = locked.order
        return (
            {**locked.invoice, "order_status": order["status"], "order_ref": order["order_ref"]},
            dict(order),
        )

    # -- what the handlers changed -------------------------------------------------------------

    def paid(self, order_id: int) -> None:
        """A payment was applied to the order's invoice: read it again."""
        self.orders.pop(order_id, None)

    def payments_changed(self) -> None:
        """A payment now waits (left unapplied): any order's list may hold it."""
        self.orders.clear()

    # -- the reconcile steps -------------------------------------------------------------------

    async def run_steps(self, conn: asyncpg.Connection, order_id: int | None = None) -> None:
        """The steps queued (for the order, or all), now."""
        now = [s for s in self.steps if order_id is None or s[0] == order_id]
        self.steps = [s for s in self.steps if not (order_id is None or s[0] == order_id)]
        if now:
            await reconcile_many(conn, now)


def locked_orders(uow: UnitOfWork) -> LockedOrders | None:
    """The batch's reads, when the handler runs in a batch that made them."""
    return uow.loaded if isinstance(uow.loaded, LockedOrders) else None


async def reconcile_later(uow: UnitOfWork, order_id: int, state: OrderState) -> bool:
    """Queue an order's step (not ended) to run with the batch's others at its end: False if
    the handler is not in such a batch (it runs the step itself)."""
    batch = locked_orders(uow)
    if batch is None:
        return False
    batch.steps.append((order_id, state, uow.context.message_id))
    if not batch.flushing:
        # Carried by the first unit of work that queued a step, for the whole batch: right
        # because a batch commits or rolls back as one (shared/runtime/pipeline.py); a
        # savepoint per message would need each unit of work to carry its own steps.
        batch.flushing = True
        uow.defer(_run_steps, batch)
    return True


async def _run_steps(conn: asyncpg.Connection, batches: Sequence[LockedOrders]) -> None:
    # One item, or the same batch once per unit of work that queued a step first.
    for batch in {id(b): b for b in batches}.values():
        await batch.run_steps(conn)

