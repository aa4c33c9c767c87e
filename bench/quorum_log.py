"""The broker's quorum-queue log, as a bench on the broker's machine sees it: the size at which
it rolls over, and which log file is current (sampled each second, so a phase can say how
many rolls it saw and when).

RabbitMQ writes every quorum-queue message to one write-ahead log per node and holds it in
memory too; when the log reaches `raft.wal_max_size_bytes` it rolls over and writes what it
held out to each queue's segment files. At RabbitMQ's default of 512 MiB, the two rolls that
fell in a steady phase (stop 32) each paused the pipeline 0.3-0.5 s on a 2-core machine and
took the p99 from about 110 ms to 211 and 294 (docs/performance.md, "The broker's log rolling
over"); deploy/rabbitmq/10-quorum-wal.conf sets 64 MiB. A p99 that does not say whether a roll
fell in its phase cannot be read.

Only when every URL of AMQP_URL is a loopback address at a port the machine's own node
listens on, `rabbitmqctl` answers (root, or the rabbitmq user) and its log directory can be
read: otherwise `find()` returns None and nothing is reported (never "rolled 0x" for a log
the bench cannot see).
"""

from __future__ import annotations

import ipaddress
import itertools
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from shared.settings_parts import amqp_urls

# The quorum queues' Ra system: where its log lives and when it rolls, as the node runs it
# (RabbitMQ 3.9 and later), and the node's AMQP ports (is it the bench's broker?).
EVAL = ("M = ra_system:fetch(quorum_queues),"
        " {maps:get(wal_data_dir, M), maps:get(wal_max_size_bytes, M),"
        " [element(6, L) || L <- rabbit_networking:active_listeners(), element(3, L) =:= amqp]}.")
DEFAULT_MAX_BYTES = 512 * 2**20  # RabbitMQ's own


@dataclass(frozen=True)
class QuorumLog:
    directory: Path
    max_bytes: int

    def current(self) -> str | None:
        """The log file being written (the highest-numbered), None if it cannot be read."""
        try:
            names = sorted(p.name for p in self.directory.glob("*.wal"))
        except OSError:
            return None
        return names[-1] if names else None



def describe(max_bytes: int) -> str:
    """The report's line for a log that rolls at `max_bytes` (the JSON keeps only the size)."""
    line = f"broker: quorum queues' log rolls at {max_bytes / 2**20:g} MiB"
    if max_bytes >= DEFAULT_MAX_BYTES:
        line += (" (RabbitMQ's default or more: the two rolls seen at 512 MiB each paused"
                 " the pipeline 0.3-0.5 s; deploy/rabbitmq/10-quorum-wal.conf sets 64 MiB)")
    return line


def _local_ports(amqp_url: str) -> set[int] | None:
    """The ports of AMQP_URL's URLs when every one is on a loopback address, else None."""
    ports = set()
    for url in amqp_urls(amqp_url):
        parts = urlsplit(url)
        host = parts.hostname or "localhost"
        try:
            local = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            local = False
        if not local:
            return None
        ports.add(parts.port or 5672)
    return ports or None


def parse(output: str) -> tuple[QuorumLog, set[int]] | None:
    """`{"/var/lib/rabbitmq/.../quorum/rabbit@host",67108864,[5672]}` (Erlang may wrap it over
    lines) -> the log and the node's AMQP ports."""
    found = re.search(r'\{"([^"]+)",\s*(\d+),\s*\[([\d,\s]*)\]\s*\}', output)
    if not found:
        return None
    ports = {int(p) for p in found.group(3).replace(",", " ").split()}
    return QuorumLog(Path(found.group(1)), int(found.group(2))), ports


def ask(timeout: float = 30.0) -> str | None:
    """The machine's node's answer to EVAL; None when rabbitmqctl is missing or fails."""
    ctl = shutil.which("rabbitmqctl")
    if ctl is None:
        return None
    try:
        done = subprocess.run([ctl, "-q", "eval", EVAL], capture_output=True, text=True,
                              timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def find(amqp_url: str, answer: str | None = None) -> QuorumLog | None:
    """The bench's broker's log, if it is this machine's node and its log can be read.
    `answer`: the node's answer to EVAL (default: asked now)."""
    ports = _local_ports(amqp_url)
    if ports is None:
        return None  # rabbitmqctl here would answer for another node
    found = parse(answer if answer is not None else ask() or "")
    if found is None:
        return None
    log, listening = found
    if not ports <= listening or log.current() is None:
        return None
    return log


def rolls(samples: list[dict[str, Any]]) -> list[float] | None:
    """When (the `t` of the first sample after it: up to a second late) the current log file
    changed between samples; None when no sample could read it (not "no roll")."""
    seen = [(s["t"], s["wal"]) for s in samples if s.get("wal")]
    if not seen:
        return None
    return [t for (_, before), (t, after) in itertools.pairwise(seen) if after != before]
