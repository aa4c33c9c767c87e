"""The fraud worker: its queue, routes, provider and sweeper.

The factory takes the whole Settings (it is what `ordermill run` and the registry have) and
hands each component only its part: the Screener `settings.fraud`, the provider
`settings.rules`, `settings.maxmind` or `settings.fraudlabspro`, the sweeper `settings.screening_sweep`."""

from __future__ import annotations

from services.fraud.handlers import Screener
from services.fraud.providers.base import FraudProvider
from services.fraud.providers.fraudlabspro import FraudLabsProProvider
from services.fraud.providers.maxmind import MaxMindProvider
from services.fraud.providers.rules import RulesProvider
from services.fraud.sweeper import QueuedOrderSweeper
from shared.runtime import WorkerSpec, route
from shared.settings import Settings


def make_provider(settings: Settings) -> FraudProvider:
    if settings.fraud.provider == "maxmind":
        return MaxMindProvider(settings.maxmind)
    if settings.fraud.provider == "fraudlabspro":
        return FraudLabsProProvider(settings.fraudlabspro)
    return RulesProvider(settings.rules)


def worker(settings: Settings) -> WorkerSpec:
    provider = make_provider(settings)
    screener = Screener(settings.fraud, provider)
    remote = provider.remote  # a local scorer needs no step outside the transaction
    sweeper = QueuedOrderSweeper(settings.screening_sweep)
    # The three routes share one load step: a batch's orders are locked and read together.
    load = screener.load_facts
    placed = route(screener.on_placed, prepare=screener.score_placed if remote else None,
                   load=load)
    return WorkerSpec(
        service="fraud",
        routes={
            "order.placed": placed,
            "fraud.redrive": placed,  # the sweeper's re-drive of an order left queued
            "order.rescreen": route(
                screener.on_rescreen, prepare=screener.score_rescreen if remote else None,
                load=load),
        },
        on_stop=(provider.close,),
        background=(sweeper.run,),
    )
