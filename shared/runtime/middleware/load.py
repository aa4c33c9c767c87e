"""Load: the reads a route shares across its batch (`route(load=...)`), once for the messages
of the transaction the inbox let through, before their handlers; each handler finds its
message's result as `uow.loaded`. Routes with the same load step are read together (the fraud
worker's three routes); a route without one costs nothing here. A message alone with its load
step (a worker not under load) is not loaded: its handler's own read is the same statement,
without the step's bookkeeping.

Set again on every attempt of the transaction (a retry, a batch falling back to one by one),
so a handler never sees what a rolled-back transaction read."""

from __future__ import annotations

from collections.abc import Awaitable

from shared.runtime.chain import Middleware, Next
from shared.runtime.routes import Load as LoadStep
from shared.runtime.work import Batch, Work


class Load(Middleware):
    def __call__(self, batch: Batch, call_next: Next) -> Awaitable[None]:
        if len(batch.todo) < 2:  # alone: the handler reads for itself
            for item in batch.todo:
                item.loaded = None  # nothing a rolled-back batch read
            return call_next(batch)
        loading = [item for item in batch.todo if item.route and item.route.load]
        return self._loaded(loading, batch, call_next) if loading else call_next(batch)

    async def _loaded(self, loading: list[Work], batch: Batch, call_next: Next) -> None:
        assert batch.conn is not None
        steps: dict[LoadStep, list[Work]] = {}
        for item in loading:
            item.loaded = None
            assert item.route and item.route.load
            steps.setdefault(item.route.load, []).append(item)
        for load, items in steps.items():
            if len(items) < 2:
                continue
            results = await load([item.payload for item in items], batch.conn)
            for item, result in zip(items, results, strict=True):
                item.loaded = result
        await call_next(batch)
