"""One /metrics for an `ordermill run` whose workers run in several processes.

Each worker process serves its metrics on a port of its own on 127.0.0.1; the supervisor
reads them all before answering a scrape and merges them, so Prometheus keeps one target
and every rule and dashboard keeps its meaning:

- a process's own families (`process_*`, `python_*`: CPU, memory, file descriptors, GC) get
  a `process` label naming the process's services (the supervisor's: `supervisor`);
- counters, histograms and summaries with the same labels are summed (a worker runs in one
  process, so its series come from one; the relay's and the housekeeper's come from each);
  their `_created` samples are left out (a process's start, which the text format gives
  as a gauge of its own; the sum has none);
- gauges with the same labels take the largest: counts read from the database are the same
  number in every process, and "in an outage" is 1 if any process is in one; except
  `ordermill_broker_connected`, the smallest (connected only if every process is).

`ordermill_process_up{process}` says which processes answered; one that did not answer is
counted with the last metrics it gave (its counters never seem to go back)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector, CollectorRegistry

PER_PROCESS = ("process_", "python_")
SMALLEST = frozenset({"ordermill_broker_connected"})
CREATED = "_created"
SUMMED = frozenset({"counter", "histogram", "summary", "gaugehistogram"})


@dataclass
class Source:
    """One process's metrics as last read: its label, its families, whether it answered."""

    label: str
    families: list[Metric]
    up: bool


def parse(text: str) -> list[Metric]:
    return list(text_string_to_metric_families(text))


def from_registry(registry: CollectorRegistry) -> list[Metric]:
    return list(registry.collect())


def merge(sources: Sequence[Source]) -> list[Metric]:
    """The families of every source merged as the module says, in the order first seen."""
    merged: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for source in sources:
        for family in source.families:
            if family.name.endswith(CREATED):  # parsed from text: `_created` as its own gauge
                continue
            own = family.name.startswith(PER_PROCESS)
            target = merged.get(family.name)
            if target is None:
                target = merged[family.name] = Metric(family.name, family.documentation, family.type)
                values[family.name] = {}
            samples = values[family.name]
            for sample in family.samples:
                if sample.name.endswith(CREATED):
                    continue
                labels = dict(sample.labels)
                if own:
                    labels["process"] = source.label
                key = (sample.name, tuple(sorted(labels.items())))
                old = samples.get(key)
                samples[key] = sample.value if old is None else _combine(family, old, sample.value)
    for name, family in merged.items():
        for (sample_name, labels), value in values[name].items():
            family.add_sample(sample_name, dict(labels), value)
    return list(merged.values())


def _combine(family: Metric, old: float, new: float) -> float:
    if family.type in SUMMED:
        return old + new
    if family.name in SMALLEST:
        return min(old, new)
    return max(old, new)


class MergedCollector(Collector):
    """Collects what `sources()` holds, merged, and which processes answered."""

    def __init__(self, sources: Callable[[], Sequence[Source]]) -> None:
        self.sources = sources

    def describe(self) -> list[Metric]:
        """Its own family (the merged ones are the processes')."""
        return [_process_up()]

    def collect(self) -> Iterator[Metric]:
        sources = self.sources()
        yield from merge(sources)
        up = _process_up()
        for source in sources:
            up.add_metric([source.label], 1.0 if source.up else 0.0)
        yield up


def _process_up() -> GaugeMetricFamily:
    return GaugeMetricFamily("ordermill_process_up",
                             "1 when the worker process answered this scrape (its services in"
                             " the label), else 0.", labels=["process"])
