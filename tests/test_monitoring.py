"""deploy/monitoring/: the alert rules and the Grafana dashboard name only metrics the code
exports, with the shapes Prometheus and Grafana read; `promtool` checks the rules and the
exposition when Debian's prometheus package provides it (skipped with the reason if not).
The structural checks need no promtool and are never skipped."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.validation import METRIC_NAME_RE

import shared.metrics as metrics
import shared.runtime.middleware.metrics  # noqa: F401  (the message metrics, registered)
from cli.exporter import DOMAIN_GAUGES, QueueGauges, SourcesUp
from shared.errors import RejectKind
from shared.metrics import DatabaseGauges, ProcessState, StateGauge
from shared.metrics_merge import MergedCollector

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "deploy" / "monitoring"
RULES = MONITORING / "prometheus" / "alerts.yml"
SCRAPE = MONITORING / "prometheus" / "prometheus.yml"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "ordermill.json"
PROMTOOL = shutil.which("promtool")
NO_PROMTOOL = "promtool not installed (Debian: apt-get install prometheus)"
# Series Prometheus itself adds to every scrape.
PROMETHEUS_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
            "gauge": ("",), "summary": ("", "_sum", "_count", "_created"), "info": ("_info",)}


def _state_gauges() -> list[StateGauge]:
    return [*(v for v in vars(metrics).values() if isinstance(v, StateGauge)), *DOMAIN_GAUGES]


def worker_collectors() -> list[Any]:
    """What a worker serves besides the default registry: its database gauges (all of them:
    relay, jobs, emails) and its process state, described without a database."""
    gauges = [g for g in _state_gauges() if g not in DOMAIN_GAUGES]
    return [DatabaseGauges(None, gauges, ttl=5), ProcessState(lambda: False, lambda: True),
            MergedCollector(lambda: [])]  # a supervisor's own (shared/runtime/supervisor.py)


def exporter_collectors() -> list[Any]:
    database = DatabaseGauges(None, DOMAIN_GAUGES, ttl=5)
    queues = QueueGauges(None, None, ttl=5)  # type: ignore[arg-type]
    return [database, queues, SourcesUp(database, queues)]


def families() -> list[Any]:
    """Every family the code exports (described: the scrape-time ones have no samples here)."""
    found = list(REGISTRY.collect())
    for collector in (*worker_collectors(), *exporter_collectors()):
        found += list(collector.describe())
    return found


def exported_series() -> dict[str, str]:
    """Every series name the code can export (sample names: `_total`, `_bucket`, ...) -> type."""
    out: dict[str, str] = {}
    for family in families():
        for suffix in SUFFIXES.get(family.type, ("",)):
            out[family.name + suffix] = family.type
    return out


def ordermill_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (label values in quotes left out)."""
    without_strings = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)
    return set(re.findall(r"\bordermill_[a-zA-Z0-9_]+", without_strings))


def rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panel_exprs() -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in dashboard()["panels"] for t in p.get("targets", [])]


# -- the names ---------------------------------------------------------------------------------

def test_every_metric_follows_prometheus_naming() -> None:
    series = exported_series()
    assert {n for n in series if n.startswith("ordermill_")}
    for family in families():
        if family.name.startswith("ordermill_"):
            assert METRIC_NAME_RE.match(family.name), family.name
            assert family.documentation, f"{family.name} has no help text"
            if family.type == "counter":  # counters are named for what they count, _total
                assert family.name + "_total" in series
            else:
                assert not family.name.endswith("_total"), f"{family.name}: only counters end so"
            if "seconds" in family.name:
                assert family.name.endswith("_seconds"), f"{family.name}: the unit last"
            for unit in ("_milliseconds", "_ms", "_minutes", "_hours"):
                assert unit not in family.name, f"{family.name}: base units"


def test_labels_are_bounded() -> None:
    """No label that could hold an order, a client, a message id or outside text."""
    unbounded = {"order", "order_id", "order_ref", "client", "client_id", "email", "message_id",
                 "id", "reason_text", "error", "storefront", "user", "recipient"}
    for family in families():
        assert not unbounded & set(_labels_of(family.name)), family.name
        for sample in family.samples:
            assert not unbounded & set(sample.labels), (family.name, sample.labels)
    assert metrics.MESSAGES_REJECTED._labelnames == ("queue", "route", "reason")
    assert {kind.value for kind in RejectKind} == {"properties", "no_route", "publisher", "malformed",
                                          "invalid", "duplicate_id", "refused", "prepare_failed",
                                          "handler_error", "transient"}


# -- the alert rules -----------------------------------------------------------------------

def test_alert_rules_are_well_formed_and_name_only_exported_metrics() -> None:
    """Never skipped: what promtool would refuse in shape, and what it cannot know (a metric
    name the code does not export, which would make an alert silently never fire)."""
    series = exported_series()
    found = rules()
    names = [r["alert"] for r in found]
    assert len(names) == len(set(names)), "alert names repeat"
    for rule in found:
        assert set(rule) <= {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}, rule
        assert re.fullmatch(r"[A-Z][A-Za-z0-9]+", rule["alert"]), rule["alert"]
        assert isinstance(rule["expr"], str) and rule["expr"].strip()
        assert re.fullmatch(r"\d+[smh]", str(rule.get("for", "0s"))), rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        used = ordermill_names(rule["expr"])
        missing = used - set(series)
        assert not missing, f"{rule['alert']}: {sorted(missing)} not exported by the code"
        assert used or "up{" in rule["expr"], f"{rule['alert']} reads no Ordermill metric"
    # What the issue asks an alert for, each present.
    wanted = {"OrdermillDeadLetters": "ordermill_dead_letters",
              "OrdermillSetupParked": "ordermill_setups_parked",
              "OrdermillOutboxStale": "ordermill_outbox_oldest_age_seconds",
              "OrdermillQueueWithoutConsumer": "ordermill_queue_consumers",
              "OrdermillReviewWaitingTooLong": "ordermill_orders_awaiting_review_oldest_age_seconds"}
    by_name = {r["alert"]: r for r in found}
    for alert, metric in wanted.items():
        assert metric in by_name[alert]["expr"], alert
    assert "> 60" in by_name["OrdermillOutboxStale"]["expr"]
    assert re.search(r"\bup\{[^}]*\}\s*==\s*0", by_name["OrdermillWorkerDown"]["expr"])
    # The scrape config loads these rules (mounted where it looks) and names the jobs they read.
    scrape = yaml.safe_load(SCRAPE.read_text())
    assert scrape["rule_files"] == ["/etc/prometheus/alerts.yml"]
    jobs = {c["job_name"] for c in scrape["scrape_configs"]}
    assert {"ordermill-workers", "ordermill-exporter"} <= jobs
    for job in re.findall(r'job=~"([^"]+)"', by_name["OrdermillWorkerDown"]["expr"]):
        assert set(job.split("|")) <= jobs


@pytest.mark.skipif(PROMTOOL is None, reason=NO_PROMTOOL)
def test_promtool_checks_the_rules() -> None:
    result = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


@pytest.mark.skipif(PROMTOOL is None, reason=NO_PROMTOOL)
def test_a_worker_process_that_stops_answering_behind_its_supervisor_alerts(tmp_path: Path) -> None:
    """The supervisor still answers (`up` 1) and keeps the silent process's last metrics
    (connected, no outage): only ordermill_process_up says it, and a rule must read it."""
    (tmp_path / "alerts.yml").write_text(RULES.read_text())
    [rule] = [r for r in rules() if r["alert"] == "OrdermillWorkerProcessDown"]
    series = 'ordermill_process_up{job="ordermill-workers",instance="vm1:9101",process="%s"}'
    (tmp_path / "test.yml").write_text(yaml.safe_dump({
        "rule_files": ["alerts.yml"], "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": [
            {"series": series % "provisioning,review", "values": "1 0 0 0 0"},
            {"series": series % "placement,fraud", "values": "1 1 1 1 1"},
            {"series": 'up{job="ordermill-workers",instance="vm1:9101"}', "values": "1 1 1 1 1"}],
            "alert_rule_test": [{"eval_time": "4m", "alertname": "OrdermillWorkerProcessDown",
                                 "exp_alerts": [{"exp_labels": {
                                     "severity": "critical", "job": "ordermill-workers",
                                     "instance": "vm1:9101", "process": "provisioning,review"},
                                     "exp_annotations": {
                                         "summary": "worker process provisioning,review on"
                                                    " vm1:9101 does not answer",
                                         "description": rule["annotations"]["description"]}}]},
                                {"eval_time": "4m", "alertname": "OrdermillWorkerDown",
                                 "exp_alerts": []}]}]}))
    result = subprocess.run([PROMTOOL, "test", "rules", str(tmp_path / "test.yml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(PROMTOOL is None, reason=NO_PROMTOOL)
def test_promtool_checks_the_scrape_config(tmp_path: Path) -> None:
    config = yaml.safe_load(SCRAPE.read_text())
    (tmp_path / "alerts.yml").write_text(RULES.read_text())
    config["rule_files"] = [str(tmp_path / "alerts.yml")]  # where the container mounts it
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    result = subprocess.run([PROMTOOL, "check", "config", str(tmp_path / "prometheus.yml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(PROMTOOL is None, reason=NO_PROMTOOL)
def test_promtool_lints_what_the_code_exports() -> None:
    """`promtool check metrics`: Prometheus' own naming lint, on the exposition of every metric
    (a child of each labelled one, so no family is left out)."""
    registry = CollectorRegistry()
    registry.register(_Everything())
    text = generate_latest(registry)
    result = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True,
                            timeout=60)
    assert result.returncode == 0, (result.stdout + result.stderr).decode()


class _Everything:
    """Every ordermill family, with one sample per labelled family (labels filled in)."""

    def collect(self):
        from prometheus_client.core import Metric

        for family in families():
            if not family.name.startswith("ordermill_"):
                continue
            out = Metric(family.name, family.documentation, family.type)
            out.samples = family.samples or _sample_set(family.name, family.type,
                                                        _labels_of(family.name))
            yield out


def _labels_of(name: str) -> tuple[str, ...]:
    for value in vars(metrics).values():
        if getattr(value, "_name", None) == name:
            return value._labelnames
    for gauge in _state_gauges():
        if gauge.name == name:
            return gauge.labels
    return {"ordermill_queue_messages": ("queue",), "ordermill_queue_consumers": ("queue",),
            "ordermill_dead_letters": ("queue",), "ordermill_exporter_source_up": ("source",)
            }.get(name, ())


def _sample_set(name: str, kind: str, labels: tuple[str, ...]):
    from prometheus_client.samples import Sample

    values = dict.fromkeys(labels, "x")
    if kind == "counter":
        return [Sample(name + "_total", values, 1.0)]
    if kind == "histogram":
        return [Sample(name + "_bucket", {**values, "le": "+Inf"}, 1.0),
                Sample(name + "_count", values, 1.0), Sample(name + "_sum", values, 0.1)]
    return [Sample(name, values, 1.0)]


# -- the dashboard -------------------------------------------------------------------------

def test_the_dashboard_parses_and_names_only_exported_metrics() -> None:
    series = exported_series()
    board = dashboard()
    assert board["uid"] and board["title"] and board["panels"]
    exprs = panel_exprs()
    assert exprs
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for title, expr in exprs:
        used = ordermill_names(expr)
        assert used or re.search(r"\bup\{", expr), f"{title}: {expr} reads no Ordermill metric"
        assert not used - set(series), f"{title}: {sorted(used - set(series))} not exported"
        assert expr.count("(") == expr.count(")"), f"{title}: {expr}"
        if "histogram_quantile" in expr:
            assert "_bucket" in expr and "le" in expr, title
        for name in used:  # rate() of counters and histograms, never of a gauge
            if series[name] == "gauge":
                assert not re.search(rf"rate\(\s*{name}\b", expr), f"{title}: rate of a gauge"
            if series[name] == "counter":
                assert re.search(rf"(rate|increase)\(\s*{name}", expr), f"{title}: a raw counter"
    # Panels for what operators watch (the list).
    text = " ".join(e for _, e in exprs)
    for metric in ("ordermill_messages_acked_total", "ordermill_messages_rejected_total",
                   "ordermill_queue_messages", "ordermill_outbox_oldest_age_seconds",
                   "ordermill_jobs", "ordermill_orders_awaiting_review"):
        assert metric in text, f"no panel shows {metric}"
    # Every panel reads the provisioned data source, by the uid it is provisioned with.
    datasource = yaml.safe_load(
        (MONITORING / "grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    for panel in board["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": uid}, panel["title"]
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((MONITORING / "grafana/provisioning/dashboards/ordermill.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


def test_rule_and_dashboard_checks_catch_an_unknown_metric() -> None:
    """The structural check can fail: a misspelt metric is found."""
    series = exported_series()
    assert ordermill_names('sum(ordermill_dead_leters{queue=~"ordermill_x"}) > 0') == {
        "ordermill_dead_leters"}
    assert "ordermill_dead_leters" not in series and "ordermill_dead_letters" in series
