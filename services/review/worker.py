"""The review worker: operators' commands."""

from __future__ import annotations

from services.review.handlers import lock_orders, on_command, preparer
from shared.parties import OPERATORS
from shared.runtime import WorkerSpec, route
from shared.settings import Settings


def worker(settings: Settings) -> WorkerSpec:
    # Operators wait for the answer: small batches keep each reply prompt.
    return WorkerSpec(service="review", batch=4,
                      routes={"review.command": route(
                          on_command, prepare=preparer(settings.maxmind), publishers=OPERATORS,
                          load=lock_orders)})
