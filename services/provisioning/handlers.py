"""Order events: each one applies the payments waiting for the order, then runs the
reconcile step for it."""

from __future__ import annotations

from dataclasses import dataclass

from services.provisioning.payments import Payments
from services.provisioning.reconcile import OrderState, reconcile, retry_parked
from shared.contracts import OrderEvent, OrderRetry, OrderSetPending
from shared.uow import UnitOfWork


@dataclass(frozen=True)
class OrderEvents:
    payments: Payments

    async def on_event(self, event: OrderEvent, uow: UnitOfWork) -> None:
        """order.screened, order.fraud, order.accepted, order.cancelled, order.pending."""
        reopened = uow.context.routing_key == OrderSetPending.routing_key
        state = await self.payments.apply_waiting(uow, event.order_id, reopened=reopened)
        await reconcile(uow.conn, event.order_id, caused_by=uow.context.message_id, state=state)

    async def on_retry(self, event: OrderRetry, uow: UnitOfWork) -> None:
        """order.retry: parked setups run again, and anything still missing is queued."""
        await retry_parked(uow.conn, event.order_id, caused_by=uow.context.message_id,
                           job_id=event.job_id)
        await self.on_event(event, uow)


async def reconcile_paid(uow: UnitOfWork, order_id: int, state: OrderState) -> None:
    """Called in the payment's transaction once its invoice is Paid, with the order's state
    as the payment read it under the order's lock (no second locking read)."""
    await reconcile(uow.conn, order_id, caused_by=uow.context.message_id, state=state)
