"""The webhooks worker: every event an integrator may subscribe to becomes, in the consuming
unit of work, one delivery per subscribed endpoint (outbound.py); the sender (sender.py), a
background task of this worker, delivers them. The handler defers its write: the events of
a batch are fanned out together, in one statement at the end of their transaction.

The factory takes the whole Settings and hands the sender `settings.webhooks`."""

from __future__ import annotations

from services.webhooks.outbound import EVENT_TYPES, Outbound, enqueue, subscribed
from services.webhooks.sender import WebhookSender
from shared.contracts import EVENTS, Event
from shared.metrics import WEBHOOK_DELIVERIES_BY_STATE
from shared.runtime import WorkerSpec
from shared.runtime.routes import Route
from shared.settings import Settings
from shared.uow import UnitOfWork


async def on_event(event: Event, uow: UnitOfWork) -> None:
    """The event's body as its contract class reads it (fields it does not know are left
    out: integrators get the documented body), under the event's id: a redelivery is skipped
    by the inbox, and a re-run writes the same webhook-ids (nothing twice)."""
    ctx = uow.context
    uow.defer(enqueue, Outbound(ctx.routing_key, event.payload(), ctx.message_id,
                                ctx.received_at))


def worker(settings: Settings) -> WorkerSpec:
    sender = WebhookSender(settings.webhooks, settings.listen_url)
    # A route per routing key, each parsing into the key's own contract class (route()
    # derives the model from a handler's annotation; one handler serves every class here).
    routes = {key: Route(EVENTS[key], on_event) for key in EVENT_TYPES}
    # Off the order's critical path: events wait up to 20 ms to share a transaction.
    # Its messages are not the pipeline its sender gives way to (gives_way).
    # No inbox: its one write is keyed by the webhook-id the event's id makes (a redelivery
    # writes nothing twice), so with no endpoint subscribed its transactions write nothing.
    # Only the events some endpoint subscribes to (read once a batch, before its transaction)
    # get one: with none subscribed (most providers) a batch is that one read.
    return WorkerSpec(service="webhooks", routes=routes, linger=0.02, gives_way=True, inbox=False,
                      wanted=subscribed,
                      background=(sender.run,), on_stop=(sender.close,),
                      gauges=(WEBHOOK_DELIVERIES_BY_STATE,))
