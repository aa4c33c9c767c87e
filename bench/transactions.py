"""Where a bench run's PostgreSQL transactions come from: counted by kind in the server's log.

`bench/sustained.py --log-statements` sets `log_statement = 'all'` on its database (a
per-database setting: the server's configuration is left alone), and its report gives each
phase's wall-clock span. This reads the server's log (stderr, `log_line_prefix` with the
time, `[%p]` and `%d`, as Debian's default `%m [%p] %q%u@%d`), keeps the bench database's
statements in a phase's span, groups them into transactions per backend (BEGIN ... COMMIT,
or a statement on its own) and counts them by kind: the call site each kind comes from is
named by the first of `KINDS` whose pattern matches the transaction's statements. Counts do
not depend on the machine's load the way times do.

    PYTHONPATH=$PWD .venv/bin/python bench/sustained.py --log-statements
    .venv/bin/python bench/transactions.py /var/log/postgresql/postgresql-15-main.log \\
        [--report bench/results/sustained.json] [--phase steady] [--top 40]
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

LINE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?) (\w+) \[(\d+)\] (?:\S*@(\S*) )?"
    r"LOG:  (?:duration: ([0-9.]+) ms  )?(statement|execute|parse|bind)(?: [^:]+)?: (.*)$"
)

# (kind, pattern searched in the transaction's statements joined by " ; "): the first that
# matches names the transaction. Call sites as of issue 15's target 2 (see README).
KINDS: list[tuple[str, str]] = [
    # Since stop 28 a pass claims and marks in one statement: a pass that found nothing
    # looks the same in the log, so both count here.
    ("relay: a pass, claimed and marked in one statement (shared/outbox.py)",
     r"^WITH claimed AS \(SELECT id FROM outbox"),
    (
        "relay: a pass, claim + mark (shared/outbox.py)",
        r"FROM outbox WHERE published_at IS NULL.*UPDATE outbox",
    ),
    ("relay: a pass that found nothing", r"^SELECT id, message_id.* FROM outbox WHERE published_at IS NULL"),
    ("mail: claim (leased queue)", r"^UPDATE emails SET status = 'sending'"),
    ("mail: order contexts (notify/mail.py)", r"^SELECT o\.id, o\.order_number"),
    ("mail: mark sent (leased queue finish)", r"^UPDATE emails (q )?SET status = \$3"),
    ("jobs: due lanes", r"^SELECT DISTINCT lane FROM jobs"),
    ("jobs: claim (leased queue)", r"^UPDATE jobs SET status = 'running'"),
    ("jobs: read the service before the call", r"^SELECT s\.\*, o\.status AS order_status"),
    ("jobs: outcome (unit of work)",
     r"(^|; )SELECT (id, )?status, order_ref, accept_options FROM orders"),
    ("leases: heartbeat renew", r"SET lease_until = now\(\) \+ \$3::interval"),
    ("webhooks: due endpoints + claim", r"FROM webhook_deliveries WHERE \(\(status"),
    ("alerts: claim", r"^UPDATE alert_deliveries SET status = 'sending'"),
    ("consumer placement (shared transaction)", r"^INSERT INTO inbox.*INSERT INTO orders"),
    ("consumer fraud (shared transaction)", r"^INSERT INTO inbox.*INSERT INTO fraud_checks"),
    ("consumer provisioning, payments (shared transaction)", r"^INSERT INTO inbox.*INSERT INTO payments"),
    ("consumer provisioning, screened (shared transaction)", r"^INSERT INTO inbox.*WITH reinstated AS"),
    ("consumer notify (shared transaction)", r"^INSERT INTO inbox.*INSERT INTO emails"),
    ("consumer webhooks (shared transaction)", r"^INSERT INTO inbox.*INSERT INTO webhook_deliveries"),
    ("consumer alerts (shared transaction)", r"^INSERT INTO inbox.*alert_rule_sets"),
    ("consumers: dedupe row only (shared transaction)", r"^INSERT INTO inbox"),
    ("housekeeping / sweeps", r"^(DELETE|WITH)"),
    ("bench: backlog sampler", r"count\(\*\) FROM outbox WHERE published_at IS NULL\) AS events"),
    ("bench: mails drained", r"routing_key = 'email.send'\) AS requested"),
    ("bench: counters", r"FROM pg_stat_database"),
    ("asyncpg: type introspection", r"typeinfo_tree|pg_catalog\.pg_type"),
    ("session setup (LISTEN, jit, read-only check)", r"^(LISTEN|SET |SELECT current_setting|SHOW )"),
]


@dataclass
class Tally:
    kinds: Counter[str] = field(default_factory=Counter)
    unnamed: Counter[str] = field(default_factory=Counter)  # signature of the first statement
    statements: int = 0
    kind_statements: Counter[str] = field(default_factory=Counter)  # statements by kind
    # Milliseconds the server spent on each kind's statements (parse, bind, execute), when the
    # run logged durations (`--log-durations`): wall time in the backend, CPU waits included.
    kind_ms: Counter[str] = field(default_factory=Counter)
    text_ms: Counter[str] = field(default_factory=Counter)  # by a statement's first 90 characters
    # The backends' CPU (milliseconds), when the run logged the executor's statistics.
    kind_cpu: Counter[str] = field(default_factory=Counter)
    text_cpu: Counter[str] = field(default_factory=Counter)
    # (kind, a statement's first 90 characters): what each kind's statements are
    signatures: Counter[tuple[str, str]] = field(default_factory=Counter)

    def add(self, statements: list[str]) -> str:
        self.statements += len(statements)
        joined = " ; ".join(statements)
        kind = next((kind for kind, pattern in KINDS if re.search(pattern, joined, re.MULTILINE)),
                    "other")
        self.kinds[kind] += 1
        self.kind_statements[kind] += len(statements)
        for text in statements:
            self.signatures[kind, re.sub(r"\s+", " ", text)[:90]] += 1
        if kind == "other":
            self.unnamed[re.sub(r"\s+", " ", statements[0])[:110]] += 1
        return kind


def _epoch(stamp: str) -> float:
    return datetime.fromisoformat(stamp + "+00:00").timestamp()


class Cpu(float):
    """Milliseconds of a backend's CPU (user and system), as opposed to its time."""


# A backend's CPU since it started, in the statistics `log_executor_stats` logs.
STATS = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?) \w+ \[(\d+)\] (?:\S*@(\S*) )?"
                   r"DETAIL:  ! system usage stats:")
TOTAL = re.compile(r"^\t!\t\[([0-9.]+) s user, ([0-9.]+) s system total\]")


def statements(lines: Iterable[str], database: str, since: float,
               until: float) -> Iterator[tuple[int, str | float]]:
    """(backend pid, statement) of `database` between `since` and `until` (epoch seconds); a
    statement's continuation lines (a tab first) are joined to it, as one line. With
    durations logged (`log_min_duration_statement = 0`: each statement once, with its time),
    a statement is followed by (pid, its milliseconds): its execution's, and its parse's and
    bind's (planning, for a custom plan), which the server logs before it. With the
    executor's statistics logged too, by (pid, Cpu(milliseconds)): the backend's CPU since
    its reading before (the statement's parse, plan and execution, and the COMMIT before it
    if any: the statistics come only with a plannable statement)."""
    entry: tuple[int, list[str], float | None] | None = None
    pending: dict[int, float] = {}  # a backend's parse and bind times, for its next execute
    cpu: dict[int, float] = {}  # a backend's last reading of its CPU (seconds)
    pending_cpu: dict[int, float] = {}
    reading: int | None = None  # the backend whose statistics these lines are

    def flush(entry: tuple[int, list[str], float | None]) -> Iterator[tuple[int, str | float]]:
        pid = entry[0]
        yield pid, " ".join(p for p in entry[1] if p)
        if entry[2] is not None:
            yield pid, entry[2] + pending.pop(pid, 0.0)
        if pid in pending_cpu:
            yield pid, Cpu(pending_cpu.pop(pid) * 1000)

    for line in lines:
        if line.startswith("\t"):
            if reading is not None and (t := TOTAL.match(line)):
                total = float(t.group(1)) + float(t.group(2))
                if reading in cpu and total >= cpu[reading]:  # less: a new backend, same pid
                    pending_cpu[reading] = pending_cpu.get(reading, 0.0) + total - cpu[reading]
                cpu[reading] = total
                reading = None
            elif entry is not None:
                entry[1].append(line.strip())
            continue
        if entry is not None:
            yield from flush(entry)
            entry = None
        reading = None
        m = LINE.match(line)
        if m is None:
            stats = STATS.match(line)
            if stats and stats.group(3) == database and since <= _epoch(stats.group(1)) <= until:
                reading = int(stats.group(2))
            continue
        if m.group(4) != database:
            continue
        if m.group(2) != "UTC":
            raise SystemExit(f"log times in {m.group(2)}: only UTC is read")
        if not since <= _epoch(m.group(1)) <= until:
            continue
        pid = int(m.group(3))
        ms = None if m.group(5) is None else float(m.group(5))
        if m.group(6) in ("parse", "bind"):
            pending[pid] = pending.get(pid, 0.0) + (ms or 0.0)
        else:
            entry = (pid, [m.group(7).strip()], ms)
    if entry is not None:
        yield from flush(entry)


def tally(pairs: Iterable[tuple[int, str | float]]) -> Tally:
    """Group each backend's statements into transactions and count them by kind; a statement's
    time goes to its transaction's kind."""
    out = Tally()
    open_: dict[int, list[str]] = {}
    open_ms: dict[int, float] = {}
    open_cpu: dict[int, float] = {}
    last_kind: dict[int, str] = {}  # the kind of the backend's last finished transaction
    last_text: dict[int, str] = {}  # the backend's last statement
    timed: set[int] = set()  # backends whose times are logged
    for pid, text in pairs:
        if isinstance(text, float):  # a statement's time, or its CPU (Cpu)
            used = isinstance(text, Cpu)
            if not used:
                timed.add(pid)
            by_text, by_kind, open_sum = ((out.text_cpu, out.kind_cpu, open_cpu) if used
                                          else (out.text_ms, out.kind_ms, open_ms))
            if pid in last_text:
                by_text[last_text[pid]] += text
            if pid in open_:
                open_sum[pid] += text
            elif pid in last_kind:
                by_kind[last_kind[pid]] += text
            continue
        last_text[pid] = re.sub(r"\s+", " ", text)[:90]
        word = text.rstrip(";").strip().upper()
        if word.startswith("BEGIN") or word.startswith("START TRANSACTION"):
            open_[pid] = []
            open_ms[pid] = open_cpu[pid] = 0.0
        elif word in ("COMMIT", "ROLLBACK", "END"):
            body = open_.pop(pid, None)
            ms, used = open_ms.pop(pid, 0.0), open_cpu.pop(pid, 0.0)
            if body:
                last_kind[pid] = out.add(body)
                if pid in timed:
                    out.kind_ms[last_kind[pid]] += ms
                if used:
                    out.kind_cpu[last_kind[pid]] += used
        elif pid in open_:
            open_[pid].append(text)
        else:
            last_kind[pid] = out.add([text])
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("log", type=Path, help="the PostgreSQL server's log")
    parser.add_argument("--report", type=Path, default=Path("bench/results/sustained.json"))
    parser.add_argument("--phase", default="steady", help="burst, steady or warm-up")
    parser.add_argument("--round", type=int, default=0, help="the report's round (index)")
    parser.add_argument("--top", type=int, default=15, help="unnamed kinds to show")
    parser.add_argument("--detail", action="store_true",
                        help="each kind's statements, by their first 90 characters")
    opts = parser.parse_args(argv)
    report = json.loads(opts.report.read_text())
    rnd = report["rounds"][opts.round]
    phase = rnd[opts.phase]
    database = f"om_bench_{report['run_id']}"
    with opts.log.open(errors="replace") as lines:
        counted = tally(statements(lines, database, phase["started_at"], phase["ended_at"]))
    orders = phase["orders"]
    total = sum(counted.kinds.values())
    print(
        f"{database}, round {opts.round + 1} {rnd['label']}, {opts.phase}: {orders} orders,"
        f" {total} transactions ({total / orders:.2f} an order),"
        f" {counted.statements / orders:.2f} statements an order"
    )
    timed = sum(counted.kind_ms.values()) > 0
    used = sum(counted.kind_cpu.values()) > 0
    print("  an order  transactions  statements an order" + ("  server ms an order" if timed else "")
          + ("  CPU ms an order" if used else "") + "  kind")
    for kind, n in counted.kinds.most_common():
        ms = f"  {counted.kind_ms[kind] / orders:8.3f}" if timed else ""
        ms += f"  {counted.kind_cpu[kind] / orders:8.3f}" if used else ""
        print(f"  {n / orders:6.2f}  {n:7}  {counted.kind_statements[kind] / orders:6.2f}{ms}  {kind}")
    if timed:
        print(f"  server time an order, every kind: {sum(counted.kind_ms.values()) / orders:.3f} ms"
              " (wall time in the backends: parse, bind, execute; CPU waits included)")
    if used:
        print(f"  backends' CPU an order, every kind: {sum(counted.kind_cpu.values()) / orders:.3f} ms"
              " (each backend's CPU between two readings; a COMMIT's goes to the statement after)")
    if opts.detail:
        for kind, _ in counted.kinds.most_common():
            print(f"{kind}:")
            for (k, text), n in counted.signatures.most_common():
                if k == kind and n / orders >= 0.01:
                    ms = f"  {counted.text_ms[text] / n:6.3f} ms" if timed else ""
                    ms += f"  {counted.text_cpu[text] / n:6.3f} CPU ms" if used else ""
                    print(f"    {n / orders:6.2f}{ms}  {text}")
    if "transactions" in rnd:  # the round's exact count against the log's, over the round
        with opts.log.open(errors="replace") as lines:
            logged = sum(
                tally(statements(lines, database, rnd["started_at"], rnd["ended_at"])).kinds.values()
            )
        hidden = rnd["transactions"] - logged
        print(
            f"over the round ({rnd['orders']} orders): {rnd['transactions']} commits counted by"
            f" the server, {logged} in the log; {hidden} ({hidden / rnd['orders']:.2f} an order)"
            " not in it: listening connections reading the NOTIFY queue (each commit that"
            " notifies wakes every listener of the database), and prepares"
        )
    if counted.unnamed:
        print("other, by first statement:")
        for text, n in counted.unnamed.most_common(opts.top):
            print(f"  {n / orders:6.2f}  {n:7}  {text}")


if __name__ == "__main__":
    main()
