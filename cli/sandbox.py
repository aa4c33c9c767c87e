"""`ordermill sandbox`: local WHM API 1 and EPP servers for the demo (sandbox/), never for production.

Runs both until Ctrl-C (or SIGTERM) and prints what points Ordermill at them: the settings
(also written to STATE_DIR/env, with the logins, readable by its owner only) and the
catalog's [[servers]] entry. SIGUSR1 "fixes" the sandbox: deliberate failures stop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

import typer

from sandbox import BANNER
from sandbox.failures import MARKER
from sandbox.pair import WHM_TOKEN_ENV, ListenError, SandboxPair
from shared import logs

sandbox_app = typer.Typer(help="Local WHM and EPP sandboxes for the demo (never for production).")

# Out of the way of WHM's (2086/2087) and EPP's (700) own ports, so a real one is never taken.
DEFAULT_WHM_PORT = 12086
DEFAULT_EPP_PORT = 10700
SECRET_SETTINGS = (WHM_TOKEN_ENV, "EPP_PASSWORD")


class SandboxError(Exception):
    """Printed as one line (exit code 1)."""


@sandbox_app.callback(invoke_without_command=True)
def sandbox(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    whm_port: int = typer.Option(DEFAULT_WHM_PORT, "--whm-port", min=0, max=65535,
                                 help="WHM API 1 (plain HTTP) port; 0: any free port."),
    epp_port: int = typer.Option(DEFAULT_EPP_PORT, "--epp-port", min=0, max=65535,
                                 help="EPP (TLS) port; 0: any free port."),
    fail_rate: float = typer.Option(
        0.0, "--fail-rate", min=0.0, max=1.0,
        help=f"Share of account domains and domain names (chosen by a hash of the name; names "
             f"containing {MARKER!r} always) whose create fails on purpose."),
    fail_times: int = typer.Option(
        1, "--fail-times", min=0,
        help="How many creates of a chosen name fail before one succeeds; 0: until SIGUSR1."),
    state_dir: Path = typer.Option(Path(".ordermill-sandbox"), "--state-dir", file_okay=False,
                                   help="Keeps the CA, the logins and the env file."),
) -> None:
    """Run the WHM and EPP sandboxes until Ctrl-C."""
    logs.configure(os.environ.get("LOG_LEVEL", "INFO"), os.environ.get("LOG_FORMAT", "text"))
    try:
        asyncio.run(_serve(state_dir, host=host, whm_port=whm_port, epp_port=epp_port,
                           fail_rate=fail_rate, fail_times=fail_times))
    except SandboxError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise typer.Exit(1) from None


async def _serve(state_dir: Path, *, host: str, whm_port: int, epp_port: int, fail_rate: float,
                 fail_times: int) -> None:
    try:
        pair = SandboxPair(state_dir, host=host, whm_port=whm_port, epp_port=epp_port,
                           fail_rate=fail_rate, fail_times=fail_times)
    except OSError as exc:
        raise SandboxError(f"cannot use state directory {state_dir}: {exc.strerror}") from None
    try:
        await pair.start()
    except ListenError as exc:
        hint = " (another sandbox? choose others with --whm-port/--epp-port)" if exc.in_use else ""
        raise SandboxError(f"{exc}{hint}") from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, pair.fix)
    try:
        _print_settings(pair, fail_rate, fail_times)
        await stop.wait()
    finally:
        await pair.stop()
        logging.getLogger("ordermill.sandbox").info("%s: stopped", BANNER)


def _print_settings(pair: SandboxPair, fail_rate: float, fail_times: int) -> None:
    settings = pair.settings()
    shown = {k: ("(in the env file)" if k in SECRET_SETTINGS else v) for k, v in settings.items()}
    lines = [
        f"{BANNER}.",
        f"WHM API 1: {pair.whm.url}  (user {pair.whm.username}; plain HTTP)",
        f"EPP:       {pair.client_host}:{pair.epp.port}  (TLS, certificate by the sandbox's CA "
        f"{pair.ca_file})",
        "Settings for the workers (all of them, logins too, in the env file):",
        f"  set -a; . {pair.env_file}; set +a",
        *(f"  {k}={v}" for k, v in shown.items()),
        "The catalog's server (catalog.sandbox.toml has it, for the default ports):",
        *(f"  {line}" for line in pair.catalog_server().splitlines()),
    ]
    if fail_rate > 0:
        cure = (f"fail until SIGUSR1 (kill -USR1 {os.getpid()})" if fail_times == 0
                else f"fail {fail_times} time(s), then succeed on retry")
        lines.append(f"Deliberate failures: about {fail_rate:.0%} of names (and any containing "
                     f"{MARKER!r}) {cure}.")
    lines.append("Ctrl-C stops it.")
    print("\n".join(lines), flush=True)
