"""`ordermill run` with its workers in several processes (services/layout.py): the parent
starts one `ordermill run --processes 1 GROUP...` per group and stands for them all.

- Stopping: SIGTERM or SIGINT to the parent is passed to every child, each of which stops as
  a one-process run does (no new messages, in-flight work finished); the parent waits for
  all. A child is asked by the kernel to stop (SIGTERM, PR_SET_PDEATHSIG) if the parent dies
  without passing it on (kill -9): no worker is left running unsupervised.
- A child that ends on its own (a setting it refuses, a database it cannot migrate, a crash)
  stops the others, and the parent exits non-zero: a service manager restarts the whole,
  as it would restart a one-process run whose worker died. A group that is gone would
  otherwise leave its queues to grow unseen.
- Health: with HEARTBEAT_FILE set, each child beats its own file (`FILE.1`, `FILE.2`, ...) and
  the parent keeps FILE as old as the oldest of theirs: the container's check reads the same
  file with the same meaning, and fails as soon as any group could not work for as long.
- Metrics: with METRICS_PORT set, each child serves on a port of 127.0.0.1 it chose itself
  (and tells through its ready pipe), and the parent serves METRICS_HOST:METRICS_PORT,
  merging the children's (shared/metrics_merge.py).
- Logs: the children write to the parent's stdout and stderr; each line names its `group`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
from prometheus_client import REGISTRY, CollectorRegistry

from shared import metrics_server
from shared.metrics_merge import MergedCollector, Source, from_registry, parse
from shared.metrics_server import MetricsServer
from shared.settings_parts import SupervisorSettings

log = logging.getLogger("ordermill.supervisor")

PROCESS_ENV = "ORDERMILL_PROCESS"  # the child's label, for its log lines
READY_FD_ENV = "ORDERMILL_READY_FD"  # where the child writes once its workers consume
PR_SET_PDEATHSIG = 1
SCRAPE_SECONDS = 5.0  # a child's /metrics answer, at most


@dataclass
class Child:
    """One worker process: its services, how to reach its beat and its metrics."""

    index: int
    group: list[str]
    heartbeat: Path | None = None
    metrics_port: int | None = None
    process: asyncio.subprocess.Process | None = None
    ready: bool = False
    metrics_wanted: bool = False
    metrics: Source = field(init=False)

    def __post_init__(self) -> None:
        self.metrics = Source(self.label, [], up=False)

    @property
    def label(self) -> str:
        return ",".join(self.group)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None


def _die_with_parent(parent: int) -> Callable[[], None] | None:
    """Run in the child before exec: SIGTERM when the parent dies (Linux only; elsewhere the
    children outlive a supervisor killed outright). libc is loaded here, in the parent: the
    child only calls into it (loading a library between fork and exec may deadlock)."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def setup() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the call
            os.kill(os.getpid(), signal.SIGTERM)

    return setup


def child_command(group: Sequence[str]) -> list[str]:
    """The child: this Python, `ordermill run` as one process, the group's services."""
    return [sys.executable, "-m", "cli.main", "run", "--processes", "1", *group]


class Supervisor:
    def __init__(self, settings: SupervisorSettings, groups: Sequence[Sequence[str]], *,
                 command: Callable[[Sequence[str]], list[str]] = child_command) -> None:
        self.settings = settings
        self.command = command
        beat = Path(settings.heartbeat_file) if settings.heartbeat_file else None
        self.heartbeat = beat
        self.children = [
            Child(i, list(group),
                  heartbeat=beat.with_name(f"{beat.name}.{i}") if beat else None,
                  metrics_wanted=settings.metrics.port is not None)
            for i, group in enumerate(groups, start=1)]
        self._stop = asyncio.Event()
        self.metrics_server: MetricsServer | None = None

    def stop(self) -> None:
        self._stop.set()

    def _env(self, child: Child, ready_fd: int) -> dict[str, str]:
        env = dict(os.environ)
        env["WORKER_PROCESSES"] = "1"
        env[PROCESS_ENV] = child.label
        env[READY_FD_ENV] = str(ready_fd)
        if child.heartbeat is not None:
            env["HEARTBEAT_FILE"] = str(child.heartbeat)
        if child.metrics_wanted:  # any free port, told through the ready pipe
            env["METRICS_HOST"] = "127.0.0.1"
            env["METRICS_PORT"] = "0"
        return env

    async def serve(self) -> int:
        """Run the children until stopped or one ends; the exit code for the parent."""
        await self._serve_metrics()
        for child in self.children:  # a beat left by an earlier run killed outright is no beat
            if child.heartbeat is not None:
                with contextlib.suppress(OSError):
                    child.heartbeat.unlink(missing_ok=True)
        ended: asyncio.Task[Child] | None = None
        helpers: list[asyncio.Task[None]] = []
        code = 0
        try:
            for child in self.children:
                if self._stop.is_set():
                    break
                await self._start(child)
            if not any(child.process for child in self.children):
                return 0  # stopped before any started
            if self.heartbeat is not None:
                helpers.append(asyncio.create_task(self._beat(self.heartbeat)))
            ended = asyncio.create_task(self._first_ended())
            stopped = asyncio.create_task(self._stop.wait())
            await asyncio.wait([ended, stopped], return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            if ended.done() and not self._stop.is_set():  # not asked: Ctrl-C reaches all at once
                child = ended.result()
                assert child.process is not None
                log.error("worker process ended by itself: stopping the others", extra={
                    "group": child.label, "exit_code": child.process.returncode})
                code = _exit_code(child.process.returncode) or 1  # ended, not asked: never 0
        finally:
            codes = await self._stop_children()
            if ended is not None:
                ended.cancel()
            for task in helpers:
                task.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            if self.metrics_server is not None:
                await self.metrics_server.stop()
            if self.heartbeat is not None:
                with contextlib.suppress(OSError):
                    self.heartbeat.unlink(missing_ok=True)
        return code or next((c for c in codes if c), 0)

    async def _start(self, child: Child) -> None:
        """Start the child with a pipe it writes to once consuming: "all running" is said
        when every child did (a test, an operator reading the log, knows the whole is up)."""
        read_fd, write_fd = os.pipe()
        try:
            child.process = await asyncio.create_subprocess_exec(
                *self.command(child.group), env=self._env(child, write_fd), pass_fds=(write_fd,),
                preexec_fn=_die_with_parent(os.getpid()))
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        log.info("worker process started", extra={"group": child.label, "pid": child.process.pid})
        loop = asyncio.get_running_loop()

        def readable() -> None:
            loop.remove_reader(read_fd)
            try:
                got = os.read(read_fd, 64)
            finally:
                os.close(read_fd)
            if not got:  # it ended before it was running
                return
            port = got.decode("ascii", "replace").strip()
            child.metrics_port = int(port) if port.isdigit() and int(port) else None
            child.ready = True
            if all(c.ready for c in self.children):
                log.info("all worker processes running",
                         extra={"groups": [c.label for c in self.children]})

        loop.add_reader(read_fd, readable)

    async def _first_ended(self) -> Child:
        waits = {asyncio.ensure_future(c.process.wait()): c for c in self.children if c.process}
        done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        return waits[next(iter(done))]

    async def _stop_children(self) -> list[int]:
        """SIGTERM to every running child, then wait for each: its in-flight work finishes."""
        for child in self.children:
            if child.running:
                assert child.process is not None
                with contextlib.suppress(ProcessLookupError):
                    child.process.send_signal(signal.SIGTERM)
        codes = []
        for child in self.children:
            if child.process is not None:
                returncode = await child.process.wait()
                # Ended by the very signal it was sent (it was still starting, before its
                # handlers): a clean stop, nothing was in flight.
                codes.append(0 if -returncode in (signal.SIGTERM, signal.SIGINT)
                             else _exit_code(returncode))
        return codes

    # -- health ---------------------------------------------------------------------------

    async def _beat(self, path: Path) -> None:
        """Keep `path` as old as the oldest child's beat, once every child has beaten (a
        check of its age then means what it means for one process)."""
        every = self.settings.heartbeat_seconds
        while True:
            oldest = self._oldest_beat()
            if oldest is not None:
                try:
                    await asyncio.to_thread(_write_beat, path, oldest)
                except OSError as exc:
                    log.warning("heartbeat not written", extra={"path": str(path), "error": str(exc)})
            await asyncio.sleep(min(every, 1.0))

    def _oldest_beat(self) -> float | None:
        times = []
        for child in self.children:
            if not child.running or child.heartbeat is None:
                return None
            try:
                times.append(child.heartbeat.stat().st_mtime)
            except OSError:
                return None
        return min(times) if times else None

    # -- metrics --------------------------------------------------------------------------

    async def _serve_metrics(self) -> None:
        part = self.settings.metrics
        if part.port is None:
            return
        registry = CollectorRegistry(auto_describe=False)
        registry.register(MergedCollector(self._sources))
        self.metrics_server = await metrics_server.serve(
            [registry], part.host, part.port, refresh=[self._scrape])

    def _sources(self) -> list[Source]:
        own = Source("supervisor", from_registry(REGISTRY), up=True)
        return [own, *(child.metrics for child in self.children)]

    async def _scrape(self) -> None:
        timeout = aiohttp.ClientTimeout(total=SCRAPE_SECONDS)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            await asyncio.gather(*(self._scrape_one(session, c) for c in self.children))

    async def _scrape_one(self, session: aiohttp.ClientSession, child: Child) -> None:
        """The child's metrics; when it does not answer, the last it gave, marked not up."""
        if child.metrics_port is None:  # not running yet (its port comes with its ready word)
            child.metrics = Source(child.label, child.metrics.families, up=False)
            return
        try:
            async with session.get(f"http://127.0.0.1:{child.metrics_port}/metrics") as response:
                response.raise_for_status()
                text = await response.text()
            child.metrics = Source(child.label, parse(text), up=True)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            child.metrics = Source(child.label, child.metrics.families, up=False)
            log.debug("worker process metrics not read", extra={
                "group": child.label, "error": f"{type(exc).__name__}: {exc}"})


def _write_beat(path: Path, at: float) -> None:
    path.write_text(datetime.fromtimestamp(at, UTC).isoformat(timespec="seconds") + "\n")
    os.utime(path, (at, at))


def _exit_code(returncode: int) -> int:
    """A child's exit status as a shell gives it (killed by signal N: 128 + N)."""
    return 128 - returncode if returncode < 0 else returncode


def ready_pipe(metrics_port: Callable[[], int | None]) -> asyncio.Event | None:
    """In a worker process a supervisor started: an event that, once set (the runtime's
    workers consume), tells the supervisor through its pipe, with the port its /metrics
    took (0: none). Elsewhere None."""
    fd = os.environ.pop(READY_FD_ENV, None)
    if fd is None or not fd.isdigit():
        return None
    ready = asyncio.Event()

    async def tell() -> None:
        try:
            await ready.wait()
            with contextlib.suppress(OSError):
                os.write(int(fd), f"{metrics_port() or 0}\n".encode())
        finally:
            with contextlib.suppress(OSError):
                os.close(int(fd))

    _TELLING.add(task := asyncio.get_running_loop().create_task(tell()))
    task.add_done_callback(_TELLING.discard)
    return ready


_TELLING: set[asyncio.Task[None]] = set()
