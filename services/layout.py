"""How `ordermill run` lays its workers out in processes (WORKER_PROCESSES, `--processes`).

One Python process runs one event loop on one core. With every worker in it, an order's
placement and screening wait their turn behind provisioning's payment transactions and the
mail's SMTP sessions: on a 2-core machine at 80 % of the full-flow burst, publish->screened
p99 was 314-337 ms and payment->Active 1.3-5.3 s with a growing backlog; with the order path,
provisioning and the rest in three processes, 242-245 ms and 548-736 ms, backlog flat
(docs/performance.md, stop 25). So on more than one core the workers run in groups:

- `placement,fraud`: the order path a storefront waits on (placed -> screened);
- `provisioning,review`: money and setups (payments, jobs, operators' commands);
- `notify,webhooks,alerts`: what tells people (mail, integrators, staff).

A layout is written as groups separated by `/`, services in a group by `,`:
`placement,fraud/provisioning,review/notify,webhooks,alerts`. `auto` (the default) is the
groups above on two or more cores, one process on one; `1` is one process.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

AUTO = "auto"
ONE = "1"
# The groups `auto` uses, in the order the processes start (the order path first).
DEFAULT_GROUPS: tuple[tuple[str, ...], ...] = (
    ("placement", "fraud"),
    ("provisioning", "review"),
    ("notify", "webhooks", "alerts"),
)


class LayoutError(ValueError):
    """A layout that names an unknown service, one twice, or not the services asked for."""


def usable_cpus(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """The cores this process may use: its CPU set (taskset, a container's cpuset), and no
    more than its CPU quota allows (cgroup v2 `cpu.max`: `docker --cpus`, a Kubernetes
    limit), rounded up."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):  # no cgroup v2 here, or no quota read
        pass
    return cores


def parse(text: str, known: Sequence[str]) -> list[list[str]]:
    """`a,b/c` -> [[a, b], [c]]: every name known and named once, no empty group."""
    groups = [[name.strip() for name in part.split(",")] for part in text.strip().split("/")]
    seen: set[str] = set()
    for group in groups:
        if not all(group):
            raise LayoutError(f"empty service name in layout {text!r}"
                              " (groups are separated by '/', services by ',')")
        for name in group:
            if name not in known:
                raise LayoutError(f"unknown service {name!r} in layout {text!r};"
                                  f" known: {', '.join(known)}")
            if name in seen:
                raise LayoutError(f"service {name!r} is named twice in layout {text!r}")
            seen.add(name)
    return groups


def _keyword(spec: str) -> str:
    return spec.strip().lower()


def plan(chosen: Sequence[str], spec: str, known: Sequence[str], *,
         cpus: int | None = None) -> list[list[str]]:
    """The groups of processes to run `chosen` in (one group: one process, no supervisor).

    A layout groups, it does not choose: the services run are those named on the command
    line, else every worker. `auto`: DEFAULT_GROUPS kept to what is run (a service no default
    group names joins the last group), on one core a single group. An explicit layout must
    place every service run (a worker left out would leave its queue to grow unseen); the
    groups it names are kept to what is run, so one WORKER_PROCESSES shared by every
    deployment also serves `ordermill run placement` (one process)."""
    if _keyword(spec) == ONE:
        return [list(chosen)]
    if _keyword(spec) == AUTO:
        if (cpus if cpus is not None else usable_cpus()) < 2:
            return [list(chosen)]
        groups = [[name for name in group if name in chosen] for group in DEFAULT_GROUPS]
        grouped = {name for group in DEFAULT_GROUPS for name in group}
        groups[-1].extend(name for name in chosen if name not in grouped)
        return [group for group in groups if group] or [list(chosen)]
    groups = parse(spec, known)
    placed = {name for group in groups for name in group}
    missing = [name for name in chosen if name not in placed]
    if missing:
        raise LayoutError(f"layout {spec!r} places no {', '.join(missing)}: name every service"
                          " run in one of its groups")
    return [kept for group in groups if (kept := [name for name in group if name in chosen])]


def label(group: Sequence[str]) -> str:
    """A process's name in logs and metrics: its services, comma-separated."""
    return ",".join(group)
