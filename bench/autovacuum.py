"""The benches' stand-in for autovacuum (`--vacuum`), where the server's is off.

This machine's PostgreSQL runs with `autovacuum = off` (its configuration file); a production
server runs it. A bench that measured on tables never analyzed and never vacuumed measured
plans made for tables of unknown size and the dead rows of its earlier phases: PostgreSQL's
CPU an order at bench/sustained.py's steady rate was 13 % more than with autovacuum on, and
up to 25 % more than with this stand-in (docs/performance.md, "The bench's tables, vacuumed
as autovacuum would"). So pipeline.py, sustained.py and worker_cpu.py take `--vacuum
auto|always|never` (default auto: when the server's autovacuum is off) and `VACUUM (ANALYZE)`
the bench database between the warm-up and each timed phase, never inside one.

Only asyncpg: worker_cpu.py imports this without pipeline.py's imports.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import asyncpg

CHOICES = ("auto", "always", "never")  # --vacuum, as every bench that takes it means it
VACUUM_ANALYZE = "VACUUM (ANALYZE)"


async def autovacuum_off(database_url: str) -> bool:
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetchval("SHOW autovacuum") == "off"
    finally:
        await conn.close()


async def wanted(database_url: str, choice: str, what: str) -> bool:
    """--vacuum: `always`, `never`, or `auto`: when the server's autovacuum is off. When
    wanted, one line says `what` the bench will do."""
    yes = await autovacuum_off(database_url) if choice == "auto" else choice == "always"
    if yes:
        why = ": the server's autovacuum is off" if choice == "auto" else ""
        print(f"  {what} (--vacuum {choice}{why})", flush=True)
    return yes


async def vacuum(database_url: str, statement: str = VACUUM_ANALYZE) -> float:
    """What autovacuum would have done by now; the seconds it took (its own time and CPU are
    in no timed phase). `VACUUM_ANALYZE` between the warm-up and each timed phase;
    sustained.py's `VACUUM_TABLES` after each --volume chunk (the pruned rows' space made
    reusable, or the files grow with every chunk while the rows stay at the window's worth)."""
    started = time.perf_counter()
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()
    return round(time.perf_counter() - started, 2)


def report_line(what: str, choice: str, seconds: Mapping[str, Sequence[float]]) -> str:
    """The report's line for a bench's vacuums (--vacuum): `what` they were, then each run's
    (pipeline.py's pipelines, sustained.py's rounds) vacuums' seconds in order, as `vacuum`
    returned them: `VACUUM (ANALYZE) ... (--vacuum auto, in no phase's time): ordermill 0.4,
    0.3 s; bare 0.2, 0.2 s`."""
    return (f"{what} (--vacuum {choice}, in no phase's time): "
            + "; ".join(f"{name} {', '.join(f'{x:.1f}' for x in xs)} s"
                        for name, xs in seconds.items()))
