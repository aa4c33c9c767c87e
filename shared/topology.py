"""Broker topology (docs/contract.md, section 3): names, queue arguments and declaration.

Everything is declared idempotently, by `ordermill migrate` and by every worker
at start, so a message published before the first worker runs is kept.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange
from aiormq.exceptions import ChannelPreconditionFailed

log = logging.getLogger("ordermill.topology")

# Which routing keys each service's work queue receives. The queue exists from
# `migrate` on, so orders published before the workers start wait there.
SERVICE_BINDINGS: dict[str, tuple[str, ...]] = {
    "placement": ("order.place",),
    # fraud.redrive: the screening sweeper's own, for an order left `queued` (not a second
    # order.placed, which storefronts bound to it would take for another order event).
    "fraud": ("order.placed", "order.rescreen", "fraud.redrive"),
    "provisioning": ("payment.received", "order.screened", "order.fraud",
                     "order.accepted", "order.cancelled", "order.pending", "order.retry"),
    "review": ("review.command",),
    "notify": ("email.send",),
    # Every event an integrator may subscribe to (services/webhooks/outbound.py EVENT_TYPES;
    # a test keeps the two equal).
    "webhooks": ("domain.failed", "domain.registered", "invoice.paid", "order.accepted",
                 "order.cancelled", "order.deleted", "order.fraud", "order.pending",
                 "order.placed", "order.rejected", "order.screened", "payment.unapplied",
                 "service.created", "service.failed", "service.terminated"),
    # The events a staff alert may be about (services/alerts/worker.py KEYS; the sweep
    # watches the rest: orders waiting for review, dead letters).
    "alerts": ("order.placed", "order.fraud", "order.screened", "service.failed",
               "domain.failed", "payment.unapplied"),
}


# The events and commands each service publishes (its RabbitMQ user may send only these:
# `ordermill broker users`). A test checks them against the keys the code emits.
SERVICE_EMITS: dict[str, tuple[str, ...]] = {
    "placement": ("order.placed", "order.rejected", "invoice.paid", "email.send"),
    "fraud": ("order.screened", "order.fraud", "fraud.redrive", "email.send"),
    "provisioning": ("invoice.paid", "payment.unapplied", "service.created",
                     "service.terminated", "service.failed", "domain.registered",
                     "domain.failed", "email.send"),
    "review": ("order.accepted", "order.cancelled", "order.pending", "order.deleted",
               "order.fraud", "order.retry", "order.rescreen", "email.send"),
    "notify": (),
    "webhooks": (),
    "alerts": (),
}


@dataclass(frozen=True)
class Names:
    namespace: str

    @property
    def exchange(self) -> str:
        return self.namespace

    @property
    def dead_letter_exchange(self) -> str:
        return f"{self.namespace}.dlx"

    def queue(self, service: str) -> str:
        return f"{self.namespace}.{service}"

    def dead_queue(self, service: str) -> str:
        return f"{self.queue(service)}.dead"

    def all_queues(self) -> list[str]:
        names: list[str] = []
        for service in SERVICE_BINDINGS:
            names += [self.queue(service), self.dead_queue(service)]
        return names

    def service_of(self, queue_name: str) -> str | None:
        for service in SERVICE_BINDINGS:
            if queue_name in (self.queue(service), self.dead_queue(service), service):
                return service
        return None


# How many replicas a quorum queue gets when first declared (QUEUE_REPLICAS); unset, RabbitMQ's
# default. Fixed at declaration: an existing queue keeps its members (see _declare_queue).
GROUP_SIZE = "x-quorum-initial-group-size"


def _replicas(replicas: int | None) -> dict[str, object]:
    return {GROUP_SIZE: replicas} if replicas else {}


def work_queue_arguments(names: Names, service: str, delivery_limit: int,
                         replicas: int | None = None) -> dict[str, object]:
    return {
        "x-queue-type": "quorum",
        **_replicas(replicas),
        # RabbitMQ 3.x has no default; a crash-caused redelivery counts too, so
        # the limit is high enough that only a poison message reaches it.
        "x-delivery-limit": delivery_limit,
        "x-dead-letter-exchange": names.dead_letter_exchange,
        "x-dead-letter-routing-key": names.queue(service),
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


async def declare_exchange(channel: AbstractChannel, names: Names) -> AbstractExchange:
    return await channel.declare_exchange(
        names.exchange, aio_pika.ExchangeType.TOPIC, durable=True
    )


# Dead-letter queues are quorum queues too. RabbitMQ 4.x gives every quorum queue a delivery
# limit of 20 unless told otherwise, and listing dead letters (`basic.get`, then returned)
# counts as a delivery: without a limit of their own, a dead letter looked at 20 times
# would be dropped. -1 (no limit) exists only from 4.0 on; on 3.x it drops at once.
DEAD_LETTER_DELIVERY_LIMIT = 1_000_000


def dead_queue_arguments(replicas: int | None = None) -> dict[str, object]:
    return {"x-queue-type": "quorum", "x-delivery-limit": DEAD_LETTER_DELIVERY_LIMIT,
            **_replicas(replicas)}


async def declare_topology(
    connection: AbstractConnection, names: Names, *, delivery_limit: int,
    services: Sequence[str] | None = None, replicas: int | None = None,
) -> None:
    """Declare exchanges, every work queue and its dead-letter queue; or, for a worker
    with a RabbitMQ user of its own (which may configure nothing else), its own queues.
    `replicas`: the quorum queues' initial group size (QUEUE_REPLICAS), for new queues."""
    channel = await connection.channel()
    try:
        exchange = await declare_exchange(channel, names)
        dlx = await channel.declare_exchange(
            names.dead_letter_exchange, aio_pika.ExchangeType.DIRECT, durable=True
        )
        for service, keys in SERVICE_BINDINGS.items():
            if services is not None and service not in services:
                continue
            await _declare_queue(connection, names.queue(service),
                                 work_queue_arguments(names, service, delivery_limit, replicas))
            queue = await channel.get_queue(names.queue(service), ensure=False)
            for key in keys:
                await queue.bind(exchange, routing_key=key)
            await _declare_dead_queue(connection, names.dead_queue(service), replicas)
            dead = await channel.get_queue(names.dead_queue(service), ensure=False)
            await dead.bind(dlx, routing_key=names.queue(service))
    finally:
        await channel.close()


async def _declare_queue(connection: AbstractConnection, name: str,
                         arguments: dict[str, object]) -> None:
    """On a channel of its own (a refusal closes it). A queue declared before QUEUE_REPLICAS was
    set (or with another value) refuses the group size: it is kept, with its members, and a
    warning says how to change them (`rabbitmq-queues grow`); its other arguments are then not
    compared. Any other refusal is raised."""
    channel = await connection.channel()
    try:
        await channel.declare_queue(name, durable=True, arguments=arguments)
    except ChannelPreconditionFailed as exc:
        if GROUP_SIZE not in str(exc):
            raise
        log.warning("quorum queue kept with the replicas it was declared with; add members"
                    " with `rabbitmq-queues grow NODE all` or `rabbitmq-queues add_member`",
                    extra={"queue": name, "error": str(exc)})
        # RabbitMQ compares the group size like any argument (a declaration without one
        # is refused by a queue that has one): the queue exists, it is taken as it is.
        retry = await connection.channel()
        try:
            await retry.declare_queue(name, passive=True)
        finally:
            await retry.close()
    finally:
        if not channel.is_closed:
            await channel.close()


async def _declare_dead_queue(connection: AbstractConnection, name: str,
                              replicas: int | None = None) -> None:
    """A queue an older release declared without its delivery limit refuses the new
    arguments. It is kept as it is."""
    try:
        await _declare_queue(connection, name, dead_queue_arguments(replicas))
    except ChannelPreconditionFailed as exc:
        log.warning("dead-letter queue kept with the arguments it was declared with; on"
                    " RabbitMQ 4.x recreate it (when empty) so its dead letters are never dropped"
                    " after 20 looks", extra={"queue": name, "error": str(exc)})


async def delete_topology(channel: AbstractChannel, names: Names) -> None:
    """Remove everything of a namespace (tests clean up their own)."""
    for queue_name in names.all_queues():
        await channel.queue_delete(queue_name)
    await channel.exchange_delete(names.dead_letter_exchange)
    await channel.exchange_delete(names.exchange)
