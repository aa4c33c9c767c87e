"""What the console's exact counts cost (GET /orders/count: console.order_list.exact_count) on
a seeded database, next to the list's budgeted count for the same filters: each filter's
exact count run three times (ms each: the first may read pages not in shared buffers).

    PYTHONPATH=. .venv/bin/python bench/console_exact_counts.py --database URL

A database seeded by bench/console_pages.py --keep (its products: business, launch)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from console import order_list  # noqa: E402
from console.order_list import OrderFilters  # noqa: E402
from shared import db  # noqa: E402

FILTERS = [dict(status="Fraud", product="business", since="2021-02-01"),
           dict(status="Cancelled", product="launch", since="2019-01-01"),
           dict(status="all", flagged="1", product="business"),
           dict(status="all", product="launch"), dict(status="Active", product="launch"),
           dict(status="Active", product="business", since="2020-01-01"),
           dict(status="all", product="business"), dict(status="all"),
           dict(status="Active", since="2020-01-01")]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database", required=True)
    args = parser.parse_args()
    conn = await asyncpg.connect(args.database)
    await db.init_connection(conn)
    try:
        print(f"load {os.getloadavg()[0]:.1f}")
        for params in FILTERS:
            f = OrderFilters.of(params)
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                n = await order_list.exact_count(conn, f, 30)
                times.append((time.perf_counter() - t0) * 1000)
            (shown, more), partial = await order_list.list_count(conn, f)
            listed = f"at least {shown:,}" if partial else f"{shown:,}{'+' if more else ''}"
            query = "&".join(f"{k}={v}" for k, v in params.items())
            print(f"{query:55} exact {n:>9,}  the list: {listed:>12}  ms"
                  f" {' '.join(f'{t:.0f}' for t in times)}")
    finally:
        await conn.close()


if __name__ == "__main__":
    asyncio.run(main())
