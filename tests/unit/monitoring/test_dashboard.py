"""The Grafana dashboard queries only series the app and Ray export; Prometheus finds the nodes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import ray
import yaml
from ray.util.metrics import Metric as RayMetric

from app.monitoring import metrics_catalog as mc
from app.serve.metrics import ServeMetrics

ROOT = Path(__file__).resolve().parents[3]
PROMETHEUS_YML = ROOT / "app" / "monitoring" / "prometheus.yml"
LATENCY_BY_ENDPOINT = "sum by (le, endpoint) (rate(ray_scalerec_request_latency_ms_bucket"


def _board() -> dict:
    return json.loads(mc.DASHBOARD.read_text())


def _panels() -> list[dict]:
    return [p for p in _board()["panels"] if p["type"] != "row"]


def test_every_panel_target_names_only_catalogued_metrics() -> None:
    known = mc.series_names()
    queries = mc.dashboard_queries()
    assert sum(where.startswith("panel") for where, _ in queries) >= 12
    for where, expr in queries:
        names = mc.metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        assert names <= known, f"{where}: {sorted(names - known)} not in the catalogue: {expr!r}"
        assert not mc.unknown_labels(expr), f"{where}: labels no metric carries: {expr!r}"


def test_the_catalogues_app_metrics_are_those_serve_metrics_creates() -> None:
    # Created for real (no Ray needed outside a replica), independent of the catalogue's parse.
    created = {
        m.info["name"]: (type(m).__name__.lower(), tuple(m.info["tag_keys"]))
        for m in vars(ServeMetrics("ingress")).values()
        if isinstance(m, RayMetric)
    }
    parsed = {
        m.name: (m.kind, m.labels[: -len(mc.SERVE_TAGS + mc.SCRAPE_LABELS)])
        for m in mc.app_metrics()
    }
    assert parsed == created
    assert {n for n in mc.series_names() if n.startswith("ray_scalerec_")} == {
        s for m in mc.app_metrics() for s in m.series
    }
    assert all(name.startswith("scalerec_") for name in created)


def test_the_dashboard_shows_every_app_metric() -> None:
    used = mc.dashboard_metrics()
    unused = [m.name for m in mc.app_metrics() if not set(m.series) & used]
    assert not unused, f"no panel shows {unused}"


def test_the_ray_metrics_exist_in_the_installed_ray() -> None:
    site = Path(ray.__file__).resolve().parent.parent
    for m in mc.RAY_METRICS:
        assert f'"{m.name}"' in (site / m.source).read_text(), f"{m.name} not in {m.source}"
    from ray.dashboard.consts import NODE_TAG_KEYS
    from ray.serve.metrics import APPLICATION_TAG, DEPLOYMENT_TAG, REPLICA_TAG

    assert tuple(NODE_TAG_KEYS) == mc.NODE_TAGS
    assert set(mc.SERVE_TAGS) == {APPLICATION_TAG, DEPLOYMENT_TAG, REPLICA_TAG}


def test_series_names_follow_rays_prometheus_export() -> None:
    assert mc.Metric("x", "counter", (), "").series == ("ray_x_total",)
    assert mc.Metric("x", "gauge", (), "").series == ("ray_x",)
    assert mc.Metric("x", "histogram", (), "").series == (
        "ray_x_bucket",
        "ray_x_sum",
        "ray_x_count",
    )


def test_the_dashboard_has_the_panels_and_the_datasource_variable() -> None:
    board = _board()
    assert board["schemaVersion"] >= 36 and board["uid"] == "scalerec"
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = _panels()
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for p in panels:
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert all(t["datasource"]["uid"] == "${datasource}" for t in p["targets"]), p["title"]
        assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
    exprs = " ".join(t["expr"] for p in panels for t in p["targets"])
    for needle in (
        f"histogram_quantile(0.5, {LATENCY_BY_ENDPOINT}",
        f"histogram_quantile(0.99, {LATENCY_BY_ENDPOINT}",
        'status=~"5.."',
        'status="429"',
        'ray_scalerec_cache_lookups_total{result="hit"',
        "ray_serve_deployment_replica_healthy",
        "ray_node_cpu_utilization",
        "ray_node_mem_used",
        "ray_scalerec_events_appended_total",
        "ray_scalerec_model_version_info",
        "ray_scalerec_batch_size_bucket",
    ):
        assert needle in exprs, needle


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (endpoint) (rate(ray_a_total{status=~"5..", x="a(b"}[5m]))', {"ray_a_total"}),
        ("histogram_quantile(0.99, sum by (le) (rate(b_bucket[$__rate_interval])))", {"b_bucket"}),
        ("ray_c / on(instance) group_left ray_d offset 5m", {"ray_c", "ray_d"}),
        ("(sum(rate(x_total[1m])) or vector(0)) / sum(rate(x_total[1m]))", {"x_total"}),
        ('label_values(ray_e{job="ray"}, application)', {"ray_e"}),
        ("label_values(application)", set()),
        ("count without (replica) (up == 1)", {"up"}),
        ("max(f:rule) by (ip) > bool 2e3", {"f:rule"}),
        ('sum(rate(g{a="${var}"}[$__interval]))', {"g"}),
    ],
)
def test_metric_names_of_promql(expr: str, names: set[str]) -> None:
    assert mc.metric_names(expr) == names


def test_unknown_labels_catches_a_wrong_label() -> None:
    expr = 'sum by (route) (rate(ray_scalerec_requests_total{endpoint="/x", stat="200"}[1m]))'
    assert mc.unknown_labels(expr) == {"route", "ray_scalerec_requests_total:stat"}
    ok = f"histogram_quantile(0.5, {LATENCY_BY_ENDPOINT}[1m])))"
    assert mc.unknown_labels(ok) == set()


def _scrape_configs_in(markdown: str) -> list[list[dict]]:
    blocks = re.findall(r"```yaml\n(.*?)```", markdown, flags=re.S)
    return [yaml.safe_load(b)["scrape_configs"] for b in blocks if "scrape_configs" in b]


def test_prometheus_scrapes_rays_service_discovery_file() -> None:
    from ray._private.ray_constants import PROMETHEUS_SERVICE_DISCOVERY_FILE

    cfg = yaml.safe_load(PROMETHEUS_YML.read_text())
    assert re.fullmatch(r"\d+s", cfg["global"]["scrape_interval"])
    files = [
        f for job in cfg["scrape_configs"] for sd in job["file_sd_configs"] for f in sd["files"]
    ]
    assert files == [f"/tmp/ray/{PROMETHEUS_SERVICE_DISCOVERY_FILE}"]
    assert files[0] in (ROOT / "docs" / "design.md").read_text()


def test_the_docs_show_the_same_scrape_config() -> None:
    cfg = yaml.safe_load(PROMETHEUS_YML.read_text())
    for doc in ("README.md", "docs/observability.md"):
        shown = _scrape_configs_in((ROOT / doc).read_text())
        assert shown, f"{doc} shows no scrape config"
        assert all(s == cfg["scrape_configs"] for s in shown), doc
