"""The console's page times at scale: seeds its own database with a million orders
(bench/seed.py), then measures each page's server time in-process (the Starlette app through
httpx's ASGI transport: routing, queries, rendering; no network), p50 and p99 over N
requests, and prints a table. It asserts nothing about time (bench/README.md).

    PYTHONPATH=. .venv/bin/python bench/console_pages.py [--orders 1000000] [--clients 300000]
        [--requests 100] [--keep] [--database URL] [--only WORD,...] [--explain]

The database (om_bench_console_<hex>) is dropped at the end unless --keep. Seeding a million
orders takes a few minutes; it prints its progress.

--explain: the time inside the database too, which a busy shared machine disturbs less than
the page's whole time: each SELECT a page runs is first run under EXPLAIN (ANALYZE, BUFFERS)
(its plan's planning + execution time and the buffers it touched, summed per request), then
run as usual; the page times measured meanwhile include the EXPLAINs, so read the two columns
of one run apart from a run without it.

--cold: each page's first visit, for each of its paths once, after PostgreSQL's shared buffers
were emptied of this database's pages (evict: two big tables read through an index, so their
pages replace everyone else's; the operating system's cache still holds them, as it would on a
server whose 128 MB of shared buffers are far smaller than its memory). With --explain, each
statement's buffers read (not in shared buffers) and hit are printed too.

--drop-os-cache (with --cold, as root): before each first visit, the operating system's page
cache is emptied as well (`sync; echo 3 > /proc/sys/vm/drop_caches`, the whole machine's), so
what a visit reads outside shared buffers comes from the disk: a server just started, or one
whose memory is far smaller than its database.

--warm-up (with --cold): after emptying the caches, the console's warm-up runs (what it does
when it starts or its database server restarted: console/warm_up.py), then the first visit:
what an operator's first visit after a restart costs. Without it the console's own warm-up is
switched off (CONSOLE_WARM_UP=0), so each first visit is cold.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.seed import Shape, seed  # noqa: E402
from cli.catalog import load_catalog, read_catalog  # noqa: E402
from console import accounts  # noqa: E402
from console.app import close_state, create_app, open_state, settle_heap  # noqa: E402
from console.warm_up import read_first_pages  # noqa: E402
from console.web import compile_all  # noqa: E402
from shared import db  # noqa: E402
from shared.settings import Settings  # noqa: E402

DATABASE = os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
PASSWORD = "bench password, long enough"


class NoBroker:
    """The console's publisher, absent: these pages only read (the dashboard says it cannot
    ask RabbitMQ, which costs nothing)."""

    async def review(self, body: dict[str, Any], *, wait_seconds: float) -> None:
        return None

    async def place(self, body: dict[str, Any], *, wait_seconds: float) -> None:
        return None

    async def queue_depths(self) -> None:
        return None

    async def dead_letters(self, limit: int) -> None:
        return None

    async def replay(self, queue: str, message_id: str) -> Any:
        raise RuntimeError("no broker")

    async def close(self) -> None:
        pass


async def evict(url: str) -> None:
    """Replace the pages in PostgreSQL's shared buffers (by default 128 MB): read two of the
    largest tables (history and invoice lines, about 470 MB at 1M orders) through their
    primary keys, which, unlike a sequential scan (a ring of 256 kB), takes buffers from
    the shared pool, several times over."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("SET enable_seqscan = off; SET enable_bitmapscan = off")
        for table, column in (("order_history", "detail::text"), ("invoice_items", "description"),
                              ("order_history", "detail::text")):
            await conn.fetchval(f"SELECT sum(length({column})) FROM {table} WHERE id > 0")
    finally:
        await conn.close()


def _url(name: str) -> str:
    return re.sub(r"/[^/]*$", f"/{name}", DATABASE)


async def prepare(url: str, shape: Shape) -> None:
    await db.ensure_database(url, attempts=3)
    pool = await db.create_pool(url, max_size=2, attempts=3)
    try:
        await db.migrate(pool)
        async with pool.acquire() as conn:
            await load_catalog(conn, read_catalog(ROOT / "catalog.example.toml"))
            await conn.execute(
                "INSERT INTO operators (name, role, password_hash) VALUES ('bench', 'reviewer', $1)",
                await accounts.hash_password(PASSWORD))
    finally:
        await pool.close()
    # A connection of its own: a statement of a million rows outlasts the pool's timeout.
    conn = await asyncpg.connect(url)
    try:
        print(f"seeding {shape.orders:,} orders, {shape.clients:,} clients ...", flush=True)
        await seed(conn, shape)
    finally:
        await conn.close()


async def existing_ids(conn: asyncpg.Connection, table: str, n: int,
                       rnd: random.Random) -> list[int]:
    """N ids of `table` spread over its id range, each the first at or after a random point
    (so a database whose ids have gaps, filled by the pipeline rather than the seeder, works)."""
    low, high = await conn.fetchrow(f"SELECT min(id), max(id) FROM {table}")
    if low is None:
        return []
    return [await conn.fetchval(f"SELECT min(id) FROM {table} WHERE id >= $1",
                                rnd.randint(low, high)) for _ in range(n)]


async def pages(conn: asyncpg.Connection, shape: Shape) -> list[tuple[str, list[str]]]:
    """Each page measured, with the paths its requests cycle through (varied ids)."""
    rnd = random.Random(7)
    orders = await existing_ids(conn, "orders", 50, rnd)
    clients = await existing_ids(conn, "clients", 50, rnd)
    last_names = ["smith", "müller", "quinn", "okafor", "berg"]
    return [
        ("dashboard", ["/"]),
        ("pending list, first page", ["/orders"]),
        ("pending list, filtered", ["/orders?status=Active&product=business&since=2020-01-01",
                                    "/orders?status=all&flagged=1"]),
        # Each filter the list offers, alone and with the others (issue 13: every operator
        # read under 50 ms at p99), the dates and products varied.
        ("filtered: status + product + since",
         [f"/orders?status={s}&product={p}&since={y}-0{m}-01"
          for s, p, y, m in (("Active", "business", 2020, 1), ("Active", "starter", 2023, 6),
                             ("Cancelled", "trial", 2019, 3), ("Active", "reseller", 2025, 9),
                             ("Fraud", "business", 2021, 2), ("all", "trial", 2024, 4))]),
        # A product launched lately (bench/seed.py: 12,000 orders in the last 60 days, 50 five
        # years ago), over all time and with the other filters (issue 13's review).
        ("filtered: a product launched lately", [
            "/orders?status=all&product=launch", "/orders?status=Active&product=launch",
            "/orders?status=review&product=launch", "/orders?status=Fraud&product=launch",
            "/orders?status=Cancelled&product=launch&since=2019-01-01",
            "/orders?status=all&flagged=1&product=launch",
            "/orders?status=all&product=launch&after=900000",
            f"/orders?status=all&product=launch&client={clients[0]}"]),
        ("filtered: a product nobody ordered", ["/orders?status=all&product=dedicated",
                                                "/orders?status=Active&product=managed"
                                                "&since=2020-01-01"]),
        ("filtered: status + dates", [f"/orders?status={s}&since={a}&until={b}" for s, a, b in (
            ("Cancelled", "2022-01-01", ""), ("all", "2025-01-01", "2025-01-31"),
            ("Active", "2019-05-01", "2019-05-07"), ("Fraud", "", "2018-01-01"),
            ("all", "2017-03-01", ""), ("Active", "", "2024-12-31"))]),
        ("filtered: screening, flagged", [
            "/orders?status=all&screening=failed", "/orders?status=all&screening=error",
            "/orders?status=all&flagged=1&since=2023-01-01", "/orders?status=Fraud&flagged=1",
            "/orders?status=all&screening=passed&since=2024-02-01",
            "/orders?status=all&flagged=1&product=business"]),
        ("filtered: client", [f"/orders?status=all&client={i}" for i in clients[:6]]
         + [f"/orders?status=Active&client={i}&product=starter" for i in clients[6:9]]),
        ("filtered: searched + filters", [f"/orders?status=Active&q=shop-{i}&since=2018-01-01"
                                          for i in orders[30:36]]
         + [f"/orders?status=all&q=site{i}.com&product=business" for i in orders[36:40]]),
        ("filtered: next pages", [
            "/orders?status=Active&product=business&since=2020-01-01&after=600000",
            "/orders?status=all&since=2022-01-01&after=700000",
            "/orders?status=Cancelled&before=500000",
            "/orders?status=all&flagged=1&after=400000"]),
        ("pending list, searched", [f"/orders?status=all&q=shop-{i}" for i in orders[:10]]
         + [f"/orders?status=all&q=site{i}.com" for i in orders[10:20] if i % 2 == 0]
         + [f"/orders?status=all&q={100000000 + i * 7}" for i in orders[20:30]]),
        ("order page", [f"/orders/{i}" for i in orders]),
        ("client page", [f"/clients/{i}" for i in clients]),
        ("module queue", ["/module-queue"]),
        ("payments", ["/payments"]),
        ("Add New Order form", ["/orders/new", *(f"/orders/new?client={i}" for i in clients[:10])]),
        ("client search", [f"/clients/search?q={q}" for q in last_names]
         + [f"/clients/search?q=ann.{q}" for q in last_names]),
    ]


class InDatabase:
    """Each SELECT the pages run, first run under EXPLAIN (ANALYZE, BUFFERS): the database's
    own time (planning + execution) and the buffers read, summed per request (--explain)."""

    def __init__(self) -> None:
        self.ms = 0.0
        self.buffers = 0
        self.statements = 0
        self.read = 0  # of the buffers, those not found in shared buffers
        self.read_by: dict[str, int] = {}  # those reads by relation (index or table) read
        self.slowest: tuple[float, str] = (0.0, "")
        self._saved: dict[str, Any] = {}

    def reset(self) -> None:
        self.ms, self.buffers, self.statements, self.slowest = 0.0, 0, 0, (0.0, "")
        self.read = 0
        self.read_by = {}

    def count_reads(self, node: dict[str, Any]) -> None:
        """A plan node's own reads (its own less its children's), by the relation it reads:
        an index scan's are its index's and its table's heap pages together ("idx+heap")."""
        children = node.get("Plans", [])
        own = node.get("Shared Read Blocks", 0) - sum(c.get("Shared Read Blocks", 0)
                                                     for c in children)
        if own > 0:
            what = node.get("Index Name") or node.get("Relation Name") or node["Node Type"]
            if node.get("Index Name") and node["Node Type"] == "Index Scan":
                what += "+heap"
            self.read_by[what] = self.read_by.get(what, 0) + own
        for child in children:
            self.count_reads(child)

    def reads(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(self.read_by.items(),
                                                       key=lambda kv: -kv[1]))
    def install(self) -> None:
        """On asyncpg's Connection class: the pool's connections (and their proxies) use it."""
        cls = asyncpg.connection.Connection
        original_fetchval = cls.fetchval
        for name in ("fetch", "fetchrow", "fetchval"):
            self._saved[name] = original = getattr(cls, name)
            setattr(cls, name, self._explaining(original, original_fetchval))

    def uninstall(self) -> None:
        for name, original in self._saved.items():
            setattr(asyncpg.connection.Connection, name, original)

    def _explaining(self, original: Any, fetchval: Any) -> Any:
        meter = self

        async def run(conn: Any, query: str, *args: Any, **kw: Any) -> Any:
            if query.lstrip()[:5].upper() in ("SELEC", "WITH "):  # reads only
                raw = await fetchval(conn, "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + query,
                                     *args)
                plan = (json.loads(raw) if isinstance(raw, str) else raw)[0]
                ms = plan["Planning Time"] + plan["Execution Time"]
                meter.ms += ms
                meter.statements += 1
                meter.buffers += (plan["Plan"].get("Shared Hit Blocks", 0)
                                  + plan["Plan"].get("Shared Read Blocks", 0))
                meter.read += plan["Plan"].get("Shared Read Blocks", 0)
                meter.count_reads(plan["Plan"])
                if ms > meter.slowest[0]:
                    meter.slowest = (ms, " ".join(query.split()))
            return await original(conn, query, *args, **kw)

        return run


async def measure(url: str, shape: Shape, requests: int,
                  only: list[str] | None = None,
                  in_db: InDatabase | None = None,
                  cold: bool = False,
                  os_cache: bool = False,
                  warm: bool = False) -> list[tuple[str, float, float, float, float]]:
    """Per page: p50, p99 and the slowest of `requests` warm requests, and the slowest of
    its paths' first visits (each path once, before them; with --cold, the first visits
    alone, after emptying the buffers)."""
    settings = Settings(database_url=url, amqp_url="amqp://guest:guest@127.0.0.1:5672/",
                        console_secret_key="b" * 40, log_level="WARNING",
                        console_warm_up=False)  # measured by --warm-up, after each emptying
    state = await open_state(settings, publisher=NoBroker())
    app = create_app(state)
    compile_all(state.env)  # as build_app does for the console's server
    settle_heap()  # as the console's server does then
    out = []
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://bench") as client:
            page = await client.get("/sign-in")
            csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)[1]
            signed = await client.post("/sign-in", data={"name": "bench", "password": PASSWORD,
                                                         "csrf": csrf})
            assert signed.status_code == 303, signed.text[:300]
            async with state.pool.acquire() as conn:
                plan = await pages(conn, shape)
            # The process warm (templates compiled), as a server that has served (and whose
            # CONSOLE_WARM_UP has read what the dashboard and the first page read).
            for path in ("/", "/orders", "/orders?status=all&client=1"):
                await client.get(path)
            for name, paths in plan:
                if only and not any(part in name for part in only):
                    continue
                if cold:
                    out.append(await first_visits(client, url, name, paths, in_db, os_cache,
                                                  state.pool if warm else None))
                    continue
                # Each path once first, timed apart: its first visit reads its plans and rows
                # into the buffers; the requests after it are the warm page (a view's p99 then
                # does not depend on how many sample paths it has).
                first = [await timed_get(client, path, None) for path in dict.fromkeys(paths)]
                times, db_times, slowest = [], [], (0.0, "", "")
                for k in range(requests):
                    path = paths[k % len(paths)]
                    times.append(await timed_get(client, path, in_db))
                    if in_db:
                        db_times.append((in_db.ms, in_db.statements, in_db.buffers))
                        if in_db.slowest[0] > slowest[0]:
                            slowest = (*in_db.slowest, path)
                times.sort()
                p99 = times[min(len(times) - 1, int(len(times) * 0.99))]
                out.append((name, statistics.median(times), p99, max(times), max(first)))
                print(f"  {name:<28} p50 {out[-1][1]:7.1f} ms   p99 {p99:7.1f} ms"
                      f"   first visits at most {max(first):7.1f} ms", flush=True)
                if in_db:
                    db = sorted(ms for ms, _, _ in db_times)
                    print(f"  {'':28} in the database: p50 {statistics.median(db):6.1f} ms"
                          f"   p99 {db[min(len(db) - 1, int(len(db) * 0.99))]:6.1f} ms,"
                          f" {max(n for _, n, _ in db_times)} statements,"
                          f" {max(b for _, _, b in db_times):,} buffers at most;"
                          f" slowest {slowest[0]:.1f} ms ({slowest[2]}): {slowest[1][:160]}",
                          flush=True)
    finally:
        await close_state(state)
    return out


async def timed_get(client: httpx.AsyncClient, path: str, in_db: InDatabase | None) -> float:
    """One request's time in ms (and its statements in `in_db`, reset first); it must be 200."""
    if in_db:
        in_db.reset()
    t0 = time.perf_counter()
    response = await client.get(path)
    took = (time.perf_counter() - t0) * 1000
    assert response.status_code == 200, (path, response.status_code)
    return took


DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def drop_os_cache() -> None:
    """Empty the operating system's page cache (root only; the whole machine's: every other
    process's next reads come from the disk too), so a first visit's reads that miss
    PostgreSQL's shared buffers go to the disk. Raises SystemExit if the kernel refuses."""
    os.sync()
    try:
        DROP_CACHES.write_text("3\n")
    except OSError as exc:
        raise SystemExit(f"--drop-os-cache: the kernel refused ({DROP_CACHES}: {exc})") from None


async def first_visits(client: httpx.AsyncClient, url: str, name: str, paths: list[str],
                       in_db: InDatabase | None, os_cache: bool = False,
                       warm_pool: asyncpg.Pool | None = None
                       ) -> tuple[str, float, float, float, float]:
    """Each path once, after the shared buffers were emptied (--cold), and the operating
    system's cache too (--drop-os-cache); then the console's warm-up first (--warm-up)."""
    times = []
    for path in dict.fromkeys(paths):
        await evict(url)
        if os_cache:
            drop_os_cache()
        if warm_pool is not None:
            t0 = time.perf_counter()
            async with warm_pool.acquire() as conn:
                await read_first_pages(conn)
            print(f"  {'':28} warm-up {(time.perf_counter() - t0) * 1000:7.1f} ms", flush=True)
        times.append(await timed_get(client, path, in_db))
        extra = (f"; in the database {in_db.ms:.1f} ms, {in_db.statements} statements,"
                 f" {in_db.buffers:,} buffers ({in_db.read:,} read)" if in_db else "")
        print(f"  {name[:28]:<28} first visit {times[-1]:7.1f} ms  {path}{extra}", flush=True)
        if in_db and in_db.read_by:
            print(f"  {'':28} read: {in_db.reads()}", flush=True)
    times.sort()
    return name, statistics.median(times), times[-1], times[-1], times[-1]


async def drop(url: str) -> None:
    conn = await asyncpg.connect(_url("postgres"))
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')
    finally:
        await conn.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--orders", type=int, default=Shape.orders)
    parser.add_argument("--clients", type=int, default=Shape.clients)
    parser.add_argument("--requests", type=int, default=100, help="per page")
    parser.add_argument("--keep", action="store_true", help="keep the database (printed)")
    parser.add_argument("--database", help="measure an already seeded database instead")
    parser.add_argument("--only", help="measure only the pages whose names hold one of these"
                        " comma-separated words (e.g. 'filtered')")
    parser.add_argument("--explain", action="store_true",
                        help="also the time inside the database (EXPLAIN ANALYZE) per page")
    parser.add_argument("--cold", action="store_true",
                        help="each path's first visit once, shared buffers emptied before each"
                        " (p50 and p99 columns: the median and the slowest)")
    parser.add_argument("--drop-os-cache", action="store_true",
                        help="with --cold: the operating system's page cache emptied too before"
                        " each first visit (root; the whole machine's cache)")
    parser.add_argument("--warm-up", action="store_true",
                        help="with --cold: the console's warm-up runs after the caches are"
                        " emptied, before each first visit")
    args = parser.parse_args()
    if (args.drop_os_cache or args.warm_up) and not args.cold:
        parser.error("--drop-os-cache and --warm-up go with --cold")
    shape = Shape(orders=args.orders, clients=args.clients)
    url = args.database or _url(f"om_bench_console_{uuid.uuid4().hex[:8]}")
    try:
        if not args.database:
            t0 = time.monotonic()
            await prepare(url, shape)
            print(f"seeded in {time.monotonic() - t0:.0f} s", flush=True)
        print(f"measuring {args.requests} requests per page (in-process, one at a time) ...")
        in_db = InDatabase() if args.explain else None
        if in_db:
            in_db.install()
        rows = await measure(url, shape, args.requests,
                             [w for w in (args.only or "").split(",") if w], in_db, args.cold,
                             args.drop_os_cache, args.warm_up)
    finally:
        if args.keep or args.database:
            print(f"database kept: {url}")
        else:
            await drop(url)
    print(f"\nConsole page server time, {shape.orders:,} orders, {shape.clients:,} clients,"
          f" {args.requests} requests each ({platform.node()}, {os.cpu_count()} cores,"
          f" load {os.getloadavg()[0]:.1f}):\n")
    print("| page | p50 ms | p99 ms | max ms | first visits, max ms |\n"
          "| --- | ---: | ---: | ---: | ---: |")
    for name, p50, p99, worst, first in rows:
        print(f"| {name} | {p50:.1f} | {p99:.1f} | {worst:.1f} | {first:.1f} |")


if __name__ == "__main__":
    asyncio.run(main())
