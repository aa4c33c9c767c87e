"""`ordermill console`: the operator console (console/), served by uvicorn."""

from __future__ import annotations

import asyncio
import signal

import typer

from shared import logs


def console(
    host: str = typer.Option(None, "--host", help="Address to listen on (CONSOLE_HOST, default"
                             " 127.0.0.1; 0.0.0.0 only behind a firewall or proxy)."),
    port: int = typer.Option(None, "--port", min=0, max=65535,
                             help="Port (CONSOLE_PORT, default 8080)."),
) -> None:
    """Serve the operator console: review, act on and follow orders in a browser."""
    from cli.main import UserError, run_async, settings
    from console.server import ConsoleServer

    s = settings()
    logs.configure(s.log_level, s.log_format)

    async def go() -> None:
        server = ConsoleServer(s, host=host, port=port)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, server.stop)
        try:
            await server.serve()
        except SystemExit as exc:
            raise UserError(str(exc.code) if isinstance(exc.code, str) else
                            "the console could not start (see the log above)") from None

    run_async(go())
