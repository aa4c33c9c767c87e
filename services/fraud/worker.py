"""The fraud worker: its queue, routes, provider and sweeper."""

from __future__ import annotations

from services.fraud.handlers import Screener
from services.fraud.providers.base import FraudProvider
from services.fraud.providers.maxmind import MaxMindProvider
from services.fraud.providers.rules import RulesProvider
from services.fraud.sweeper import QueuedOrderSweeper
from shared.runtime import WorkerSpec, route
from shared.settings import Settings


def make_provider(settings: Settings) -> FraudProvider:
    if settings.fraud_provider == "maxmind":
        return MaxMindProvider(settings)
    return RulesProvider(settings)


def worker(settings: Settings) -> WorkerSpec:
    provider = make_provider(settings)
    screener = Screener(settings, provider)
    remote = provider.remote  # a local scorer needs no step outside the transaction
    sweeper = QueuedOrderSweeper(
        stuck_seconds=settings.screening_stuck_seconds,
        max_redrives=settings.screening_max_redrives,
        every_seconds=max(5.0, settings.screening_stuck_seconds / 4),
    )
    placed = route(screener.on_placed, prepare=screener.score_placed if remote else None)
    return WorkerSpec(
        service="fraud",
        routes={
            "order.placed": placed,
            "fraud.redrive": placed,  # the sweeper's re-drive of an order left queued
            "order.rescreen": route(
                screener.on_rescreen, prepare=screener.score_rescreen if remote else None),
        },
        on_stop=(provider.close,),
        background=(sweeper.run,),
    )
