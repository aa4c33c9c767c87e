"""A periodic sweep beside the runtime with a broker connection of its own, opened when first
needed (background tasks get only the pool): the dead-payment keeper and the alerts' sweep.
Every `every_seconds` until the stop, `once(pool)`; a transient failure is logged and tried
again at the next pass, never ending the task."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import asyncpg
from aio_pika.abc import AbstractRobustConnection

from shared import broker


class BrokerSweep:
    log: logging.Logger
    failed = "sweep failed; will try again"  # the log line of a pass that failed
    transient: tuple[type[BaseException], ...] = broker.TRANSIENT_BROKER_ERRORS

    def __init__(self, amqp_url: str, every_seconds: float) -> None:
        self.amqp_url, self.every_seconds = amqp_url, every_seconds
        self._connection: AbstractRobustConnection | None = None

    async def once(self, pool: asyncpg.Pool) -> int:
        raise NotImplementedError

    async def connection(self) -> AbstractRobustConnection:
        if self._connection is None:
            self._connection = await broker.connect(self.amqp_url, attempts=3)
        return self._connection

    async def run(self, pool: asyncpg.Pool, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.every_seconds)
                    return
                try:
                    await self.once(pool)
                except self.transient as exc:
                    self.log.warning(self.failed, extra={"error": f"{type(exc).__name__}: {exc}"})
        finally:
            await self.close()

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()
            self._connection = None
