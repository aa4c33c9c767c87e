"""Background work gives way to the order pipeline of its process (shared/runtime/activity.py):
for the first seconds of a busy spell only, and only to the workers that do not give way."""

from __future__ import annotations

import asyncio
import contextvars

import pytest

from shared.runtime.activity import PIPELINE, give_way
from shared.runtime.batching import InFlight

pytestmark = pytest.mark.asyncio


async def _in(ctx: contextvars.Context, longest: float) -> asyncio.Task[bool]:
    return asyncio.get_running_loop().create_task(give_way(longest), context=ctx)


async def test_without_a_pipeline_nothing_waits() -> None:
    assert PIPELINE.get() is None
    assert await asyncio.wait_for(give_way(60), timeout=1) is True


async def test_waits_while_the_pipeline_has_messages_and_goes_once_it_has_none() -> None:
    process = InFlight()
    pipeline = InFlight(parent=process)
    ctx = contextvars.copy_context()
    ctx.run(PIPELINE.set, pipeline)
    pipeline.enter()
    waiting = await _in(ctx, 60)
    await asyncio.sleep(0.05)
    assert not waiting.done(), "a delivery pass went ahead while an order was in hand"
    pipeline.leave()
    assert await asyncio.wait_for(waiting, timeout=1) is True
    assert process.count == 0 and process.idle.is_set()


async def test_a_busy_spell_longer_than_the_limit_shares_the_process_again() -> None:
    pipeline = InFlight()
    ctx = contextvars.copy_context()
    ctx.run(PIPELINE.set, pipeline)
    pipeline.enter()
    held = await _in(ctx, 0.1)
    assert await asyncio.wait_for(held, timeout=2) is False  # held at most the limit
    # Later in the same spell nothing waits at all: the sender is never starved.
    again = await _in(ctx, 0.1)
    assert await asyncio.wait_for(again, timeout=0.05) is False
    # A new spell (the pipeline fell idle in between) is given way to again.
    pipeline.leave()
    pipeline.enter()
    fresh = await _in(ctx, 60)
    await asyncio.sleep(0.05)
    assert not fresh.done()
    pipeline.leave()
    assert await asyncio.wait_for(fresh, timeout=1) is True


async def test_counts_chain_to_the_process_which_a_stop_waits_for() -> None:
    process = InFlight()
    pipeline = InFlight(parent=process)
    orders = InFlight(parent=pipeline)
    hooks = InFlight(parent=process)  # a worker that gives way counts only into the process
    orders.enter()
    hooks.enter()
    hooks.enter()
    assert (pipeline.count, process.count) == (1, 3)
    orders.leave()
    assert pipeline.idle.is_set() and not process.idle.is_set()
    hooks.leave(2)
    assert process.idle.is_set()
