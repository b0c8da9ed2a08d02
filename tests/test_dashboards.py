"""Grafana provisioning and dashboards, checked against the metrics the daemons export."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from batch.metrics import NightlyMetrics
from serving.metrics import ServingMetrics
from stream.lander import LanderMetrics
from stream.metrics import TrainerMetrics

ROOT = Path(__file__).resolve().parent.parent
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "recstream.yml"
DASHBOARDS_MOUNT = "/var/lib/grafana/dashboards"
PROVISIONING_MOUNT = "/etc/grafana/provisioning"

# Prometheus adds these to every scraped series.
TARGET_LABELS = frozenset({"job", "instance"})
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
}

METRIC = re.compile(r"\b(recstream_\w+)(?=[\s{\[)]|$)")
SELECTOR = re.compile(r"\b(recstream_\w+)\s*\{([^}]*)\}")
MATCHER = re.compile(r"(\w+)\s*(?:=~|!~|!=|=)")
QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')
BY = re.compile(r"\bby\s*\(([^)]*)\)")


def exported_series() -> dict[str, frozenset[str]]:
    """Every series name the daemons' registries can export, with its label names."""
    series: dict[str, frozenset[str]] = {}
    for registry in (TrainerMetrics().registry, LanderMetrics().registry,
                     ServingMetrics().registry, NightlyMetrics().registry):
        label_names = _label_names(registry)
        for family in registry.collect():
            labels = label_names.get(family.name, frozenset()) | TARGET_LABELS
            # A labelled metric yields no samples until a label is used, so add the
            # names its type exports as well.
            names = {s.name for s in family.samples}
            names |= {family.name + suffix for suffix in SUFFIXES[family.type]}
            for name in names:
                extra = {"le"} if name.endswith("_bucket") else set()
                series[name] = labels | extra
    return series


def _label_names(registry: CollectorRegistry) -> dict[str, frozenset[str]]:
    # prometheus_client has no public way to read a collector's label names before use.
    return {c._name: frozenset(c._labelnames)  # type: ignore[attr-defined]
            for c in registry._collector_to_names}


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside collapsed rows included."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(panel title, PromQL) of every target."""
    for panel in panels(dashboard):
        if panel.get("type") == "row":
            continue
        for target in panel.get("targets", []):
            yield panel.get("title", "?"), target.get("expr", "")


def metric_names(expr: str) -> set[str]:
    return set(METRIC.findall(expr))


def unknown_metrics(expr: str, series: dict[str, frozenset[str]]) -> set[str]:
    return metric_names(expr) - series.keys()


def foreign_matcher_labels(expr: str, series: dict[str, frozenset[str]]) -> set[str]:
    """Labels in a `metric{...}` matcher that the metric does not have."""
    bad = set()
    for name, body in SELECTOR.findall(expr):
        for label in MATCHER.findall(QUOTED.sub('""', body)):
            if label not in series.get(name, frozenset()):
                bad.add(f"{name}:{label}")
    return bad


def foreign_grouping_labels(expr: str, series: dict[str, frozenset[str]]) -> set[str]:
    """Labels in a `by (...)` that some metric of the expression does not have."""
    bad = set()
    for group in BY.findall(expr):
        for label in filter(None, (g.strip() for g in group.split(","))):
            for name in metric_names(expr):
                if label not in series.get(name, frozenset()):
                    bad.add(f"{name}:{label}")
    return bad


@pytest.fixture(scope="module")
def series() -> dict[str, frozenset[str]]:
    return exported_series()


@pytest.fixture(scope="module")
def dashboards() -> dict[str, dict[str, Any]]:
    return {path.name: json.loads(path.read_text()) for path in DASHBOARDS}


@pytest.fixture(scope="module")
def datasource() -> dict[str, Any]:
    (source,) = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    return source


def test_the_five_dashboards_ship() -> None:
    assert {p.name for p in DASHBOARDS} == {"stream.json", "publishing.json", "serving.json",
                                            "lander.json", "model_quality.json"}


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_panel_has_a_title_and_a_query(path: Path) -> None:
    dashboard = json.loads(path.read_text())
    assert list(panels(dashboard)), f"{path.name} has no panels"
    for panel in panels(dashboard):
        assert panel.get("title"), f"{path.name}: panel {panel.get('id')} has no title"
        exprs = [t.get("expr") for t in panel.get("targets", [])]
        assert exprs and all(exprs), f"{path.name}: {panel['title']!r} has no query"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_queried_metric_is_exported(path: Path,
                                          series: dict[str, frozenset[str]]) -> None:
    missing = {f"{title}: {name}" for title, expr in queries(json.loads(path.read_text()))
               for name in unknown_metrics(expr, series)}
    assert not missing, f"{path.name} queries metrics no daemon exports: {sorted(missing)}"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_matched_label_is_a_label_of_its_metric(
        path: Path, series: dict[str, frozenset[str]]) -> None:
    bad = {f"{title}: {label}" for title, expr in queries(json.loads(path.read_text()))
           for label in foreign_matcher_labels(expr, series)}
    assert not bad, f"{path.name} matches labels the metric lacks: {sorted(bad)}"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_grouping_label_is_a_label_of_the_metrics_grouped(
        path: Path, series: dict[str, frozenset[str]]) -> None:
    bad = {f"{title}: {label}" for title, expr in queries(json.loads(path.read_text()))
           for label in foreign_grouping_labels(expr, series)}
    assert not bad, f"{path.name} groups by labels the metric lacks: {sorted(bad)}"


def test_a_misspelt_metric_is_reported(series: dict[str, frozenset[str]]) -> None:
    expr = "sum(rate(recstream_stream_event_consumed_total[5m]))"
    assert unknown_metrics(expr, series) == {"recstream_stream_event_consumed_total"}


def test_a_foreign_label_is_reported(series: dict[str, frozenset[str]]) -> None:
    expr = 'sum by (code) (rate(recstream_serving_requests_total{statu="200"}[5m]))'
    assert foreign_matcher_labels(expr, series) == {"recstream_serving_requests_total:statu"}
    assert foreign_grouping_labels(expr, series) == {"recstream_serving_requests_total:code"}


def test_panels_query_the_provisioned_datasource(dashboards: dict[str, dict[str, Any]],
                                                 datasource: dict[str, Any]) -> None:
    uids = {(name, ref["uid"])
            for name, dashboard in dashboards.items() for panel in panels(dashboard)
            for ref in [panel["datasource"], *(t["datasource"] for t in panel["targets"])]}
    assert {uid for _, uid in uids} == {datasource["uid"]}, sorted(uids)


def test_dashboard_uids_and_titles_are_unique(
        dashboards: dict[str, dict[str, Any]]) -> None:
    uids = [d["uid"] for d in dashboards.values()]
    titles = [d["title"] for d in dashboards.values()]
    assert len(set(uids)) == len(uids), uids
    assert len(set(titles)) == len(titles), titles


def test_datasource_is_the_default_compose_prometheus(datasource: dict[str, Any]) -> None:
    assert datasource["type"] == "prometheus"
    assert datasource["uid"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    assert datasource["isDefault"] is True


def test_dashboard_provider_reads_the_mounted_folder() -> None:
    (provider,) = yaml.safe_load(PROVIDERS.read_text())["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == DASHBOARDS_MOUNT


def test_compose_mounts_the_provisioning_and_dashboards() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    mounts = {v.split(":")[0]: v.split(":")[1]
              for v in compose["services"]["grafana"]["volumes"]}
    assert mounts["./deploy/grafana/provisioning"] == PROVISIONING_MOUNT
    assert mounts["./deploy/grafana/dashboards"] == DASHBOARDS_MOUNT
