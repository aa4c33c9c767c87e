"""The provisioning worker: payments, the reconcile step per order, and the job runner.

The factory takes the whole Settings (what `ordermill run` and the registry have) and hands
each component its part: modules and registrars `settings.providers`, the job runner
`settings.jobs`, the dead-payment keeper `settings.dead_payments`."""

from __future__ import annotations

from services.provisioning.dead_payments import DeadPayments
from services.provisioning.handlers import OrderEvents, reconcile_paid
from services.provisioning.jobs import JobRunner
from services.provisioning.locks import load_orders
from services.provisioning.payments import Payments
from services.provisioning.providers import Providers
from shared.metrics import JOBS_BY_STATE
from shared.parties import PAYERS
from shared.runtime import WorkerSpec, route
from shared.settings import Settings


def worker(settings: Settings) -> WorkerSpec:
    providers = Providers(settings.providers)
    runner = JobRunner(providers, settings.jobs, settings.listen_url)
    payments = Payments(on_paid=reconcile_paid)
    events = OrderEvents(payments)
    dead = DeadPayments(settings.dead_payments)
    # Every route of the consumer's batches locks their orders first, together (locks.py).
    reconciling = route(events.on_event, load=load_orders)
    return WorkerSpec(
        service="provisioning",
        routes={
            # From anyone else a payment is still kept (unapplied, flagged), never dropped.
            "payment.received": route(payments.on_payment, publishers=PAYERS,
                                      handle_unauthorized=True, load=load_orders),
            "order.screened": reconciling,
            "order.fraud": reconciling,
            "order.accepted": reconciling,
            "order.cancelled": reconciling,
            "order.pending": reconciling,
            "order.retry": route(events.on_retry, load=load_orders),
        },
        background=(runner.run, dead.run),
        on_stop=(providers.close,),
        gauges=(JOBS_BY_STATE,),
    )
