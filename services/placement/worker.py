"""The placement worker: its queue, routes and rejection event."""

from __future__ import annotations

from services.placement.handlers import place_order
from shared.runtime import WorkerSpec, route
from shared.settings import Settings


def worker(settings: Settings) -> WorkerSpec:
    return WorkerSpec(
        service="placement",
        routes={"order.place": route(place_order)},
        rejection_event="order.rejected",
    )
