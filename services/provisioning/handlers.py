"""Order events: each one applies the payments waiting for the order, then runs the
reconcile step for it.

In a batch (the routes' load step read its orders: batch.py), the step of an order not ended
waits for the end of the batch and runs with the others' (two statements for the batch); an
ended order's step, and an `order.retry`, first run the steps their order has waiting, so
each order's job changes keep the order of its messages."""

from __future__ import annotations

from dataclasses import dataclass

from services.provisioning.batch import locked_orders, reconcile_later
from services.provisioning.payments import Payments
from services.provisioning.reconcile import OrderState, lock_order_state, reconcile, retry_parked
from shared.contracts import OrderEvent, OrderRetry, OrderSetPending
from shared.states import ENDED
from shared.uow import UnitOfWork


@dataclass(frozen=True)
class OrderEvents:
    payments: Payments

    async def on_event(self, event: OrderEvent, uow: UnitOfWork) -> None:
        """order.screened, order.fraud, order.accepted, order.cancelled, order.pending."""
        reopened = uow.context.routing_key == OrderSetPending.routing_key
        state = await self.payments.apply_waiting(uow, event.order_id, reopened=reopened)
        await _reconcile(uow, event.order_id, state)

    async def on_retry(self, event: OrderRetry, uow: UnitOfWork) -> None:
        """order.retry: parked setups run again, and anything still missing is queued."""
        if (batch := locked_orders(uow)) is not None:
            await batch.run_steps(uow.conn, event.order_id)  # before its jobs change
        await retry_parked(uow.conn, event.order_id, caused_by=uow.context.message_id,
                           job_id=event.job_id)
        await self.on_event(event, uow)


async def reconcile_paid(uow: UnitOfWork, order_id: int, state: OrderState) -> None:
    """Called in the payment's transaction once its invoice is Paid, with the order's state
    as the payment read it under the order's lock (no second locking read)."""
    await _reconcile(uow, order_id, state)


async def _reconcile(uow: UnitOfWork, order_id: int, state: OrderState | None) -> None:
    batch = locked_orders(uow)
    if batch is not None:
        if state is None:  # payments were applied (or no such order): read it as it is now
            state = await lock_order_state(uow.conn, order_id)
            if state is None:
                return
        if state.status not in ENDED and await reconcile_later(uow, order_id, state):
            return
        await batch.run_steps(uow.conn, order_id)  # an ended order's: after those waiting
    await reconcile(uow.conn, order_id, caused_by=uow.context.message_id, state=state)
