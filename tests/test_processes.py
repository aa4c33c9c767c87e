"""The real `ordermill run` process: killed mid-stream, stopped by SIGTERM, started before the broker."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit
from urllib.request import urlopen

import asyncpg
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import Harness, eventually, order_body
from shared.settings import Settings

ORDERMILL = str(Path(sys.executable).with_name("ordermill"))
pytestmark = pytest.mark.slow
# `ordermill run`'s workers in the three processes `auto` gives on two or more cores, named
# so that a one-core machine tests the same (services/layout.py); WORKER_PROCESSES=1 where a
# test is about one process's own behaviour.
THREE = "placement,fraud/provisioning,review/notify,webhooks,alerts"


def worker_env(settings: Settings, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "DATABASE_URL": settings.database_url, "AMQP_URL": settings.amqp_url,
        "ORDERMILL_NAMESPACE": settings.namespace, "LOG_LEVEL": "INFO",
        "RELAY_SWEEP_SECONDS": "0.5", "FRAUD_VELOCITY_MAX_ORDERS": "100000",
        # Who may publish what: as the test's settings say (closed by default).
        "STOREFRONT_USERS": ",".join(settings.storefront_users),
        "PAYMENT_PUBLISHERS": ",".join(settings.payment_publishers),
        "OPERATOR_USERS": ",".join(settings.operator_users),
        "WORKER_PROCESSES": THREE,
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
    process = await spawn(harness.settings, log, WORKER_PROCESSES="1")  # the workers' process itself
    try:
        await asyncio.gather(*(harness.publish("order.place", order_body(f"kill-{n:04d}"))
                               for n in range(total)))
        await eventually(lambda: _at_least(harness, "kill-", 30), timeout=60)
        process.kill()  # SIGKILL: no chance to finish anything
        await process.wait()
        before = await screened_count(harness, "kill-")
        assert before < total, "the kill came too late to test anything"
        process = await spawn(harness.settings, log, WORKER_PROCESSES="1")
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


async def _running(log: Path) -> bool:
    """Every worker consumes: the supervisor's line, or a lone process's own."""
    text = log.read_text() if log.exists() else ""
    if "worker process started" in text:
        return "all worker processes running" in text
    return "workers running" in text


def _children(process: asyncio.subprocess.Process) -> dict[str, psutil.Process]:
    """The supervisor's worker processes by their services ("placement,fraud")."""
    found = {}
    for child in psutil.Process(process.pid).children():
        cmdline = child.cmdline()
        found[",".join(cmdline[cmdline.index("1") + 1:])] = child
    return found


async def _gone(pids: list[int]) -> bool:
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return False
    return True


async def test_three_worker_processes_serve_one_metrics_one_heartbeat_and_stop_together(
    harness: Harness, tmp_path: Path,
) -> None:
    log, beat, port = tmp_path / "worker.log", tmp_path / "beat", _free_port()
    process = await spawn(harness.settings, log, METRICS_PORT=str(port),
                          HEARTBEAT_FILE=str(beat), HEARTBEAT_SECONDS="0.5")
    try:
        await eventually(lambda: _running(log), timeout=60)
        children = _children(process)
        assert sorted(children) == ["notify,webhooks,alerts", "placement,fraud",
                                    "provisioning,review"]
        # A setting's warning is said once, by the worker process that runs placement, not
        # again by the supervisor, which builds every worker only to check who may publish.
        assert log.read_text().count("EPP_CODE_KEY is not set") == 1
        await asyncio.gather(*(harness.publish("order.place", order_body(f"three-{n:02d}"))
                               for n in range(20)))
        await eventually(lambda: _at_least(harness, "three-", 20), timeout=60)
        await eventually(lambda: asyncio.sleep(0, beat.exists()), timeout=10)
        beats = sorted(tmp_path.glob("beat.*"))
        assert [p.name for p in beats] == ["beat.1", "beat.2", "beat.3"]
        # As old as the oldest process's beat: a check of its age means what it means for one.
        assert beat.stat().st_mtime <= min(p.stat().st_mtime for p in beats)
        text = await asyncio.to_thread(
            lambda: urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode())
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for f in text_string_to_metric_families(text) for s in f.samples}
        for group in children:
            assert samples[("ordermill_process_up", (("process", group),))] == 1
            assert ("process_resident_memory_bytes", (("process", group),)) in samples
        # Counted in the placement process, served by the supervisor.
        placed = ("ordermill_messages_acked_total",
                  (("queue", harness.names.queue("placement")), ("route", "order.place")))
        assert samples[placed] >= 20
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), timeout=45) == 0
        assert await _gone([c.pid for c in children.values()])
        assert not list(tmp_path.glob("beat*"))
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_a_worker_process_that_dies_stops_the_others_and_loses_no_order(
    harness: Harness, tmp_path: Path,
) -> None:
    log = tmp_path / "worker.log"
    process = await spawn(harness.settings, log)
    try:
        await eventually(lambda: _running(log), timeout=60)
        children = _children(process)
        await asyncio.gather(*(harness.publish("order.place", order_body(f"die-{n:03d}"))
                               for n in range(200)))
        await eventually(lambda: _at_least(harness, "die-", 10), timeout=60)
        children["placement,fraud"].kill()
        # The whole stops, non-zero, for its service manager to restart: a group gone would
        # leave its queues to grow unseen.
        assert await asyncio.wait_for(process.wait(), timeout=45) == 128 + signal.SIGKILL
        assert await _gone([c.pid for c in children.values()])
        assert "worker process ended by itself" in log.read_text()
        process = await spawn(harness.settings, log)
        await eventually(lambda: _at_least(harness, "die-", 200), timeout=120)
    finally:
        if process.returncode is None:
            process.terminate()
            await process.wait()
    assert await harness.pool.fetchval("SELECT count(*) FROM fraud_checks") == 200
    assert await harness.pool.fetchval(
        "SELECT count(*) FROM order_history WHERE action = 'placed'") == 200


async def test_the_worker_processes_stop_when_their_supervisor_is_killed(
    harness: Harness, tmp_path: Path,
) -> None:
    log = tmp_path / "worker.log"
    process = await spawn(harness.settings, log)
    try:
        await eventually(lambda: _running(log), timeout=60)
        pids = [c.pid for c in _children(process).values()]
        assert len(pids) == 3
    finally:
        process.kill()  # no chance to pass anything on: the kernel tells the children
        await process.wait()
    await eventually(lambda: _gone(pids), timeout=45)
    assert log.read_text().count('"stopped"') == 3  # each stopped cleanly, not killed


async def _outbox_empty(h: Harness) -> bool:
    return await h.pool.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL") == 0


async def _at_least(h: Harness, prefix: str, n: int) -> bool:
    return await screened_count(h, prefix) >= n


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_a_stop_signal_stops_cleanly_after_in_flight_work(
    harness: Harness, tmp_path: Path, stop_signal: signal.Signals,
) -> None:
    log = tmp_path / "worker.log"
    process = await spawn(harness.settings, log)
    await asyncio.gather(*(harness.publish("order.place", order_body(f"term-{n:03d}"))
                           for n in range(50)))
    await eventually(lambda: _at_least(harness, "term-", 5), timeout=60)
    process.send_signal(stop_signal)
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


class Proxy:
    """A TCP forwarder to a real server, to play a server still starting or restarting."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = _free_port()
        self.server: asyncio.base_events.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self.refusing = False

    async def start(self, delay: float = 0.0) -> None:
        await asyncio.sleep(delay)
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    def cut(self) -> int:
        """Drop every open connection, as a restart would; new ones are still accepted."""
        count = len(self.writers)
        for writer in list(self.writers):
            writer.transport.abort()
        self.writers.clear()
        return count

    def close(self) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()

    def down(self) -> None:
        """The server goes away: open connections drop, new ones are refused until up()."""
        self.refusing = True
        self.cut()

    def up(self) -> None:
        self.refusing = False

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        with contextlib.suppress(Exception):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.transport.abort()
        self.writers.discard(writer)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))


def through(url: str, proxy: Proxy) -> str:
    """The URL of the proxy's server, through the proxy."""
    return url.replace(f":{proxy.target_port}/", f":{proxy.port}/")


@contextlib.asynccontextmanager
async def worker_behind(harness: Harness, log: Path, port: int,
                        **extra: str) -> AsyncIterator[tuple[asyncio.subprocess.Process, Proxy]]:
    """A worker reaching PostgreSQL (5432) or RabbitMQ (5672) through a proxy the test can take
    down; stopped (killed if it will not stop) and the proxy closed afterwards."""
    proxy = Proxy(port)
    await proxy.start()
    s = harness.settings
    url = {5432: ("DATABASE_URL", s.database_url), 5672: ("AMQP_URL", s.amqp_url)}[port]
    process = await spawn(s, log, **{url[0]: through(url[1], proxy)}, **extra)
    try:
        yield process, proxy
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), timeout=45)
            except TimeoutError:
                process.kill()
                await process.wait()
        proxy.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_worker_waits_for_a_broker_that_is_still_starting(
    harness: Harness, tmp_path: Path,
) -> None:
    proxy = Proxy(5672)
    amqp = through(harness.settings.amqp_url, proxy)
    log = tmp_path / "worker.log"
    await harness.publish("order.place", order_body("late-broker"))
    process = await spawn(harness.settings, log, AMQP_URL=amqp)
    try:
        # The broker comes up only once the worker has found it down and is retrying (a
        # fixed delay raced the worker's own start on a loaded machine).
        for _ in range(600):
            if "Retrying" in log.read_text() or process.returncode is not None:
                break
            await asyncio.sleep(0.1)
        assert "Retrying" in log.read_text(), "the worker never tried the absent broker"
        assert process.returncode is None, "the worker gave up instead of waiting"
        await proxy.start()
        order = await harness.screened("late-broker", timeout=60)
        assert order["screening"] == "passed"
    finally:
        process.terminate()
        await process.wait()
        proxy.close()


async def test_worker_survives_broker_and_database_connections_dropping(
    harness: Harness, tmp_path: Path,
) -> None:
    mq, pg = Proxy(5672), Proxy(5432)
    await mq.start()
    await pg.start()
    s = harness.settings
    log = tmp_path / "worker.log"
    process = await spawn(
        s, log, AMQP_URL=through(s.amqp_url, mq),
        DATABASE_URL=through(s.database_url, pg))
    total = 200
    try:
        await asyncio.gather(*(harness.publish("order.place", order_body(f"drop-{n:03d}"))
                               for n in range(total)))
        await eventually(lambda: _at_least(harness, "drop-", 20), timeout=60)
        assert mq.cut() > 0  # the broker "restarts"
        await eventually(lambda: _at_least(harness, "drop-", 80), timeout=60)
        assert pg.cut() > 0  # PostgreSQL "restarts"
        await eventually(lambda: _at_least(harness, "drop-", total), timeout=90)
    finally:
        process.terminate()
        assert await asyncio.wait_for(process.wait(), timeout=45) == 0
        mq.close()
        pg.close()
    assert await harness.pool.fetchval("SELECT count(*) FROM fraud_checks") == total
    assert await harness.pool.fetchval(
        "SELECT count(*) FROM order_history WHERE action = 'placed'") == total


async def test_a_database_outage_holds_orders_and_refuses_none(
    harness: Harness, tmp_path: Path,
) -> None:
    store = await harness.listen("order.rejected")
    log = tmp_path / "worker.log"
    async with worker_behind(harness, log, 5432) as (process, pg):
        for n in range(20):
            await harness.publish("order.place", order_body(f"outage-{n:03d}"))
        await eventually(lambda: _at_least(harness, "outage-", 20), timeout=60)
        pg.down()  # PostgreSQL stops for longer than the in-process retries last
        for n in range(20, 60):
            await harness.publish("order.place", order_body(f"outage-{n:03d}"))
            await asyncio.sleep(0.1)
        await asyncio.sleep(3)
        pg.up()
        await eventually(lambda: _at_least(harness, "outage-", 60), timeout=90)
        process.terminate()
        assert await asyncio.wait_for(process.wait(), timeout=45) == 0
    text = log.read_text()
    assert "database not answering" in text and "database answering again" in text
    assert await harness.dead_letters("placement") == []
    assert await harness.dead_letters("fraud") == []
    assert store.bodies("order.rejected") == []
    assert await harness.pool.fetchval(
        "SELECT count(*) FROM fraud_checks f JOIN orders o ON o.id = f.order_id"
        " WHERE o.order_ref LIKE 'outage-%'") == 60


@pytest.mark.parametrize("query", ["", "&target_session_attrs=read-write"])
async def test_a_failover_onto_a_read_only_server_holds_orders_until_writes_return(
    harness: Harness, tmp_path: Path, query: str,
) -> None:
    """A failover that leaves the worker's address on a standby for a while: the server answers
    but takes no writes. Simulated with the database set read-only and the worker's sessions
    cut, as a failover cuts them; its new sessions are read-only until the test ends it. With
    `target_session_attrs`, asyncpg itself refuses the server (the README's advice)."""
    s = harness.settings
    database = urlsplit(s.database_url).path.lstrip("/")
    log = tmp_path / "worker.log"
    process = await spawn(
        s, log, DATABASE_URL=s.database_url + "?application_name=om-failover" + query)
    admin = await asyncpg.connect(s.database_url.replace(f"/{database}", "/postgres"))
    try:
        await eventually(lambda: _running(log), timeout=60)  # the failover meets running workers
        for n in range(10):
            await harness.publish("order.place", order_body(f"standby-{n:03d}"))
        await eventually(lambda: _at_least(harness, "standby-", 10), timeout=60)
        await admin.execute(f'ALTER DATABASE "{database}" SET default_transaction_read_only = on')
        await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                            " WHERE application_name = 'om-failover'")
        for n in range(10, 30):
            await harness.publish("order.place", order_body(f"standby-{n:03d}"))
        await asyncio.sleep(4)  # longer than the in-process retries last
        assert await screened_count(harness, "standby-") == 10
        await admin.execute(f'ALTER DATABASE "{database}" RESET default_transaction_read_only')
        await eventually(lambda: _at_least(harness, "standby-", 30), timeout=60)
    finally:
        await admin.execute(f'ALTER DATABASE "{database}" RESET default_transaction_read_only')
        await admin.close()
        process.terminate()
        assert await asyncio.wait_for(process.wait(), timeout=45) == 0
    text = log.read_text()
    assert "database not answering" in text
    assert "background task failed" not in text and "handler failed" not in text
    assert await harness.dead_letters("placement") == []
    assert await harness.dead_letters("fraud") == []
    assert await harness.pool.fetchval(
        "SELECT count(*) FROM fraud_checks f JOIN orders o ON o.id = f.order_id"
        " WHERE o.order_ref LIKE 'standby-%'") == 30


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


async def test_every_compose_worker_container_starts_healthy_and_stops_cleanly(
    harness: Harness, tmp_path: Path,
) -> None:
    """docker-compose.yml's worker containers, run here as their commands and environment
    say (the test's broker, database and namespace in place of compose's hosts): each is
    alive by its health check's file, then stops on SIGTERM with exit code 0."""
    from test_compose import environment, invocations, services, worker_containers

    own = {"AMQP_URL", "DATABASE_URL", "ORDERMILL_NAMESPACE"}
    running: dict[str, tuple[asyncio.subprocess.Process, Path]] = {}
    metrics_ports: dict[str, int] = {}
    try:
        for name in worker_containers():
            env = {k: v for k, v in environment(services()[name]).items() if v and k not in own}
            if "METRICS_PORT" in env:
                # Compose gives every container the same port in its own network; here they
                # share one host, so each serves its metrics on a port of its own.
                metrics_ports[name] = _free_port()
                env |= {"METRICS_HOST": "127.0.0.1", "METRICS_PORT": str(metrics_ports[name])}
            beat = tmp_path / f"{name}.alive"
            env |= {"HEARTBEAT_FILE": str(beat), "HEARTBEAT_SECONDS": "0.5"}
            (args,) = invocations(name)
            log = (tmp_path / f"{name}.log").open("ab")
            running[name] = (await asyncio.create_subprocess_exec(
                ORDERMILL, *args, env=worker_env(harness.settings, **env),
                stdout=log, stderr=log), beat)
        for name, (process, beat) in running.items():
            async def alive(name=name, process=process, beat=beat) -> bool:
                assert process.returncode is None, (tmp_path / f"{name}.log").read_text()[-2000:]
                return beat.exists()
            await eventually(alive, timeout=60)
        for name, port in metrics_ports.items():
            url = f"http://127.0.0.1:{port}/metrics"
            text = await asyncio.to_thread(lambda url=url: urlopen(url, timeout=10).read().decode())
            assert "ordermill_broker_connected 1.0" in text, f"{name}: {text[-500:]}"
    finally:
        for process, _ in running.values():
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
    for name, (process, beat) in running.items():
        assert await asyncio.wait_for(process.wait(), timeout=45) == 0, name
        assert not beat.exists(), f"{name} left its heartbeat behind: it would look alive"


async def test_a_worker_stopped_during_a_database_outage_stops_at_once_and_loses_nothing(
    harness: Harness, tmp_path: Path,
) -> None:
    s = harness.settings
    log = tmp_path / "worker.log"
    async with worker_behind(harness, log, 5432) as (process, pg):
        await eventually(lambda: _running(log), timeout=60)
        pg.down()
        await asyncio.gather(*(harness.publish("order.place", order_body(f"halt-{n:03d}"))
                               for n in range(60)))
        await eventually(lambda: _log_has(log, "database not answering"), timeout=60)
        process.send_signal(signal.SIGTERM)
        # Nothing waits for the database any more: no 30 s drain, no retries per message.
        assert await asyncio.wait_for(process.wait(), timeout=15) == 0
    assert "did not finish" not in log.read_text()
    assert await harness.dead_letters("placement") == []
    process = await spawn(s, log)  # the database is back: a new worker takes every order
    try:
        await eventually(lambda: _at_least(harness, "halt-", 60), timeout=60)
    finally:
        process.terminate()
        await process.wait()
    assert await harness.pool.fetchval(
        "SELECT count(*) FROM order_history WHERE action = 'placed'") == 60


async def test_the_heartbeat_stops_while_the_broker_is_away(
    harness: Harness, tmp_path: Path,
) -> None:
    beat = tmp_path / "alive"
    async with worker_behind(harness, tmp_path / "worker.log", 5672, HEARTBEAT_FILE=str(beat),
                             HEARTBEAT_SECONDS="0.2") as (_, mq):
        await eventually(lambda: _exists(beat), timeout=60)
        mq.down()
        await asyncio.sleep(1.5)
        stale = beat.stat().st_mtime_ns
        await asyncio.sleep(1.5)  # several beats: none written while reconnecting
        assert beat.stat().st_mtime_ns == stale
        mq.up()
        await eventually(lambda: _newer(beat, stale), timeout=60)


async def _log_has(log: Path, text: str) -> bool:
    return log.exists() and text in log.read_text()


async def _exists(path: Path) -> bool:
    return path.exists()


async def _newer(path: Path, than: int) -> bool:
    return path.stat().st_mtime_ns > than


async def test_a_broker_lost_while_the_worker_starts_is_waited_for(
    harness: Harness, tmp_path: Path,
) -> None:
    log = tmp_path / "worker.log"
    async with worker_behind(harness, log, 5672) as (process, mq):
        await eventually(lambda: _log_has(log, "starting"), timeout=60, interval=0.005)
        mq.down()  # mid-start: declaring the topology or setting up its consumers
        await asyncio.sleep(2)
        mq.up()
        await harness.publish("order.place", order_body("restart-at-start"))
        assert (await harness.screened("restart-at-start", timeout=60))["screening"] == "passed"
        assert process.returncode is None


async def test_a_worker_stops_on_sigterm_while_still_waiting_for_the_broker(
    harness: Harness, tmp_path: Path,
) -> None:
    log = tmp_path / "worker.log"
    proxy = Proxy(5672)  # never started: the broker is not there yet
    process = await spawn(harness.settings, log,
                          AMQP_URL=through(harness.settings.amqp_url, proxy))
    try:
        await eventually(lambda: _log_has(log, "Retrying"), timeout=60)
        process.send_signal(signal.SIGTERM)
        # Not after its 30 start-up attempts: compose's grace period is 45 s.
        assert await asyncio.wait_for(process.wait(), timeout=15) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert "stopped before it had started" in log.read_text()


async def test_a_worker_stops_on_sigterm_while_the_broker_is_away(
    harness: Harness, tmp_path: Path,
) -> None:
    log = tmp_path / "worker.log"
    async with worker_behind(harness, log, 5672) as (process, mq):
        await eventually(lambda: _running(log), timeout=60)
        mq.down()
        await asyncio.sleep(1)
        process.send_signal(signal.SIGTERM)
        # No consumer to cancel on a connection that is gone: it does not wait for the broker.
        assert await asyncio.wait_for(process.wait(), timeout=15) == 0
