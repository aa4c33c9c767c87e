"""A RabbitMQ node and a PostgreSQL instance of the bench's own, beside the machine's, so that
bench/chaos.py can really restart them: the machine's servers on 5672 and 5432 are shared with
other people and are never stopped.

What a real restart does and a cut TCP connection does not: RabbitMQ closes every connection
with a `connection.close` (320 CONNECTION_FORCED) and loses what was not durable (exclusive
queues, consumers, unconfirmed publishes); PostgreSQL terminates every session (57P01
admin_shutdown), so prepared statements, session settings, LISTENs and advisory locks go with
them, and an immediate stop leaves crash recovery to the next start.

- `OwnRabbit`: `rabbitmq-server` in the foreground as a child of the bench, with its own node
  name (`chaos-<pid>-<hex>@localhost`), AMQP and distribution ports (free ones), data and log
  dirs in a temporary directory, a config file and a conf.d of its own (the machine's
  /etc/rabbitmq/rabbitmq.conf names port 5672) holding the settings Ordermill ships for
  RabbitMQ (deploy/rabbitmq/10-quorum-wal.conf: restarts and failovers measured with the
  log size production runs), no plugins (management and prometheus would
  take fixed ports) and an Erlang cookie of its own (HOME is the temporary directory, for the
  server and for `rabbitmqctl`: the machine's cookie is neither read nor written). It
  registers with the machine's epmd under its own name. Restart: `rabbitmqctl stop` (or a
  SIGKILL of its Erlang VM), then the same command again on the same data dir, so durable
  queues and persistent messages come back. The environment variables and `rabbitmqctl`
  commands used (`await_startup`, `stop`) are the same in RabbitMQ 3.10 to 4.x.
- `OwnPostgres`: `initdb` (trust, user postgres) into a temporary directory, `pg_ctl start`
  on a free port, unix socket in the same directory; `pg_ctl restart -m fast|immediate`. As
  root it runs as the `postgres` user (PostgreSQL refuses root), in a directory that user owns.

Both are removed, data and all, by `close()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")  # the real scripts: /usr/sbin's wrappers su to rabbitmq
# What docker-compose.yml mounts into the broker's conf.d: an own node runs with it too.
SHIPPED_CONF_D = (Path(__file__).resolve().parent.parent / "deploy" / "rabbitmq" / "10-quorum-wal.conf",)
START_TIMEOUT = 120.0  # seconds: a node boots in about 5 s on 2 idle cores, far slower when busy


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def _run(*argv: str, env: dict[str, str] | None = None, cwd: Path | None = None,
               within: float = START_TIMEOUT) -> tuple[int, str]:
    """Run a command to its end; (exit status, its output, stdout and stderr together). The
    output goes through a file, not a pipe: `pg_ctl start` leaves a server behind that would
    hold a pipe open."""
    with tempfile.TemporaryFile() as out:
        proc = await asyncio.create_subprocess_exec(
            *argv, env=env, cwd=cwd, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out)
        try:
            await asyncio.wait_for(proc.wait(), within)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            return -1, f"{argv[0]}: no answer within {within:g} s"
        out.seek(0)
        return proc.returncode or 0, out.read().decode(errors="replace")


class OwnRabbit:
    """One RabbitMQ node of the bench's own (see the module's docstring)."""

    def __init__(self, conf_d: Sequence[Path] = SHIPPED_CONF_D) -> None:
        """`conf_d`: files the node reads after its own config, as /etc/rabbitmq/conf.d/'s
        (default: what compose mounts; () for RabbitMQ's own defaults)."""
        if not (RABBITMQ_BIN / "rabbitmq-server").exists():
            raise RuntimeError(f"no RabbitMQ server in {RABBITMQ_BIN}")
        self.dir = Path(tempfile.mkdtemp(prefix="ordermill-chaos-mq-"))
        self.port, self.dist_port = free_port(), free_port()
        self.node = f"chaos-{os.getpid()}-{secrets.token_hex(3)}@localhost"
        home = self.dir / "home"
        home.mkdir()
        cookie = home / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(16).upper())
        cookie.chmod(0o400)
        (self.dir / "enabled_plugins").write_text("[].\n")
        (self.dir / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\n"
            "loopback_users.guest = true\n")
        (self.dir / "rabbitmq-env.conf").write_text("")  # not the machine's (it names rabbit@localhost)
        (self.dir / "conf.d").mkdir()
        for path in conf_d:
            shutil.copy(path, self.dir / "conf.d" / path.name)
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(home),
            "LANG": "C.UTF-8",
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "data"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_PID_FILE": str(self.dir / "beam.pid"),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq.conf"),
            "RABBITMQ_CONFIG_FILES": str(self.dir / "conf.d"),
            "RABBITMQ_CONF_ENV_FILE": str(self.dir / "rabbitmq-env.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "RABBITMQ_PLUGINS_EXPAND_DIR": str(self.dir / "plugins-expand"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "ERL_CRASH_DUMP": str(self.dir / "erl_crash.dump"),
        }
        self.proc: asyncio.subprocess.Process | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    async def start(self) -> float:
        """Start the node (on its kept data dir) and return once it accepts clients; returns
        how long that took."""
        began = time.monotonic()
        self.starts += 1
        log = (self.dir / f"server-{self.starts}.out").open("wb")
        self.proc = await asyncio.create_subprocess_exec(
            str(RABBITMQ_BIN / "rabbitmq-server"), env=self.env, cwd=self.dir,
            stdout=log, stderr=log, start_new_session=True)
        log.close()
        deadline = began + START_TIMEOUT
        out = ""
        while time.monotonic() < deadline:
            if self.proc.returncode is not None:
                raise RuntimeError(f"RabbitMQ node {self.node} exited {self.proc.returncode} at"
                                   f" start: see {self.dir}/log")
            # await_startup answers at once, with an error, while the node is not yet
            # registered with epmd: ask again.
            status, out = await self._ctl("await_startup", "--timeout", "30", within=40)
            if status == 0:
                return time.monotonic() - began
            await asyncio.sleep(0.5)
        raise RuntimeError(f"RabbitMQ node {self.node} not up within {START_TIMEOUT:g} s: {out[-300:]}")

    async def stop(self, how: str = "stop") -> None:
        """`stop`: `rabbitmqctl stop`, the node closes every connection and halts. `kill`: the
        Erlang VM SIGKILLed, as a crash or an OOM kill would."""
        if self.proc is None or self.proc.returncode is not None:
            return
        if how == "kill":
            pid = int((self.dir / "beam.pid").read_text().split()[0])
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        else:
            status, out = await self._ctl("stop", within=60)
            if status != 0:
                raise RuntimeError(f"rabbitmqctl stop: {out.strip()[-300:]}")
        try:
            await asyncio.wait_for(self.proc.wait(), 60)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            await self.proc.wait()

    async def restart(self, how: str = "stop") -> tuple[float, float]:
        """Stop, then start on the same data. Returns (seconds to stop, seconds to start)."""
        began = time.monotonic()
        await self.stop(how)
        stopped = time.monotonic()
        await self.start()
        return stopped - began, time.monotonic() - stopped

    async def eval(self, expression: str) -> str:
        """An Erlang expression's value on the running node, as `rabbitmqctl eval` prints it."""
        status, out = await self._ctl("eval", expression, within=30)
        if status != 0:
            raise RuntimeError(f"rabbitmqctl eval: {out.strip()[-300:]}")
        return out.strip()

    async def _ctl(self, *args: str, within: float) -> tuple[int, str]:
        return await _run(str(RABBITMQ_BIN / "rabbitmqctl"), "-n", self.node, *args,
                          env=self.env, cwd=self.dir, within=within)

    async def close(self) -> None:
        """Stop the node if it runs (a SIGKILL if it will not stop) and remove its directory."""
        with contextlib.suppress(Exception):
            await self.stop("stop")
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            await self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def _postgres_bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
                   key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    if found:
        return found[-1].parent
    on_path = shutil.which("pg_ctl")
    if on_path:
        return Path(on_path).parent
    raise RuntimeError("no PostgreSQL server (pg_ctl) in /usr/lib/postgresql/*/bin or on PATH")


class OwnPostgres:
    """One PostgreSQL instance of the bench's own (see the module's docstring)."""

    def __init__(self) -> None:
        self.bin = _postgres_bin()
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="ordermill-chaos-pg-"))
        self.data = self.dir / "data"
        self.as_user: list[str] = []
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            user = pwd.getpwnam("postgres")
            os.chown(self.dir, user.pw_uid, user.pw_gid)
            self.as_user = ["runuser", "-u", "postgres", "--"]

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    async def _pg(self, *argv: str, within: float = START_TIMEOUT) -> str:
        status, out = await _run(*self.as_user, *argv, cwd=self.dir, within=within)
        if status != 0:
            raise RuntimeError(f"{Path(argv[0]).name} {argv[1] if len(argv) > 1 else ''}: "
                               f"{out.strip()[-400:]}")
        return out

    async def start(self) -> float:
        """initdb the first time, then start and wait until it accepts connections."""
        began = time.monotonic()
        if not self.data.exists():
            await self._pg(str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres",
                           "--auth=trust", "-E", "UTF8", "--no-sync")
        await self._pg(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.dir / "log"),
                       "-o", f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1"
                             " -c max_connections=200", "-w", "-t", str(int(START_TIMEOUT)), "start")
        return time.monotonic() - began

    async def restart(self, mode: str = "fast") -> float:
        """`pg_ctl restart -m fast` (sessions terminated, a checkpoint) or `-m immediate` (no
        checkpoint: crash recovery at the start). Returns how long until it accepted again."""
        began = time.monotonic()
        await self._pg(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.dir / "log"),
                       "-m", mode, "-w", "-t", str(int(START_TIMEOUT)), "restart")
        return time.monotonic() - began

    async def close(self) -> None:
        if (self.data / "postmaster.pid").exists():
            with contextlib.suppress(Exception):
                await self._pg(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate",
                               "-w", "stop", within=60)
        shutil.rmtree(self.dir, ignore_errors=True)
