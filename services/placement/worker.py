"""The placement worker: its queue, routes and rejection event."""

from __future__ import annotations

from services.placement.handlers import place_order
from shared.contracts import PlaceOrder
from shared.runtime import WorkerSpec, route
from shared.settings import Settings
from shared.uow import UnitOfWork


def worker(settings: Settings) -> WorkerSpec:
    operators = frozenset(settings.operator_users)

    async def place(cmd: PlaceOrder, uow: UnitOfWork) -> None:
        if not cmd.generate_invoice and operators and uow.context.user_id not in operators:
            # Design section 8: orders from storefronts always get an invoice; only an
            # operator (a broker-validated user in OPERATOR_USERS) may place one without.
            cmd = cmd.model_copy(update={"generate_invoice": True})
        await place_order(cmd, uow)

    return WorkerSpec(
        service="placement",
        routes={"order.place": route(place)},
        rejection_event="order.rejected",
    )
