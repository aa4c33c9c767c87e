"""A bench script runs with bench/ first on sys.path, so a file there named like one of
Ordermill's packages shadows that package for every bench script (bench/console.py once made
`bench/pipeline.py` fail importing cli.main -> console.accounts)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_no_bench_script_shadows_a_package_of_the_repository() -> None:
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert {"cli", "console", "shared", "services"} <= packages
    scripts = {p.stem for p in (ROOT / "bench").glob("*.py")}
    assert not scripts & packages, f"rename bench/{sorted(scripts & packages)}.py"
