"""The console's publisher for tests without RabbitMQ: review commands go to the review worker
through the broker-free harness (shared/runtime/testing.py), as the console's user, and the
events they cause are fed on to the other workers of the flow, as the relay would."""

from __future__ import annotations

import uuid
from typing import Any

from cli.broker_ops import Replay
from console.publisher import Reply, Unavailable
from shared.runtime.testing import InMemoryFlow

REPLY_QUEUE = "amq.gen-console-test"  # a server-named queue, as the review service requires


class FlowPublisher:
    def __init__(self, flow: InMemoryFlow, user: str) -> None:
        self.flow = flow
        self.user = user
        self.sent: list[dict[str, Any]] = []

    async def review(self, body: dict[str, Any], *, wait_seconds: float) -> Reply | None:
        return await self._ask("review.command", body, expiration=wait_seconds)

    async def place(self, body: dict[str, Any], *, wait_seconds: float) -> Reply | None:
        return await self._ask("order.place", body)

    async def _ask(self, key: str, body: dict[str, Any], **extra: Any) -> Reply | None:
        correlation = str(uuid.uuid4())
        self.sent.append(body)
        await self.flow.send(key, body, user_id=self.user, correlation_id=correlation,
                             reply_to=REPLY_QUEUE, **extra)
        await self.flow.run()
        return next((r.body for r in self.flow.replies if r.correlation_id == correlation), None)

    async def dead_letters(self, limit: int) -> list[dict[str, Any]] | None:
        return None  # no broker here: the page says it cannot ask

    async def replay(self, queue: str, message_id: str) -> Replay:
        raise Unavailable("the console has no broker connection")

    async def queue_depths(self) -> list[dict[str, Any]] | None:
        return None  # no broker here: the dashboard says it cannot ask

    async def close(self) -> None:
        pass
