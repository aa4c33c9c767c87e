"""The quick start's main job runs every worker: a worker left out of `scripts/run` leaves
its queue bound and filling with nobody consuming (webhooks and alerts once were)."""

from __future__ import annotations

import re
from pathlib import Path

from services.registry import WORKERS

ROOT = Path(__file__).resolve().parent.parent


def test_scripts_run_starts_every_worker_and_the_console() -> None:
    script = (ROOT / "scripts" / "run").read_text()
    [line] = [ln for ln in script.splitlines() if re.match(r"\s*ordermill run\b", ln)]
    names = line.split(">")[0].split()[2:]
    assert set(names) == {*WORKERS, "console"}, f"scripts/run starts {names}"


def test_the_readme_names_the_same_workers() -> None:
    readme = (ROOT / "README.md").read_text()
    named = re.search(r"`ordermill run ([a-z ]+) console`, as `\./scripts/run`", readme)
    assert named is not None
    assert set(named.group(1).split()) == set(WORKERS)
