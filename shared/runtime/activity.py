"""What this process's pipeline has in hand, for background work that should give way to it.

The webhook sender shares its process (all-in-one `ordermill run`) and its cores with the
order pipeline. A delivery is a notification with 24 hours of retries behind it; an order
is a customer waiting. So the sender, before each claim, waits while the process's workers
have messages in hand, for at most the first WEBHOOK_GIVE_WAY_SECONDS of a busy spell: it
is delayed under a burst and never starved under a pipeline that stays busy. The process
publishes its pipeline's in-flight count through a context variable: background tasks are
created in the process's context and see it; code outside a process (a test's sender, the
CLI) sees none and never waits."""

from __future__ import annotations

import asyncio
import contextlib
from contextvars import ContextVar

from shared.runtime.batching import InFlight

PIPELINE: ContextVar[InFlight | None] = ContextVar("ordermill_pipeline", default=None)


async def give_way(longest: float) -> bool:
    """Wait until this process's pipeline has no message in hand — for as long as its busy
    spell has lasted less than `longest` seconds. A burst shorter than that is served first;
    a pipeline busy for longer shares the process again, so work that gives way is delayed,
    never starved. True when the pipeline was idle (or there is none) by then."""
    pipeline = PIPELINE.get()
    if pipeline is None or pipeline.idle.is_set():
        return True
    left = pipeline.busy_since + longest - asyncio.get_running_loop().time()
    if left <= 0:
        return False
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(pipeline.idle.wait(), timeout=left)
        return True
    return False
