"""The /metrics endpoint of a worker or the exporter, served on the process's own event loop
(aiohttp): before each answer the collectors that read a server (the database, the broker)
refresh, cached, in the loop that owns their pool and connection; no thread of its own."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from shared.errors import ConfigurationError

log = logging.getLogger("ordermill.metrics")

Refresh = Callable[[], Awaitable[None]]


class MetricsServer:
    """GET /metrics: the registries' metrics in Prometheus' text format. Anything else: 404."""

    def __init__(self, registries: Sequence[CollectorRegistry], *,
                 refresh: Sequence[Refresh] = ()) -> None:
        self.registries = list(registries)
        self.refresh = list(refresh)
        self.port: int | None = None
        self._runner: web.AppRunner | None = None

    async def render(self) -> bytes:
        for refresh in self.refresh:
            await refresh()
        return b"".join(generate_latest(registry) for registry in self.registries)

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=await self.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def start(self, host: str, port: int) -> int:
        """Listen on host:port (0: a free port); returns the port."""
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        server = site._server  # aiohttp keeps the bound sockets there
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else port
        log.info("metrics served", extra={"host": host, "port": self.port})
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


async def serve(registries: Sequence[CollectorRegistry], host: str, port: int, *,
                refresh: Sequence[Refresh] = ()) -> MetricsServer:
    """A started server on METRICS_HOST:METRICS_PORT, or one line saying why not (a port in
    use, an address not this machine's): a worker's or a supervisor's."""
    server = MetricsServer(registries, refresh=refresh)
    try:
        await server.start(host, port)
    except OSError as exc:
        raise ConfigurationError(f"cannot serve metrics on {host}:{port}"
                                 f" (METRICS_HOST, METRICS_PORT): {exc.strerror or exc}") from None
    return server
