"""Metrics: every delivery counted and timed, outermost, around intake and work alike, so a
message refused at the door (not JSON, no route, a sender who may not) is counted with the
ones handled, and no handler knows of it (shared/metrics.py has the metrics).

On the way in: consumed. On the way out, from what the pipeline recorded on each delivery:
acked, dead-lettered (by the kind of reason, a closed set), requeued, retried in process;
the time from taking it to settling it. A route the worker does not declare is counted as
"other": a publisher choosing routing keys cannot grow the labels."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client.metrics import Counter, Histogram

from shared import metrics
from shared.errors import RejectKind
from shared.runtime.chain import Middleware, Next
from shared.runtime.work import Batch, Outcome, Work


@dataclass(frozen=True)
class _RouteMetrics:
    """A route's children, looked up once: the hot path does no label lookups."""

    consumed: Counter
    acked: Counter
    requeued: Counter
    retried: Counter
    duration: Histogram
    rejected: dict[RejectKind, Counter]

    @classmethod
    def of(cls, queue: str, route: str) -> _RouteMetrics:
        labels = (queue, route)
        return cls(metrics.MESSAGES_CONSUMED.labels(*labels), metrics.MESSAGES_ACKED.labels(*labels),
                   metrics.MESSAGES_REQUEUED.labels(*labels),
                   metrics.MESSAGES_RETRIED.labels(*labels),
                   metrics.HANDLER_DURATION.labels(*labels),
                   {kind: metrics.MESSAGES_REJECTED.labels(*labels, kind.value)
                    for kind in RejectKind})


class MessageMetrics(Middleware):
    def __init__(self, queue: str, routes: Iterable[str]) -> None:
        self.queue = queue
        self._routes = {route: _RouteMetrics.of(queue, route) for route in routes}
        self._other = _RouteMetrics.of(queue, metrics.OTHER_ROUTE)

    def _of(self, item: Work) -> _RouteMetrics:
        message = item.message
        key = item.key or message.routing_key or message.type or ""
        return self._routes.get(key, self._other) if isinstance(key, str) else self._other

    async def __call__(self, batch: Batch, call_next: Next) -> None:
        started = time.perf_counter()
        for item in batch.items:
            self._of(item).consumed.inc()
        try:
            await call_next(batch)
        finally:
            elapsed = time.perf_counter() - started
            for item in batch.items:
                route = self._of(item)
                if item.outcome is Outcome.ACKED:
                    route.acked.inc()
                elif item.outcome is Outcome.DEAD:
                    route.rejected[item.rejected_as or RejectKind.HANDLER_ERROR].inc()
                else:  # requeued, or left to the batcher, which requeues it
                    route.requeued.inc()
                if item.retries:
                    route.retried.inc(item.retries)
                route.duration.observe(elapsed)
