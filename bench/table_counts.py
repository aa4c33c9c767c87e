"""PostgreSQL's work per order over bench/pipeline.py's burst, per table and per index, for a
comparison between two checkouts by counts (which the shared machine does not distort).

`run` starts the bench/pipeline.py of the checkout it is run in (the current directory, so an
old commit's clone is measured with its own bench) and snapshots the bench database's
counters just before and just after the throughput burst, each after IDLE seconds of quiet
(PostgreSQL 15 reports an idle backend's counters within 10 s): `pg_stat_database`,
`pg_statio_user_tables` / `pg_stat_user_tables` (heap and index blocks, rows inserted, updated,
HOT) and `pg_statio_user_indexes` / `pg_stat_user_indexes` (blocks, scans). With
`--log-statements` the bench database logs every statement (`ALTER DATABASE ... SET
log_statement`) and `compare --log` counts them per order from the server's log.

    cd CHECKOUT && PYTHONPATH=$PWD .venv/bin/python /path/to/bench/table_counts.py run \\
        --out /tmp/a.json -- --skip-memory --skip-bare --warmup 500 --seconds 1 --rate 20 \\
        --services placement,fraud
    python bench/table_counts.py compare main=/tmp/a.json keep=/tmp/b.json \\
        [--log /var/log/postgresql/postgresql-15-main.log]

The outbox's heap varies by ±10 an order between runs of one commit (how many relay passes
meet rows still locked); compare the other tables run against run, the outbox over several.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

IDLE_SECONDS = 11.0  # an idle backend reports its counters within 10 s (PostgreSQL 15)

_DATABASE = ("SELECT xact_commit, tup_inserted, tup_updated, tup_deleted, tup_fetched,"
             " tup_returned, blks_hit + blks_read AS buffers"
             " FROM pg_stat_database WHERE datname = current_database()")
_TABLES = ("SELECT s.relname AS name,"
           " coalesce(heap_blks_hit, 0) + coalesce(heap_blks_read, 0) AS heap_blocks,"
           " coalesce(idx_blks_hit, 0) + coalesce(idx_blks_read, 0) AS index_blocks,"
           " n_tup_ins AS inserted, n_tup_upd AS updated, n_tup_hot_upd AS hot_updated,"
           " n_tup_del AS deleted, coalesce(seq_scan, 0) AS seq_scans"
           " FROM pg_statio_user_tables s JOIN pg_stat_user_tables u USING (relid)")
_INDEXES = ("SELECT s.relname || '.' || s.indexrelname AS name,"
            " idx_blks_hit + idx_blks_read AS blocks, u.idx_scan AS scans"
            " FROM pg_statio_user_indexes s JOIN pg_stat_user_indexes u USING (indexrelid)")
_CATALOGS = ("SELECT coalesce(sum(coalesce(heap_blks_hit, 0) + coalesce(heap_blks_read, 0)"
             " + coalesce(idx_blks_hit, 0) + coalesce(idx_blks_read, 0)), 0)::bigint"
             " FROM pg_statio_sys_tables")


async def snapshot(url: str) -> dict[str, Any]:
    conn = await asyncpg.connect(url)
    try:
        return {
            "time": datetime.now(UTC).isoformat(),
            "database": dict(await conn.fetchrow(_DATABASE)),
            "catalog_blocks": await conn.fetchval(_CATALOGS),
            "tables": {r["name"]: dict(r) for r in await conn.fetch(_TABLES)},
            "indexes": {r["name"]: dict(r) for r in await conn.fetch(_INDEXES)},
        }
    finally:
        await conn.close()


def run(out: Path, log_statements: bool, bench_args: list[str]) -> None:
    """The checkout's own bench, with its create_database and PipelineRun.phase wrapped."""
    sys.path.insert(0, os.getcwd())
    import bench.pipeline as bp  # the checkout's, whatever its commit

    state: dict[str, Any] = {}
    create_database, phase = bp.create_database, bp.PipelineRun.phase

    async def creating(s: Any) -> None:
        await create_database(s)
        state["url"] = s.database_url
        state["database"] = s.database_url.rsplit("/", 1)[1]
        if log_statements:
            conn = await asyncpg.connect(s.database_url)
            try:
                await conn.execute(
                    f"ALTER DATABASE \"{state['database']}\" SET log_statement = 'all'")
            finally:
                await conn.close()

    async def measured(self: Any, label: str, orders: list[Any], publish: Any,
                       target_rate: float | None = None) -> Any:
        burst = label == "throughput" and self.name == "ordermill"
        if burst:
            await asyncio.sleep(IDLE_SECONDS)
            state["before"] = await snapshot(state["url"])
        result = await phase(self, label, orders, publish, target_rate=target_rate)
        if burst:
            await asyncio.sleep(IDLE_SECONDS)
            state["after"] = await snapshot(state["url"])
            state["orders"] = len(orders)
            state["orders_per_second"] = result.orders_per_second
        return result

    bp.create_database = creating
    bp.PipelineRun.phase = measured
    bp.main(bench_args)
    if "after" not in state:
        raise SystemExit("no throughput burst was measured (see the bench's output)")
    out.write_text(json.dumps(state))


def per_order(data: dict[str, Any]) -> dict[tuple[str, str], float]:
    """Each counter's growth over the burst, divided by its orders."""
    before, after, n = data["before"], data["after"], data["orders"]
    out: dict[tuple[str, str], float] = {}
    for key, value in after["database"].items():
        out[("database", key)] = (value - before["database"][key]) / n
    out[("database", "catalog blocks")] = (after["catalog_blocks"] - before["catalog_blocks"]) / n
    for kind in ("tables", "indexes"):
        for name, row in after[kind].items():
            was = before[kind].get(name, {})
            for key, value in row.items():
                if key != "name":
                    out[(f"{kind[:-1] if kind == 'tables' else 'index'} {name}", key)] = (
                        (value or 0) - (was.get(key) or 0)) / n
    return out


def statements(log: Path, data: dict[str, Any]) -> Counter[str]:
    """The bench database's statements logged between the two snapshots, by text."""
    line = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+) \w+ \[\d+\] \S*@(\S+) "
                      r"LOG:  (?:statement|execute [^:]+): (.*)$")
    start = datetime.fromisoformat(data["before"]["time"]).replace(tzinfo=None)
    end = datetime.fromisoformat(data["after"]["time"]).replace(tzinfo=None)
    joined: list[str] = []
    for text in log.read_text(errors="replace").splitlines():
        if re.match(r"^\d{4}-\d\d-\d\d ", text) or not joined:
            joined.append(text)
        else:  # a statement's next line
            joined[-1] += " " + text.strip()
    found: Counter[str] = Counter()
    for text in joined:
        m = line.match(text)
        if m and m.group(2) == data["database"] and start <= datetime.fromisoformat(
                m.group(1)) <= end:
            found[" ".join(m.group(3).split())[:120]] += 1
    return found


def compare(runs: dict[str, dict[str, Any]], log: Path | None, least: float) -> None:
    counts = {label: per_order(data) for label, data in runs.items()}
    keys = sorted(set().union(*counts.values()))
    print("| per order | " + " | ".join(
        f"{label} ({data['orders_per_second']:.0f}/s)" for label, data in runs.items()) + " |")
    print("| --- |" + " --- |" * len(runs))
    for key in keys:
        values = [counts[label].get(key, 0.0) for label in runs]
        if key[0] == "database" or max(abs(v) for v in values) >= least:
            print(f"| {key[0]}: {key[1]} | " + " | ".join(f"{v:.2f}" for v in values) + " |")
    if log:
        for label, data in runs.items():
            found = statements(log, data)
            print(f"\n{label}: {sum(found.values()) / data['orders']:.2f} statements per order")
            for text, n in found.most_common(20):
                print(f"  {n / data['orders']:6.3f}  {text}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run this checkout's bench/pipeline.py, counting the burst")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--log-statements", action="store_true")
    r.add_argument("bench_args", nargs=argparse.REMAINDER, help="after --: bench/pipeline.py's")
    c = sub.add_parser("compare", help="per-order counts of several runs side by side")
    c.add_argument("runs", nargs="+", metavar="LABEL=FILE")
    c.add_argument("--log", type=Path, help="the server's log, for statements per order")
    c.add_argument("--least", type=float, default=0.05, help="hide rows under this everywhere")
    args = parser.parse_args()
    if args.command == "run":
        run(args.out, args.log_statements, [a for a in args.bench_args if a != "--"])
    else:
        compare({label: json.loads(Path(path).read_text())
                 for label, path in (item.split("=", 1) for item in args.runs)},
                args.log, args.least)


if __name__ == "__main__":
    main()
