"""A chain of middleware: each is called with the batch and the rest of the chain
(`call_next`); what it does before that call runs on the way in, what it does after (or in an
`except`) on the way out, in reverse order.

The links are built once, with the chain: each delivery then costs one call per middleware,
not a lookup, a lambda and a coroutine of the chain's own per layer (bench/README.md, "Keep":
the chains run several times per message).

A middleware with nothing to do on the way out (a check, routing, parsing) may be a plain
method that returns `call_next(batch)` instead of awaiting it: the caller awaits the rest of
the chain directly. That is one coroutine fewer per such layer for each delivery, and one
frame fewer for every await below it to pass through each time a statement's answer wakes
the handler up (the work chain is nine layers deep around the handler)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

from shared.runtime.work import Batch

Next = Callable[[Batch], Awaitable[None]]


class Middleware:
    """One cross-cutting concern. The default passes the batch on unchanged."""

    def __call__(self, batch: Batch, call_next: Next) -> Awaitable[None]:
        return call_next(batch)


class _Done:
    """An awaitable that is already done (the end of every chain): awaiting it returns at
    once, with no coroutine made for it. It holds no state, so one serves every loop."""

    def __await__(self) -> Iterator[Any]:
        return iter(())


DONE: Awaitable[None] = _Done()


def _end(batch: Batch) -> Awaitable[None]:
    """After the last middleware: nothing."""
    return DONE


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
