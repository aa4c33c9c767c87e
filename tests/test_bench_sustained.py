"""bench/sustained.py names each worker process by the services it runs, so its report can
say which group of services costs what an order (`worker ms/order by process`); it records
what its vacuums (--vacuum, bench/autovacuum.py) took, between the phases of a round and
after each --volume chunk. Its phases and worker are faked here; the vacuums run on the
test's own database."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

import asyncpg
import psutil
import pytest

from shared.settings import Settings


@pytest.fixture
def sustained(benches: Callable[[str], ModuleType]) -> ModuleType:
    return benches("sustained")


def test_worker_processes_are_named_by_their_services(sustained: ModuleType) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)",
                              "--processes", "1", "notify", "webhooks", "alerts"])
    parent = subprocess.Popen(["bash", "-c", "sleep 30 & wait"], start_new_session=True)
    lone = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        deadline = time.monotonic() + 10
        while not psutil.Process(parent.pid).children() and time.monotonic() < deadline:
            time.sleep(0.05)  # the parent's child started
        assert sustained.process_label(child.pid) == "notify,webhooks,alerts"
        assert sustained.process_label(parent.pid) == "supervisor"
        assert sustained.process_label(lone.pid) == "worker"
    finally:
        os.killpg(parent.pid, signal.SIGKILL)  # its sleep too
        for p in (child, parent, lone):
            p.kill()
            p.wait()
    assert sustained.process_label(child.pid) == str(child.pid)  # gone: its pid


def test_processes_of_one_label_are_added(sustained: ModuleType) -> None:
    lone = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
            for _ in range(2)]
    try:
        seconds = {lone[0].pid: 1.0, lone[1].pid: 0.5}
        assert sustained.by_process(seconds, 100) == {"worker": 15.0}
    finally:
        for p in lone:
            p.kill()
            p.wait()


# -- --vacuum: what the vacuums took, in the JSON and the report ------------------------------


class FakeWorker:
    pids: list[int] = []
    peak_rss = 0
    log_path = "-"

    async def stop(self) -> None:
        pass


FAKE_RATE = 50.0  # orders/s, every rate of a phase without_a_worker says done


@pytest.fixture
def without_a_worker(sustained: ModuleType, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """No worker, no broker: each phase is said done at once (its orders and CPU made up), and
    each vacuum (the real one, on the test's database) is noted in order with the phases."""
    said: list[str] = []

    async def with_worker(*args: Any, **kwargs: Any) -> tuple[FakeWorker, None, None]:
        return FakeWorker(), None, None

    async def phase(self: Any, label: str, orders: list[tuple[str, bool]], rate: float | None,
                    *, wait_mail: bool = True) -> dict[str, Any]:
        said.append(label)
        return {"orders": len(orders), "worker_cpu_ms_per_order": 1.0,
                **dict.fromkeys(sustained.REFERENCES.values(), FAKE_RATE)}

    vacuum = sustained.autovacuum.vacuum

    async def noted(database_url: str, statement: str = sustained.autovacuum.VACUUM_ANALYZE) -> float:
        said.append(statement)
        return await vacuum(database_url, statement)

    monkeypatch.setattr(sustained, "with_worker", with_worker)
    monkeypatch.setattr(sustained.Run, "phase", phase)
    monkeypatch.setattr(sustained.autovacuum, "vacuum", noted)
    monkeypatch.setattr(sustained, "STATS_FLUSH_SECONDS", 0)
    return said


ANALYZED = ("SELECT count(*) FROM pg_stat_user_tables WHERE last_analyze IS NOT NULL"
            " AND relname IN ('orders', 'outbox')")


@pytest.mark.parametrize("vacuum", [True, False])
async def test_a_round_records_its_vacuums_seconds_for_the_json_and_the_report(
        sustained: ModuleType, without_a_worker: list[str], db_settings: Settings,
        pool: asyncpg.Pool, vacuum: bool) -> None:
    opts = sustained.parse_args(["--warmup", "2", "--orders", "3", "--seconds", "1"])
    opts.vacuum_phases = vacuum  # what run_bench makes of --vacuum on the server
    bench = sustained.Bench("t", db_settings)
    r = await sustained.sustained_round(bench, None, sustained.Orders("t", 0.9), opts,
                                        "default", {})
    rate = opts.rate_share * FAKE_RATE  # what the steady phase asks of the fake burst
    phases = ["default: warm-up", "default: burst", f"default: steady {rate:g}/s"]
    if vacuum:
        assert without_a_worker == [phases[0], "VACUUM (ANALYZE)", phases[1],
                                    "VACUUM (ANALYZE)", phases[2]]
        assert len(r["vacuum_seconds"]) == 2
        assert all(isinstance(x, float) and x >= 0 for x in r["vacuum_seconds"])
        assert await pool.fetchval(ANALYZED) == 2
    else:
        assert without_a_worker == phases
        assert r["vacuum_seconds"] == []
        assert await pool.fetchval(ANALYZED) == 0
    data = json.loads(json.dumps({"options": vars(opts), "rounds": [{"round": 1, **r}]}))
    assert data["rounds"][0]["vacuum_seconds"] == r["vacuum_seconds"]  # as written
    line = sustained.vacuum_line(data)
    if vacuum:
        first, second = r["vacuum_seconds"]
        assert line == ("VACUUM (ANALYZE) after the warm-up and after the burst (--vacuum auto,"
                        f" in no phase's time): round 1 default {first:.1f}, {second:.1f} s")
    else:
        assert line is None


def test_the_report_line_names_each_round(sustained: ModuleType) -> None:
    data = {"options": {"vacuum": "always", "vacuum_phases": True},
            "rounds": [{"round": 1, "label": "linger 0", "vacuum_seconds": [0.42, 1.06]},
                       {"round": 1, "label": "linger 25", "vacuum_seconds": [0.5, 0.61]}]}
    assert sustained.vacuum_line(data) == (
        "VACUUM (ANALYZE) after the warm-up and after the burst (--vacuum always, in no phase's"
        " time): round 1 linger 0 0.4, 1.1 s; round 1 linger 25 0.5, 0.6 s")


@pytest.mark.parametrize(("choice", "chunks"), [("always", 2), ("never", 1)])
async def test_volume_vacuums_the_bounded_tables_after_each_chunk(
        sustained: ModuleType, without_a_worker: list[str], db_settings: Settings,
        choice: str, chunks: int) -> None:
    """--volume's own path (its worker and bursts faked): after each chunk, VACUUM of the
    bounded tables when --vacuum wants it, its seconds in the chunk's checkpoint; then the
    final prune. (A local bool named `vacuum` once hid the vacuum function on this path, and nothing
    ran it: a crash only a real --volume run met.)"""
    opts = sustained.parse_args(["--volume", str(2 * chunks), "--chunk", "2",
                                 "--vacuum", choice, "--window", "0.01"])
    bench = sustained.Bench("t", db_settings)
    v = await sustained._volume(bench, None, sustained.Orders("t", 0.9), opts)
    vacuums = [sustained.VACUUM_TABLES] if choice == "always" else []
    assert without_a_worker == [said for n in range(chunks)
                                for said in (f"volume {2 * (n + 1)}", *vacuums)]
    assert v["vacuum_each_chunk"] is (choice == "always")
    assert [c["orders"] for c in v["checkpoints"]] == [2 * (n + 1) for n in range(chunks)]
    for c in v["checkpoints"]:
        if choice == "always":
            assert c["vacuumed"] is True and isinstance(c["vacuum_seconds"], float)
        else:
            assert c["vacuumed"] is False and c["vacuum_seconds"] is None
        assert set(c["tables"]) == {*sustained.BOUNDED_TABLES, "orders"}
    json.dumps(v)  # as volume.json has it
