"""Order events: each one runs the reconcile step for its order."""

from __future__ import annotations

from services.provisioning.reconcile import reconcile, retry_parked
from shared.contracts import OrderEvent
from shared.uow import UnitOfWork


async def on_order_event(event: OrderEvent, uow: UnitOfWork) -> None:
    """order.screened, order.fraud, order.accepted, order.cancelled, order.pending."""
    await reconcile(uow.conn, event.order_id)


async def on_retry(event: OrderEvent, uow: UnitOfWork) -> None:
    """order.retry: parked setups run again, and anything still missing is queued."""
    await retry_parked(uow.conn, event.order_id)
    await reconcile(uow.conn, event.order_id)


async def reconcile_paid(uow: UnitOfWork, order_id: int) -> None:
    """Called in the payment's transaction once its invoice is Paid."""
    await reconcile(uow.conn, order_id)
