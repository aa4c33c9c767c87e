"""What a worker serves: its routes (contract type, handler, who may send it) and its spec."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
from pydantic import BaseModel

from shared.contracts import OrderRejected, PlaceReply
from shared.metrics import StateGauge
from shared.parties import INTERNAL, Party
from shared.uow import UnitOfWork

Handler = Callable[[Any, UnitOfWork], Awaitable[None]]  # (message, uow)
# Work a handler needs done outside its transaction (a remote call), once per delivery.
Prepare = Callable[[Any, asyncpg.Pool], Awaitable[Any]]
# Reads a handler needs, done once for a transaction's messages (a batch under load), in it:
# one result per message, in their order (None: the handler reads for itself).
Load = Callable[[Sequence[Any], asyncpg.Connection], Awaitable[Sequence[Any]]]
# Which of a batch's messages need their handler now, from (routing key, message) pairs: one
# read for the whole batch, before any transaction (WorkerSpec.wanted). True: handle it.
Wanted = Callable[[Sequence[tuple[str, Any]], asyncpg.Connection], Awaitable[Sequence[bool]]]


@dataclass(frozen=True)
class Route:
    model: type[BaseModel]
    handler: Handler
    prepare: Prepare | None = None
    # Who may send it (shared/parties.py). Anyone else's message is dead-lettered with the
    # reason, unread, unless `handle_unauthorized`: the handler then sees
    # `uow.context.authorized` false and decides (a payment is kept, unapplied, never dropped).
    publishers: frozenset[Party] = INTERNAL
    handle_unauthorized: bool = False
    load: Load | None = None


def route(handler: Handler, *, prepare: Prepare | None = None, load: Load | None = None,
          publishers: frozenset[Party] = INTERNAL, handle_unauthorized: bool = False) -> Route:
    """A route whose contract is the type of the handler's first parameter, sent only by
    `publishers` (by default Ordermill's own services). Every handler takes (message, uow).

    `prepare(message, pool)` runs before the transaction, with no row lock or connection
    held, for work such as a remote API call; its result is `uow.prepared` in the handler.
    It runs once per delivery: a batch that falls back to one by one, or a transaction
    retried after a deadlock, reuses it.

    `load(messages, conn)` runs in the transaction, after the inbox and before the handlers,
    once for all the messages of the transaction whose route has that same `load` (a batch
    under load; not for a message alone), in the order their handlers run: reads each handler
    would otherwise make on its own, made in one statement. Its result for each message is
    `uow.loaded` (None: the handler reads for itself). It reads what was committed when its
    statement began (inside the transaction: anything committed before the transaction began
    is there), not what commits while the batch's handlers run, which a handler's own later
    statement would see (READ COMMITTED: a snapshot a statement); and it reads before any
    handler of the batch wrote: a message whose handler must see what an earlier one in the
    batch wrote (the same order, the same client) gets None. It runs again with each attempt
    of the transaction."""
    params = [p for p in inspect.signature(handler, eval_str=True).parameters.values()
              if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(params) != 2:
        raise TypeError(f"{handler!r}: a handler takes (message, uow); a prepared result is"
                        " uow.prepared")
    first = params[0]
    if not (isinstance(first.annotation, type) and issubclass(first.annotation, BaseModel)):
        raise TypeError(f"{handler!r}: first parameter must be typed with a contract model")
    return Route(first.annotation, handler, prepare, publishers, handle_unauthorized, load)


@dataclass
class WorkerSpec:
    """One place for a worker's queue, routes, prefetch and shutdown (arq's WorkerSettings)."""

    service: str
    routes: Mapping[str, Route]
    prefetch: int | None = None
    # How many transactions at once, and how many messages at most in one (under load).
    concurrency: int | None = None
    batch: int | None = None
    # How long a batch may wait to fill once its first message is in (seconds). For work off
    # the order's critical path (mail): a few ms of latency for fewer, larger transactions.
    linger: float = 0.0
    # When a message is rejected and names an order_ref, tell its publisher with this event
    # (a contract class of `order_ref` and `reason`: OrderRejected).
    rejection_event: type[OrderRejected] | None = None
    # The answer to a refused message that named a reply queue (`reply_to`) and an order_ref
    # (a contract class of `ok`, `order_ref` and `error`: PlaceReply).
    rejection_reply: type[PlaceReply] | None = None
    # Said when the worker runs in a process (Runtime.serve): a warning about its settings
    # (a key not set). Not when a supervisor only builds it to check who may publish: its
    # worker process says it, once.
    on_start: Sequence[Callable[[], None]] = ()
    on_stop: Sequence[Callable[[], Awaitable[None]]] = ()
    # Periodic jobs of this service (sweepers), run until the stop event is set.
    background: Sequence[Callable[[asyncpg.Pool, asyncio.Event], Awaitable[None]]] = ()
    # Its messages do not hold back background work that gives way to the pipeline
    # (shared/runtime/activity.py): the webhooks worker's own, set against its sender.
    gives_way: bool = False
    # Counts of its tables a process running this worker exports (shared/metrics.py), read
    # when /metrics is scraped (with METRICS_PORT): jobs by state, emails by state.
    gauges: Sequence[StateGauge] = ()
    # False for a worker whose writes are already idempotent by the message's id (the webhooks
    # worker: a delivery's webhook-id derives from the event's id, ON CONFLICT DO NOTHING):
    # no inbox row is written, so a batch whose handlers write nothing (no endpoint subscribed)
    # commits no write at all. A redelivery runs its handler again and writes nothing twice.
    inbox: bool = True
    # For a worker that acts on an event only when something asked for it (a webhook endpoint
    # subscribed to it, an alert rule about it): reads, once a batch and before its
    # transaction, which of the batch's messages need their handler now (in a statement of
    # its own, begun after every message of the batch was received: a subscription
    # committed before an event was published is always seen). The others are acked with no
    # transaction at all: with nothing subscribed, a batch costs that one read. A message
    # acked unhandled wrote nothing, so its redelivery writes nothing twice either.
    wanted: Wanted | None = None
