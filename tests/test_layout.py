"""How `ordermill run` lays its workers out in processes (services/layout.py), and the one
/metrics its supervisor serves for them (shared/metrics_merge.py): no process started here
(tests/test_processes.py runs the real thing)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from services import layout
from services.registry import WORKERS
from shared.metrics_merge import MergedCollector, Source, merge, parse

KNOWN = list(WORKERS)


def test_auto_runs_the_order_path_provisioning_and_the_rest_apart_on_two_cores() -> None:
    assert layout.plan(KNOWN, "auto", KNOWN, cpus=2) == [
        ["placement", "fraud"], ["provisioning", "review"], ["notify", "webhooks", "alerts"]]
    # One core: one process (a second would only take turns with the first).
    assert layout.plan(KNOWN, "AUTO", KNOWN, cpus=1) == [KNOWN]
    assert layout.plan(KNOWN, "1", KNOWN, cpus=8) == [KNOWN]


def test_the_cores_counted_are_no_more_than_the_cpu_quota(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # docker --cpus=1.5
    assert layout.usable_cpus(tmp_path) == min(2, len(os.sched_getaffinity(0)))
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    assert layout.usable_cpus(tmp_path) == 1
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert layout.usable_cpus(tmp_path) == len(os.sched_getaffinity(0))
    assert layout.usable_cpus(tmp_path / "nowhere") == len(os.sched_getaffinity(0))


def test_auto_keeps_only_the_groups_of_the_services_asked_for() -> None:
    assert layout.plan(["placement", "fraud"], "auto", KNOWN, cpus=4) == [["placement", "fraud"]]
    assert layout.plan(["notify", "fraud", "review"], "auto", KNOWN, cpus=4) == [
        ["fraud"], ["review"], ["notify"]]


def test_an_explicit_layout_groups_the_services_run_and_must_place_each() -> None:
    assert layout.plan(["placement", "fraud", "notify"], " placement / fraud,notify ", KNOWN) == [
        ["placement"], ["fraud", "notify"]]
    # One WORKER_PROCESSES for every deployment: a one-service run keeps its own group only.
    everything = "placement,fraud/provisioning,review/notify,webhooks,alerts"
    assert layout.plan(["provisioning"], everything, KNOWN) == [["provisioning"]]
    assert layout.plan(KNOWN, everything, KNOWN) == [
        ["placement", "fraud"], ["provisioning", "review"], ["notify", "webhooks", "alerts"]]


@pytest.mark.parametrize(("spec", "chosen", "message"), [
    ("placement/nosuch", ["placement"], "unknown service 'nosuch' in layout"),
    ("placement/placement", ["placement"], "service 'placement' is named twice"),
    ("placement//fraud", ["placement", "fraud"], "empty service name"),
    ("placement", ["placement", "fraud"], "places no fraud"),
    # Every worker run, one forgotten: said, not run without it (its queue would grow unseen).
    ("placement,fraud/provisioning,review/notify,webhooks", KNOWN, "places no alerts"),
])
def test_a_wrong_layout_says_what_is_wrong(spec: str, chosen: list[str], message: str) -> None:
    with pytest.raises(layout.LayoutError, match=message):
        layout.plan(chosen, spec, KNOWN)


# -- the merged /metrics ---------------------------------------------------------------------

def _process_metrics(consumed: float, backlog: float, connected: float, cpu: float) -> str:
    """What one worker process's /metrics says (its own registry, as prometheus_client writes it)."""
    registry = CollectorRegistry()
    Counter("ordermill_relay_events", "Events relayed.", registry=registry).inc(consumed)
    Gauge("ordermill_outbox_backlog", "Unpublished.", registry=registry).set(backlog)
    Gauge("ordermill_broker_connected", "Connected.", registry=registry).set(connected)
    Gauge("process_cpu_seconds_total", "CPU.", registry=registry).set(cpu)
    Histogram("ordermill_handler_seconds", "Handling.", ["queue"], buckets=(0.1, 1.0),
              registry=registry).labels(queue="q").observe(0.5)
    return generate_latest(registry).decode()


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_the_merged_metrics_sum_counters_keep_gauges_and_label_each_process() -> None:
    sources = [Source("placement,fraud", parse(_process_metrics(3, 7, 1, 2.5)), up=True),
               Source("notify", parse(_process_metrics(4, 7, 0, 1.5)), up=False)]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MergedCollector(lambda: sources))
    text = generate_latest(registry).decode()
    samples = _samples(text)  # parses: no family twice (the text format's own check)
    assert samples[("ordermill_relay_events_total", ())] == 7  # summed
    assert samples[("ordermill_outbox_backlog", ())] == 7  # the same count, once
    assert samples[("ordermill_broker_connected", ())] == 0  # connected only if all are
    assert samples[("ordermill_handler_seconds_count", (("queue", "q"),))] == 2
    assert samples[("ordermill_handler_seconds_bucket", (("le", "1.0"), ("queue", "q")))] == 2
    assert samples[("process_cpu_seconds_total", (("process", "placement,fraud"),))] == 2.5
    assert samples[("process_cpu_seconds_total", (("process", "notify"),))] == 1.5
    assert samples[("ordermill_process_up", (("process", "notify"),))] == 0
    assert samples[("ordermill_process_up", (("process", "placement,fraud"),))] == 1
    assert not any(name.endswith("_created") for name, _ in samples)
    assert text.count("# TYPE ordermill_relay_events_total counter") == 1


def test_an_outage_in_any_process_is_an_outage() -> None:
    def outage(value: float) -> Source:
        registry = CollectorRegistry()
        Gauge("ordermill_database_outage", "Outage.", registry=registry).set(value)
        return Source("p", parse(generate_latest(registry).decode()), up=True)

    [family] = merge([outage(0), outage(1), outage(0)])
    assert [s.value for s in family.samples] == [1]
