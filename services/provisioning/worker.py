"""The provisioning worker: payments, the reconcile step per order, and the job runner."""

from __future__ import annotations

from services.provisioning.dead_payments import DeadPayments
from services.provisioning.handlers import OrderEvents, reconcile_paid
from services.provisioning.jobs import JobPolicy, JobRunner
from services.provisioning.payments import Payments
from services.provisioning.providers import Providers
from shared.parties import PAYERS, Party, Publishers
from shared.runtime import WorkerSpec, route
from shared.settings import Settings
from shared.topology import Names


def worker(settings: Settings) -> WorkerSpec:
    providers = Providers(settings)
    runner = JobRunner(providers, JobPolicy(
        max_attempts=settings.job_max_attempts, backoff_seconds=settings.job_backoff_seconds,
        lease_seconds=settings.job_lease_seconds, concurrency=settings.job_concurrency,
        lane_concurrency=settings.job_lane_concurrency,
        poll_seconds=settings.job_poll_seconds,
    ), settings.database_url)
    payments = Payments(on_paid=reconcile_paid)
    events = OrderEvents(payments)
    dead = DeadPayments(settings.amqp_url, Names(settings.namespace),
                        Publishers.from_settings(settings).users[Party.SERVICE],
                        every_seconds=settings.dead_payment_sweep_seconds)
    reconciling = route(events.on_event)
    return WorkerSpec(
        service="provisioning",
        routes={
            # From anyone else a payment is still kept (unapplied, flagged), never dropped.
            "payment.received": route(payments.on_payment, publishers=PAYERS,
                                      handle_unauthorized=True),
            "order.screened": reconciling,
            "order.fraud": reconciling,
            "order.accepted": reconciling,
            "order.cancelled": reconciling,
            "order.pending": reconciling,
            "order.retry": route(events.on_retry),
        },
        background=(runner.run, dead.run),
        on_stop=(providers.close,),
    )
