"""A webhook receiver on 127.0.0.1 (an ephemeral port): records every request and answers as
the test scripts it (a status, a hang, a redirect, an endless body), 200 by default."""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Answer:
    status: int = 200
    body: bytes = b'{"ok":true}'
    hang: float = 0.0  # seconds before answering
    headers: dict[str, str] = field(default_factory=dict)
    endless: bool = False  # a body that never ends (chunked, 64 KiB at a time)


class Receiver:
    def __init__(self) -> None:
        self.received: list[Received] = []
        self.script: deque[Answer] = deque()
        self.default = Answer()
        self.sent_bytes = 0  # of endless bodies, before the client went away
        self.arrived = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.port = 0

    def then(self, *answers: Answer | int) -> Receiver:
        self.script.extend(a if isinstance(a, Answer) else Answer(a) for a in answers)
        return self

    def url(self, path: str = "/hook", host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def ids(self) -> list[str]:
        return [r.headers["webhook-id"] for r in self.received]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.received.append(Received(request.path, dict(request.headers), await request.read()))
        self.arrived.set()
        answer = self.script.popleft() if self.script else self.default
        if answer.hang:
            await asyncio.sleep(answer.hang)
        if answer.endless:
            response = web.StreamResponse(status=answer.status)
            await response.prepare(request)
            chunk = b"x" * 65_536
            try:
                for _ in range(100_000):  # 6.5 GB: far beyond any limit
                    await response.write(chunk)
                    self.sent_bytes += len(chunk)
            except (ConnectionResetError, RuntimeError, OSError):
                pass
            return response
        return web.Response(status=answer.status, body=answer.body, headers=answer.headers)

    async def __aenter__(self) -> Receiver:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert self._runner is not None
        await self._runner.cleanup()
