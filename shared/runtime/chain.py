"""A chain of middleware: each is called with the batch and the rest of the chain
(`call_next`); what it does before that call runs on the way in, what it does after (or in an
`except`) on the way out, in reverse order."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from shared.runtime.work import Batch

Next = Callable[[Batch], Awaitable[None]]


class Middleware:
    """One cross-cutting concern. The default passes the batch on unchanged."""

    async def __call__(self, batch: Batch, call_next: Next) -> None:
        await call_next(batch)


class Chain:
    """Middleware in order; the last one's `call_next` does nothing."""

    def __init__(self, middleware: Sequence[Middleware]) -> None:
        self.middleware = tuple(middleware)

    async def __call__(self, batch: Batch) -> None:
        await self._at(0, batch)

    async def _at(self, index: int, batch: Batch) -> None:
        if index == len(self.middleware):
            return
        await self.middleware[index](batch, lambda b: self._at(index + 1, b))

    def __repr__(self) -> str:
        return " > ".join(type(m).__name__ for m in self.middleware)
