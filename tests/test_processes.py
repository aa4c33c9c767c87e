"""The real `ordermill run` process: killed mid-stream, stopped by SIGTERM, started before the broker."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path

import pytest

from conftest import Harness, eventually, order_body
from shared.settings import Settings

ORDERMILL = str(Path(sys.executable).with_name("ordermill"))
pytestmark = pytest.mark.slow


def worker_env(settings: Settings, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "DATABASE_URL": settings.database_url, "AMQP_URL": settings.amqp_url,
        "ORDERMILL_NAMESPACE": settings.namespace, "LOG_LEVEL": "INFO",
        "RELAY_SWEEP_SECONDS": "0.5", "FRAUD_VELOCITY_MAX_ORDERS": "100000",
    })
    env.update(extra)
    return env


async def spawn(settings: Settings, log: Path, **extra: str) -> asyncio.subprocess.Process:
    handle = log.open("ab")
    return await asyncio.create_subprocess_exec(
        ORDERMILL, "run", env=worker_env(settings, **extra), stdout=handle, stderr=handle)


async def screened_count(h: Harness, prefix: str) -> int:
    return await h.pool.fetchval(
        "SELECT count(*) FROM orders WHERE order_ref LIKE $1 AND screening <> 'queued'",
        prefix + "%")


async def test_worker_killed_mid_stream_then_restarted_screens_every_order_once(
    harness: Harness, tmp_path: Path,
) -> None:
    total = 300
    log = tmp_path / "worker.log"
    process = await spawn(harness.settings, log)
    try:
        await asyncio.gather(*(harness.publish("order.place", order_body(f"kill-{n:04d}"))
                               for n in range(total)))
        await eventually(lambda: _at_least(harness, "kill-", 30), timeout=60)
        process.kill()  # SIGKILL: no chance to finish anything
        await process.wait()
        before = await screened_count(harness, "kill-")
        assert before < total, "the kill came too late to test anything"
        process = await spawn(harness.settings, log)
        await eventually(lambda: _at_least(harness, "kill-", total), timeout=120)
        await eventually(lambda: _outbox_empty(harness), timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        await process.wait()
    assert await harness.pool.fetchval(
        "SELECT count(*) FROM orders WHERE order_ref LIKE 'kill-%'") == total
    # Exactly once: one fraud check and one 'placed' history row per order.
    assert await harness.pool.fetchval(
        "SELECT count(*) FROM (SELECT order_id FROM fraud_checks GROUP BY order_id"
        " HAVING count(*) > 1) x") == 0
    assert await harness.pool.fetchval("SELECT count(*) FROM fraud_checks") == total
    assert await harness.pool.fetchval(
        "SELECT count(*) FROM order_history WHERE action = 'placed'") == total


async def _outbox_empty(h: Harness) -> bool:
    return await h.pool.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL") == 0


async def _at_least(h: Harness, prefix: str, n: int) -> bool:
    return await screened_count(h, prefix) >= n


async def test_sigterm_stops_cleanly_after_in_flight_work(
    harness: Harness, tmp_path: Path,
) -> None:
    log = tmp_path / "worker.log"
    process = await spawn(harness.settings, log)
    await asyncio.gather(*(harness.publish("order.place", order_body(f"term-{n:03d}"))
                           for n in range(50)))
    await eventually(lambda: _at_least(harness, "term-", 5), timeout=60)
    process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(process.wait(), timeout=45) == 0
    text = log.read_text()
    assert "stopping: no new messages" in text
    assert '"stopped"' in text
    # Whatever was not handled is still in the queues, not lost: a new worker finishes it.
    process = await spawn(harness.settings, log)
    try:
        await eventually(lambda: _at_least(harness, "term-", 50), timeout=60)
    finally:
        process.terminate()
        await process.wait()


async def _proxy(listen_port: int, target_port: int, delay: float) -> asyncio.base_events.Server:
    """A TCP forwarder that starts listening only after `delay`: a broker still coming up."""
    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target_port)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    await asyncio.sleep(delay)
    return await asyncio.start_server(handle, "127.0.0.1", listen_port)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_worker_waits_for_a_broker_that_is_still_starting(
    harness: Harness, tmp_path: Path,
) -> None:
    port = _free_port()
    amqp = harness.settings.amqp_url.replace(":5672/", f":{port}/")
    log = tmp_path / "worker.log"
    await harness.publish("order.place", order_body("late-broker"))
    process = await spawn(harness.settings, log, AMQP_URL=amqp)
    server = None
    try:
        server = await _proxy(port, 5672, delay=2.0)
        order = await harness.screened("late-broker", timeout=60)
        assert order["screening"] == "passed"
    finally:
        process.terminate()
        await process.wait()
        if server is not None:
            server.close()
    assert "Retrying" in log.read_text() or "retry" in log.read_text().lower()


async def test_worker_gives_up_with_a_clear_error_when_the_broker_never_comes(
    settings: Settings, tmp_path: Path,
) -> None:
    port = _free_port()
    process = await asyncio.create_subprocess_exec(
        ORDERMILL, "run", env=worker_env(settings, AMQP_URL=f"amqp://guest:guest@127.0.0.1:{port}/",
                                         STARTUP_ATTEMPTS="2"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 1
    last = err.decode().strip().splitlines()[-1]
    assert last.startswith(f"error: cannot reach RabbitMQ at amqp://guest:***@127.0.0.1:{port}/: ")
    assert "Traceback" not in err.decode()
