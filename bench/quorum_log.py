"""The broker's quorum-queue log, as a bench on the broker's machine sees it: the size at which
it rolls over, and which log file is current (sampled each second, so a phase can say how
many rolls it saw and when).

RabbitMQ writes every quorum-queue message to one write-ahead log per node and holds it in
memory too; when the log reaches `raft.wal_max_size_bytes` it rolls over and writes what it
held out to each queue's segment files. At RabbitMQ's default of 512 MiB each roll paused the
pipeline 0.3-0.5 s on a 2-core machine: the sustained bench's only misses of its p99 target
(docs/performance.md, "The broker's log rolling over"). deploy/rabbitmq/10-quorum-wal.conf
sets 64 MiB. A bench result that does not say whether a roll fell in its phase cannot be read.

Only when the broker is on this machine (AMQP_URL's host is a loopback address) and
`rabbitmqctl` answers: elsewhere `find()` returns None and nothing is reported.
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

# The quorum queues' Ra system: where its log lives and when it rolls (RabbitMQ 3.9 and later).
EVAL = ("M = ra_system:fetch(quorum_queues),"
        " {maps:get(wal_data_dir, M), maps:get(wal_max_size_bytes, M)}.")
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

    def describe(self) -> str:
        line = f"broker: quorum queues' log rolls at {self.max_bytes / 2**20:g} MiB"
        if self.max_bytes >= DEFAULT_MAX_BYTES:
            line += (" (RabbitMQ's default: each roll may pause the pipeline for some 0.3-0.5 s;"
                     " deploy/rabbitmq/10-quorum-wal.conf sets 64 MiB)")
        return line


def _local(amqp_url: str) -> bool:
    host = urlsplit(amqp_url.split(",")[0].strip()).hostname or "localhost"
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse(output: str) -> QuorumLog | None:
    """`{"/var/lib/rabbitmq/.../quorum/rabbit@host",67108864}` -> QuorumLog."""
    found = re.search(r'\{"([^"]+)",\s*(\d+)\}', output)
    return QuorumLog(Path(found.group(1)), int(found.group(2))) if found else None


def find(amqp_url: str, timeout: float = 30.0) -> QuorumLog | None:
    ctl = shutil.which("rabbitmqctl")
    if ctl is None or not _local(amqp_url):
        return None
    try:
        done = subprocess.run([ctl, "-q", "eval", EVAL], capture_output=True, text=True,
                              timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return parse(done.stdout) if done.returncode == 0 else None


def rolls(samples: list[dict[str, Any]]) -> list[float]:
    """When (the sample's `t`) the current log file changed between samples."""
    seen = [(s["t"], s["wal"]) for s in samples if s.get("wal")]
    return [t for (_, before), (t, after) in itertools.pairwise(seen) if after != before]
