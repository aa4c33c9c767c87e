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

import os
from collections.abc import Sequence

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


def usable_cpus() -> int:
    """The cores this process may run on (a container's or taskset's limit, not the host's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


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


def named(spec: str, known: Sequence[str]) -> list[str]:
    """The services a layout runs: those it names, or every one for `auto` and `1`."""
    if _keyword(spec) in (AUTO, ONE):
        return list(known)
    named = {name for group in parse(spec, known) for name in group}
    return [name for name in known if name in named]


def _keyword(spec: str) -> str:
    return spec.strip().lower()


def plan(chosen: Sequence[str], spec: str, known: Sequence[str], *,
         cpus: int | None = None) -> list[list[str]]:
    """The groups of processes to run `chosen` in (one group: one process, no supervisor).

    `auto`: DEFAULT_GROUPS restricted to what is chosen, a chosen service no default group
    names joining the last group, on one core a single group. An explicit layout must name
    exactly the chosen services: a worker left out would leave its queue to grow, and one run
    twice in one `ordermill run` is better said with a second command."""
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
    named = [name for group in groups for name in group]
    if sorted(named) != sorted(chosen):
        missing = [name for name in chosen if name not in named]
        extra = [name for name in named if name not in chosen]
        raise LayoutError(
            f"layout {spec!r} must name each service run exactly once:"
            + (f" missing {', '.join(missing)}" if missing else "")
            + (";" if missing and extra else "")
            + (f" not asked to run {', '.join(extra)}" if extra else ""))
    return groups


def label(group: Sequence[str]) -> str:
    """A process's name in logs and metrics: its services, comma-separated."""
    return ",".join(group)
