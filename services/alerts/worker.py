"""The alerts worker (`ordermill run alerts`, queue `<ns>.alerts`): the events that may need
a person (a new order, an order set to Fraud, a screening that could not complete, a setup
parked, a payment left unapplied) become staff alerts in the consuming unit of work, per the
rules loaded with `ordermill notify load`. Two background tasks: the sweep (orders waiting
for review too long, dead letters) and the Slack sender. It publishes nothing.

The factory takes the whole Settings and hands each part its own (settings.alerts)."""

from __future__ import annotations

from services.alerts.raising import Delivery
from services.alerts.sender import SlackSender
from services.alerts.store import RuleStore
from services.alerts.sweeper import Sweeper
from services.alerts.triggers import Triggers
from shared.metrics import ALERT_DELIVERIES_BY_STATE
from shared.runtime import Route, WorkerSpec, route
from shared.settings import Settings
from shared.topology import Names

# The routing keys the alerts queue is bound to (shared/topology.py SERVICE_BINDINGS).
KEYS = ("order.placed", "order.fraud", "order.screened", "service.failed", "domain.failed",
        "payment.unapplied")


def worker(settings: Settings) -> WorkerSpec:
    alerts = settings.alerts
    store = RuleStore()
    delivery = Delivery(console_url=alerts.console_url, mail_domain=alerts.mail_domain)
    triggers = Triggers(store, delivery)
    sweeper = Sweeper(store, delivery, amqp_url=alerts.broker.amqp_url,
                      names=Names(alerts.broker.namespace), every_seconds=alerts.sweep_seconds)
    sender = SlackSender(alerts.webhooks, settings.listen_url)
    routes: dict[str, Route] = {
        "order.placed": route(triggers.on_placed),
        "order.fraud": route(triggers.on_fraud),
        "order.screened": route(triggers.on_screened),
        "service.failed": route(triggers.on_service_failed),
        "domain.failed": route(triggers.on_domain_failed),
        "payment.unapplied": route(triggers.on_unapplied),
    }
    # Off the order's critical path: events wait up to 20 ms to share a transaction.
    # Only the events a rule in force could alert on (read once a batch, before its
    # transaction) get one: with no rule about them (most events) a batch is that one read.
    return WorkerSpec(service="alerts", routes=routes, linger=0.02, wanted=triggers.wanted,
                      background=(sweeper.run, sender.run), on_stop=(sender.close,),
                      gauges=(ALERT_DELIVERIES_BY_STATE,))
