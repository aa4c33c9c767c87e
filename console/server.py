"""Serving the console with uvicorn, alone (`ordermill console`) or beside workers in one
process (`ordermill run ... console`): either way the process's own signal handling stops it
(uvicorn's is switched off), so SIGTERM drains the workers and the console together."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator

import uvicorn

from console.app import build_app, settle_heap
from shared.settings import Settings

log = logging.getLogger("ordermill.console")


class _PlainMessages(logging.Filter):
    """uvicorn adds a copy of some messages with terminal colours (`color_message`): Ordermill's
    log formats would print it as an extra field."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.__dict__.pop("color_message", None)
        return True


logging.getLogger("uvicorn.error").addFilter(_PlainMessages())


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the caller's handlers stop it (stop())


class ConsoleServer:
    def __init__(self, settings: Settings, *, host: str | None = None,
                 port: int | None = None) -> None:
        part = settings.console
        self.settings = settings
        config = uvicorn.Config(
            build_app(settings), host=host or part.host,
            port=part.port if port is None else port, lifespan="on", log_config=None,
            access_log=False, server_header=False, date_header=False,
            # The client address is the socket's: X-Forwarded-For would let anyone pick the
            # address the sign-in limit counts. Behind a proxy, it counts the proxy.
            proxy_headers=False)
        self._server = _Server(config)
        settle_heap()  # after build_app: its compiled templates live as long as the process

    @property
    def address(self) -> str | None:
        """http://host:port once listening (the port the system chose, for port 0)."""
        if not self._server.started or not self._server.servers:
            return None
        host, port = self._server.servers[0].sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    async def serve(self, started: asyncio.Event | None = None) -> None:
        task = asyncio.create_task(self._server.serve())
        # uvicorn sets a flag, not an event, once it listens.
        while not self._server.started and not task.done():  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        if self._server.started:
            log.info("console listening", extra={"url": self.settings.console.url or self.address})
            if started is not None:
                started.set()
        await task
        if not self._server.started:
            raise SystemExit(f"the console could not start on {self._server.config.host}:"
                             f"{self._server.config.port} (see the log above)")

    def stop(self) -> None:
        self._server.should_exit = True
