"""stream_app.monitoring's contract with docker/: every metric name (and label) that the Grafana dashboard
(docker/grafana/nextaction.json) and the Prometheus alerts (docker/prometheus/alerts.yml) query is one the
worker or the trainer exposes, with the suffixes Prometheus gives each type (``_total`` of a counter;
``_bucket``/``_sum``/``_count`` of a histogram; none for a gauge); the scrape config reaches them.

The names come from the real registry (:data:`stream_app.monitoring.REGISTRY`, which the worker and the
trainer both serve); the PromQL is read by :func:`selectors` below, which knows PromQL's functions,
aggregations and keywords; the checker is shown to fail on a wrong name, a wrong suffix and a wrong label.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from stream_app import monitoring
from stream_app.settings import Settings

DOCKER = Path(__file__).resolve().parents[3] / "docker"
DASHBOARD = DOCKER / "grafana" / "nextaction.json"
PROMETHEUS = DOCKER / "prometheus" / "prometheus.yml"
ALERTS = DOCKER / "prometheus" / "alerts.yml"
#: Labels Prometheus adds to every scraped series (the target's).
TARGET_LABELS = {"job", "instance"}

SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count", "_created"),
            "summary": ("", "_sum", "_count", "_created"), "info": ("_info",), "unknown": ("",)}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset",
            "inf", "nan"}


def exposed() -> dict[str, set[str]]:
    """``{sample name: its label names}`` of everything the worker's and the trainer's /metrics can show."""
    labels_of: dict[str, tuple[str, ...]] = {}
    for collector in list(monitoring.REGISTRY._collector_to_names):  # noqa: SLF001 - the registry's collectors
        if isinstance(collector, monitoring.WorkerCollector):
            for name, _doc, labels in collector.FAMILIES:
                labels_of[name] = labels
        else:
            labels_of[collector._name] = collector._labelnames  # noqa: SLF001 - prometheus_client metric
    out: dict[str, set[str]] = {}
    for family in monitoring.REGISTRY.collect():
        labels = set(labels_of[family.name])
        for suffix in SUFFIXES[family.type]:
            out[family.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set()) | \
                ({"quantile"} if family.type == "summary" and not suffix else set())
    return out


def selectors(expr: str) -> tuple[list[tuple[str, set[str]]], set[str]]:
    """``([(metric name, label names matched)], grouping label names)`` of a PromQL expression.

    >>> found, grouping = selectors('sum by (le) (rate(x_bucket{job="w", le!=""}[5m])) / on() y')
    >>> [(name, sorted(labels)) for name, labels in found], grouping  # (sorted: a set prints in hash order)
    ([('x_bucket', ['job', 'le']), ('y', [])], {'le'})
    """
    found: list[tuple[int, str, set[str]]] = []
    grouping: set[str] = set()
    text = re.sub(r"\[[^\]]*\]", " ", expr)  # ranges, subqueries

    def selector(m: re.Match) -> str:
        labels = set(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", m.group(2)))
        found.append((m.start(), m.group(1) or "", labels))
        return " " * (m.end() - m.start())

    text = re.sub(r"([A-Za-z_:][A-Za-z0-9_:]*)?\s*\{([^}]*)\}", selector, text)

    def group(m: re.Match) -> str:
        grouping.update(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", m.group(2)))
        return " " * (m.end() - m.start())

    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", group, text)
    text = re.sub(r'"[^"]*"', " ", text)
    for m in re.finditer(r"(?<![\w.$])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?", text):
        if m.group(2) or m.group(1).lower() in KEYWORDS:
            continue  # a function or aggregation, or a keyword
        found.append((m.start(), m.group(1), set()))
    return [(name, labels) for _, name, labels in sorted(found) if name], grouping


def problems(expr: str, where: str, names: dict[str, set[str]]) -> list[str]:
    """What is wrong with ``expr``'s metric and label names (empty: nothing)."""
    out = []
    used, grouping = selectors(expr)
    if not used:
        out.append(f"{where}: no metric in {expr!r}")
    known_labels = set(TARGET_LABELS)
    for name, labels in used:
        if name not in names:
            near = [n for n in names if n.startswith(name) or name.startswith(n)]
            out.append(f"{where}: unknown metric {name!r} (exposed: {near or 'nothing like it'}) in {expr!r}")
            continue
        known_labels |= names[name]
        if labels - names[name] - TARGET_LABELS:
            out.append(f"{where}: {name!r} has no label {sorted(labels - names[name] - TARGET_LABELS)} in {expr!r}")
    if grouping - known_labels and all(n in names for n, _ in used):
        out.append(f"{where}: grouping by {sorted(grouping - known_labels)}, a label none of its metrics has, "
                   f"in {expr!r}")
    return out


def dashboard_queries(dashboard: dict) -> list[tuple[str, str]]:
    """``[(where, PromQL)]`` of every panel target, annotation and template variable of a Grafana dashboard."""
    out = []
    for panel in dashboard["panels"]:
        for nested in [panel, *panel.get("panels", [])]:
            for t in nested.get("targets", []):
                out.append((f"panel {nested['title']!r} {t['refId']}", t["expr"]))
    for a in dashboard["annotations"]["list"]:
        if "expr" in a:
            out.append((f"annotation {a['name']!r}", a["expr"]))
    for v in dashboard["templating"]["list"]:
        q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        m = re.fullmatch(r"label_values\((.*),\s*([A-Za-z_][A-Za-z0-9_]*)\)", q)
        assert m, f"variable {v['name']}: not a label_values() query: {q!r}"
        out.append((f"variable {v['name']!r}", m.group(1)))
        out.append((f"variable {v['name']!r} label", f'{m.group(1).split("{")[0]}{{{m.group(2)}=""}}'))
    return out


def alert_queries(rules: dict) -> list[tuple[str, str]]:
    return [(f"alert {r['alert']}", r["expr"]) for g in rules["groups"] for r in g["rules"]]


@pytest.fixture(scope="module")
def names() -> dict[str, set[str]]:
    return exposed()


def test_the_names_computed_from_the_registry_are_the_names_of_its_real_exposition(names):
    """What the suffix rules give includes every sample name /metrics really shows, and the rules are right
    for each type: a counter is only seen with ``_total``, a histogram with ``_bucket``/``_sum``/``_count``."""
    shown = {s.name for f in monitoring.REGISTRY.collect() for s in f.samples}
    assert shown <= set(names), shown - set(names)
    assert "nextaction_events_in_total" in names and "nextaction_events_in" not in names
    assert {"nextaction_batch_size_bucket", "nextaction_batch_size_sum", "nextaction_batch_size_count"} <= set(names)
    assert "nextaction_batch_size" not in names and "nextaction_queue_depth_total" not in names
    assert names["nextaction_events_rejected_total"] == {"reason"}
    assert names["nextaction_event_to_prediction_latency_seconds_bucket"] == {"le"}
    assert names["nextaction_consumer_lag_records"] == {"topic", "partition"}
    assert names["nextaction_online_prequential"] == {"version", "metric"}  # the trainer's, same registry


def test_every_dashboard_query_names_exposed_metrics_and_labels(names):
    dashboard = json.loads(DASHBOARD.read_text())
    queries = dashboard_queries(dashboard)
    assert len(queries) > 40
    assert [p for where, expr in queries for p in problems(expr, where, names)] == []
    used = {n for _, expr in queries for n, _ in selectors(expr)[0]}
    # the panels the dashboard promises (issue 16): throughput, latency histogram, batch sizes, dead letters
    # by reason, consumer lag, model versions, the online-learning figures
    assert {"nextaction_events_in_total", "nextaction_event_to_prediction_latency_seconds_bucket",
            "nextaction_batch_size_bucket", "nextaction_batch_size_sum", "nextaction_events_rejected_total",
            "nextaction_consumer_lag_records", "nextaction_model_served_info", "nextaction_online_prequential",
            "nextaction_online_drifts_total", "nextaction_online_published_total"} <= used


def test_every_alert_names_exposed_metrics_and_labels(names):
    queries = alert_queries(yaml.safe_load(ALERTS.read_text()))
    assert len(queries) >= 5
    assert [p for where, expr in queries for p in problems(expr, where, names)] == []


def test_the_check_fails_on_an_unknown_metric_a_wrong_suffix_or_label(names):
    bad = {
        "rate(nextaction_events_in[1m])": "unknown metric 'nextaction_events_in'",  # a counter without _total
        "nextaction_queue_depth_total": "unknown metric 'nextaction_queue_depth_total'",  # a gauge has no _total
        "histogram_quantile(0.99, sum by (le) (rate(nextaction_events_in_total_bucket[5m])))":
            "unknown metric 'nextaction_events_in_total_bucket'",
        "sum(rate(nextaction_batch_size[5m]))": "unknown metric 'nextaction_batch_size'",  # a histogram's bare name
        'nextaction_events_rejected_total{reasons="not_json"}': "has no label ['reasons']",
        "sum by (reasn) (rate(nextaction_events_rejected_total[5m]))": "grouping by ['reasn']",
        "sum(rate(nextaction_events_in_total[5m])) / sum(rate(nextaction_predictions_total[5m]))":
            "unknown metric 'nextaction_predictions_total'",
    }
    for expr, why in bad.items():
        found = problems(expr, "test", names)
        assert len(found) == 1 and why in found[0], (expr, found)
    # and in the real dashboard: one renamed metric is caught, where it is
    dashboard = json.loads(DASHBOARD.read_text())
    panel = next(p for p in dashboard["panels"] if p.get("targets"))
    panel["targets"][0]["expr"] = panel["targets"][0]["expr"].replace("nextaction_worker_info", "nextaction_workers")
    found = [p for where, expr in dashboard_queries(dashboard) for p in problems(expr, where, names)]
    assert len(found) == 1 and f"panel {panel['title']!r} A: unknown metric 'nextaction_workers'" in found[0]


def test_prometheus_scrapes_the_worker_and_trainer_ports_the_queries_name():
    config = yaml.safe_load(PROMETHEUS.read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    defaults = Settings()
    ports = {name: {sd["port"] for sd in j["dns_sd_configs"]} for name, j in jobs.items()}
    assert ports == {"nextaction-worker": {defaults.web_port}, "nextaction-trainer": {defaults.trainer_port}}
    assert all(j.get("metrics_path", "/metrics") == "/metrics" for j in jobs.values())
    queried = set()
    for _, expr in dashboard_queries(json.loads(DASHBOARD.read_text())) + alert_queries(yaml.safe_load(ALERTS.read_text())):
        queried |= set(re.findall(r'job="([^"]+)"', expr))
    assert queried == set(jobs)
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]


def test_compose_mounts_the_monitoring_files_that_exist():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    mounts = {}
    for service in ("prometheus", "grafana"):
        assert compose["services"][service]["profiles"] == ["monitoring"]
        for volume in compose["services"][service]["volumes"]:
            src, dst = volume.split(":")[:2]
            if src.startswith("./"):
                mounts[dst] = DOCKER / src[2:]
    assert all(p.exists() for p in mounts.values()), mounts
    assert mounts["/etc/prometheus/alerts.yml"] == ALERTS and mounts["/etc/prometheus/prometheus.yml"] == PROMETHEUS
    provider = yaml.safe_load((DOCKER / "grafana/provisioning/dashboards/nextaction.yml").read_text())
    assert mounts[provider["providers"][0]["options"]["path"] + "/nextaction.json"] == DASHBOARD
    source = yaml.safe_load((DOCKER / "grafana/provisioning/datasources/prometheus.yml").read_text())
    uids = {t["datasource"]["uid"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p.get("targets", [])}
    assert uids == {source["datasources"][0]["uid"]}
    for service in ("prometheus", "grafana"):  # loopback only, like the worker's port
        assert all(p.startswith("127.0.0.1:") for p in compose["services"][service]["ports"])
