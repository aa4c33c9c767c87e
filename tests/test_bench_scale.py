"""bench/scale.py's report (issue 15, target 1): the seeded side against the empty one, each
read's warm p99 and its first visits' slowest judged apart against 50 ms, so that a view's
p99 does not depend on how many of its sample paths happened to be first visits."""

from __future__ import annotations

from typing import Any

from bench import scale


def _read(name: str, p50: float, p99: float, first: float) -> dict[str, Any]:
    return {"read": name, "p50_ms": p50, "p99_ms": p99, "max_ms": p99, "first_max_ms": first}


def _burst(side: str, config: str, rate: float) -> dict[str, Any]:
    return {"side": side, "config": config, "orders_per_second": rate}


def test_warm_p99_and_first_visits_are_judged_apart() -> None:
    config = next(iter(scale.CONFIGS))
    data = {
        "bursts": [_burst("empty", config, 300.0), _burst("seeded", config, 260.0)],
        "reads": {
            "empty": [_read("console filtered", 3.3, 19.6, 25.0), _read("CLI show", 2.0, 4.0, 6.0)],
            "seeded": [_read("console filtered", 14.4, 31.2, 69.3),
                       _read("CLI show", 2.1, 55.0, 12.0)],
        },
    }
    summary = scale.summary(data)
    filtered = summary["reads"]["console filtered"]
    assert filtered["met"] and not filtered["first_met"]
    assert filtered["seeded_first_max_ms"] == 69.3 and filtered["empty_p99_ms"] == 19.6
    show = summary["reads"]["CLI show"]
    assert not show["met"] and show["first_met"]
    throughput = summary["throughput"][config]
    assert throughput["ratio"] == round(260.0 / 300.0, 2) and not throughput["met"]
