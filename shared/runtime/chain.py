"""A chain of middleware: each is called with the batch and the rest of the chain
(`call_next`); what it does before that call runs on the way in, what it does after (or in an
`except`) on the way out, in reverse order.

The links are built once, with the chain: each delivery then costs one call per middleware,
not a lookup, a lambda and a coroutine of the chain's own per layer (bench/README.md, "Keep":
the chains run several times per message)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from shared.runtime.work import Batch

Next = Callable[[Batch], Awaitable[None]]


class Middleware:
    """One cross-cutting concern. The default passes the batch on unchanged."""

    async def __call__(self, batch: Batch, call_next: Next) -> None:
        await call_next(batch)


async def _end(batch: Batch) -> None:
    """After the last middleware: nothing."""


def _link(middleware: Middleware, call_next: Next) -> Next:
    def call(batch: Batch) -> Awaitable[None]:
        return middleware(batch, call_next)
    return call


class Chain:
    """Middleware in order; the last one's `call_next` does nothing."""

    def __init__(self, middleware: Sequence[Middleware]) -> None:
        self.middleware = tuple(middleware)
        first: Next = _end
        for layer in reversed(self.middleware):
            first = _link(layer, first)
        self._first = first

    def __call__(self, batch: Batch) -> Awaitable[None]:
        return self._first(batch)

    def __repr__(self) -> str:
        return " > ".join(type(m).__name__ for m in self.middleware)
