"""A bench script runs with bench/ first on sys.path, so a file there named like one of
Ordermill's packages shadows that package for every bench script (bench/console.py once made
`bench/pipeline.py` fail importing cli.main -> console.accounts). And what the benches share:
`--vacuum`, their stand-in for autovacuum where the server's is off (bench/autovacuum.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import asyncpg
import pytest

from bench import autovacuum
from shared.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def test_no_bench_script_shadows_a_package_of_the_repository() -> None:
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert {"cli", "console", "shared", "services"} <= packages
    scripts = {p.stem for p in (ROOT / "bench").glob("*.py")}
    assert not scripts & packages, f"rename bench/{sorted(scripts & packages)}.py"


# -- --vacuum: the benches' stand-in for autovacuum (bench/autovacuum.py) ---------------------


@pytest.mark.parametrize("name", ["pipeline", "sustained", "worker_cpu"])
def test_every_bench_takes_vacuum_auto_always_never_default_auto(
        benches: Callable[[str], ModuleType], name: str) -> None:
    parse_args = benches(name).parse_args
    assert parse_args([]).vacuum == "auto"
    for choice in ("auto", "always", "never"):
        assert parse_args(["--vacuum", choice]).vacuum == choice
    with pytest.raises(SystemExit):
        parse_args(["--vacuum", "sometimes"])


@pytest.mark.parametrize(("choice", "server_off", "wanted"), [
    ("auto", True, True), ("auto", False, False), ("always", False, True), ("always", True, True),
    ("never", True, False), ("never", False, False)])
async def test_vacuum_auto_follows_the_servers_autovacuum(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        choice: str, server_off: bool, wanted: bool) -> None:
    async def off(database_url: str) -> bool:
        return server_off

    monkeypatch.setattr(autovacuum, "autovacuum_off", off)
    assert await autovacuum.wanted("postgresql://unused/x", choice, "VACUUM it") is wanted
    said = capsys.readouterr().out
    assert said == ((f"  VACUUM it (--vacuum {choice}"
                     + (": the server's autovacuum is off" if choice == "auto" else "") + ")\n")
                    if wanted else "")


async def test_autovacuum_off_reads_the_servers_setting(pool: asyncpg.Pool,
                                                        db_settings: Settings) -> None:
    setting = await pool.fetchval("SELECT setting FROM pg_settings WHERE name = 'autovacuum'")
    assert await autovacuum.autovacuum_off(db_settings.database_url) is (setting == "off")


async def test_a_runs_vacuum_analyzes_the_bench_database_when_wanted(
        pool: asyncpg.Pool, db_settings: Settings, benches: Callable[[str], ModuleType]) -> None:
    """PipelineRun.vacuum (before each timed phase after the warm-up): VACUUM (ANALYZE) of the
    whole database, its seconds recorded for the report and its counters kept out of the
    run's per order; nothing without --vacuum's yes."""
    pipeline = benches("pipeline")
    analyzed = "SELECT count(*) FROM pg_stat_user_tables WHERE last_analyze IS NOT NULL" \
               " AND last_vacuum IS NOT NULL AND relname IN ('orders', 'outbox')"
    idle = pipeline.PipelineRun("ordermill", None, None, None, None)
    await idle.vacuum()
    assert idle.vacuum_seconds == []
    assert await pool.fetchval(analyzed) == 0
    run = pipeline.PipelineRun("ordermill", None, None, None, None, vacuum_settings=db_settings)
    before = await pipeline.database_counters(db_settings)
    await run.vacuum()
    assert len(run.vacuum_seconds) == 1
    assert await pool.fetchval(analyzed) == 2
    assert run.vacuum_counts["buffer_accesses"] > 0
    run.orders_done = 1
    run.add_per_order(before, {k: before[k] + run.vacuum_counts[k] for k in before})
    assert set(run.per_order.values()) == {0}
