"""The Prometheus series a ScaleRec dashboard may query, and the metric names a PromQL query uses.

The app's own metrics are read from the source of ``app.serve.metrics`` (its ``Counter``,
``Gauge`` and ``Histogram`` definitions), so this catalogue cannot drift from what replicas
export; the Ray Serve and Ray node metrics are the few the dashboard uses, with the Ray source
file defining each. ``tests/unit/monitoring/test_dashboard.py`` checks the dashboard against it:
``dashboard_metrics("app/monitoring/dashboards/scalerec.json") <= series_names()``.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PREFIX = "ray_"
"""Ray's Prometheus exporter prefixes every metric with this."""

APP_METRICS_SOURCE = Path(__file__).resolve().parents[1] / "serve" / "metrics.py"
DASHBOARD = Path(__file__).resolve().parent / "dashboards" / "scalerec.json"

SERVE_TAGS = ("deployment", "replica", "application")
"""Tags Ray Serve adds to every ``ray.serve.metrics`` metric created inside a replica."""
SCRAPE_LABELS = ("instance", "job")
"""Labels Prometheus adds to every scraped series."""
NODE_TAGS = ("ip", "Version", "SessionName", "IsHeadNode", "RayNodeType")
"""``NODE_TAG_KEYS`` of Ray's reporter agent (``ray/dashboard/consts.py``)."""


@dataclass(frozen=True)
class Metric:
    """One metric as it is defined (``scalerec_requests``), before Ray's export renames it."""

    name: str
    kind: str
    """``counter``, ``gauge`` or ``histogram``."""
    labels: tuple[str, ...]
    """Its own tags plus those Ray and Prometheus add (``le`` of histograms not included)."""
    source: str
    """Where it is defined: ``app/serve/metrics.py`` or a file of the Ray package."""

    @property
    def series(self) -> tuple[str, ...]:
        """Its Prometheus series: counters get ``_total``, histograms three series."""
        base = PREFIX + self.name
        if self.kind == "counter":
            return (f"{base}_total",)
        if self.kind == "histogram":
            return (f"{base}_bucket", f"{base}_sum", f"{base}_count")
        return (base,)


_KINDS = {"Counter": "counter", "Gauge": "gauge", "Histogram": "histogram"}

_REPORTER = "ray/dashboard/modules/reporter/reporter_agent.py"
RAY_METRICS = (
    Metric(
        "serve_deployment_replica_healthy",
        "gauge",
        ("deployment", "application", "replica", *SCRAPE_LABELS),
        "ray/serve/_private/deployment_state.py",
    ),
    *(
        Metric(name, "gauge", (*NODE_TAGS, *SCRAPE_LABELS), _REPORTER)
        for name in ("node_cpu_utilization", "node_cpu_count", "node_mem_used", "node_mem_total")
    ),
)
"""The Ray Serve and Ray node metrics the dashboard may use (Ray 2.60 names)."""


def app_metrics(source: Path = APP_METRICS_SOURCE) -> tuple[Metric, ...]:
    """Every ``Counter`` / ``Gauge`` / ``Histogram`` that ``app/serve/metrics.py`` creates.

    Read from the module's syntax tree: creating Ray metrics here would need a Ray worker.
    """
    found = []
    for node in ast.walk(ast.parse(source.read_text())):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        kind = _KINDS.get(func.id if isinstance(func, ast.Name) else getattr(func, "attr", ""))
        if kind is None or not node.args or not isinstance(node.args[0], ast.Constant):
            continue
        tags: tuple[str, ...] = ()
        for kw in node.keywords:
            if kw.arg == "tag_keys":
                tags = tuple(ast.literal_eval(kw.value))
        found.append(
            Metric(str(node.args[0].value), kind, (*tags, *SERVE_TAGS, *SCRAPE_LABELS), "app")
        )
    return tuple(found)


def catalog() -> dict[str, Metric]:
    """Every metric the dashboard may use, by Prometheus series name."""
    return {series: m for m in (*app_metrics(), *RAY_METRICS) for series in m.series}


def series_names() -> set[str]:
    """The Prometheus series names of ``catalog``."""
    return set(catalog())


# PromQL words that look like metric names: functions, aggregations, keywords, literals.
PROMQL_WORDS = frozenset(
    """
    abs absent absent_over_time acos acosh asin asinh atan atanh avg_over_time ceil changes clamp
    clamp_max clamp_min cos cosh count_over_time day_of_month day_of_week day_of_year
    days_in_month deg delta deriv exp floor histogram_avg histogram_count histogram_fraction
    histogram_quantile histogram_stddev histogram_stdvar histogram_sum holt_winters hour idelta
    increase irate label_join label_replace last_over_time ln log10 log2 mad_over_time
    max_over_time min_over_time minute month predict_linear present_over_time
    quantile_over_time rad rate resets round scalar sgn sin sinh sort sort_desc sort_by_label
    sort_by_label_desc sqrt stddev_over_time stdvar_over_time sum_over_time tan tanh time
    timestamp vector year label_values query_result
    sum min max avg group stddev stdvar count count_values bottomk topk quantile limitk
    limit_ratio by without on ignoring group_left group_right offset bool and or unless
    inf nan
    """.split()
)
_LABEL_VALUES = re.compile(r"\blabel_values\(\s*(?:([^,()]*?)\s*,\s*)?\w+\s*\)")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GRAFANA_VAR = re.compile(r"\$\{[^}]*\}|\$\w+")
_BRACES = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_NUMBER = re.compile(r"(?<![\w:])\d[\w.]*")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def _strip(expr: str) -> str:
    """``expr`` without strings, Grafana variables, label matchers, ranges, groupings, numbers."""
    # label_values(metric{...}, label): keep the metric, drop the label name
    out = _LABEL_VALUES.sub(lambda m: f" {m.group(1) or ''} ", expr)
    out = _GRAFANA_VAR.sub(" ", _STRING.sub('""', out))
    for pattern in (_BRACES, _RANGE, _GROUPING):
        out = pattern.sub(" ", out)
    return _NUMBER.sub(" ", out)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (or Grafana ``label_values(...)`` query) selects.

    A name is an identifier that is not a PromQL function, aggregation or keyword, used bare or
    followed by ``{`` or ``[``; label names inside ``{...}`` and ``by (...)`` are not names.
    ``{__name__=~"..."}`` selectors are not resolved (the dashboard does not use them).
    """
    stripped = _strip(expr)
    names = set()
    for m in _IDENT.finditer(stripped):
        word = m.group()
        following = stripped[m.end() :].lstrip()[:1]
        if word not in PROMQL_WORDS and following != "(":
            names.add(word)
    return names


def _matchers(expr: str) -> Iterator[tuple[str, set[str]]]:
    """``(metric, label names)`` of every ``metric{...}`` selector in ``expr``."""
    text = _GRAFANA_VAR.sub("v", _STRING.sub('""', expr))
    for m in re.finditer(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*\{([^{}]*)\}", text):
        labels = set(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", m.group(2)))
        yield m.group(1), labels


def grouping_labels(expr: str) -> set[str]:
    """Label names of the ``by (...)`` / ``without (...)`` / ``on (...)`` clauses in ``expr``."""
    text = _STRING.sub('""', expr)
    found: set[str] = set()
    for m in _GROUPING.finditer(text):
        inner = m.group()[m.group().index("(") + 1 : -1]
        found |= {w.strip() for w in inner.split(",") if w.strip()}
    return found


def unknown_labels(expr: str, known: dict[str, Metric] | None = None) -> set[str]:
    """Labels ``expr`` matches or groups by that none of its metrics carries (``le``: buckets)."""
    known = catalog() if known is None else known
    metrics = [known[n] for n in metric_names(expr) if n in known]
    carried = {label for m in metrics for label in m.labels}
    if any(m.kind == "histogram" for m in metrics):
        carried.add("le")
    bad = {
        f"{name}:{label}"
        for name, labels in _matchers(expr)
        if name in known
        for label in labels - {"__name__", *known[name].labels, "le"}
    }
    return bad | {label for label in grouping_labels(expr) if label not in carried}


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # collapsed rows nest their panels


def dashboard_queries(path: Path | str = DASHBOARD) -> list[tuple[str, str]]:
    """``(where, query)`` of every panel target and templating query of a Grafana dashboard."""
    board = json.loads(Path(path).read_text())
    out = []
    for panel in _panels(board.get("panels", [])):
        for target in panel.get("targets", []):
            if target.get("expr"):
                out.append((f"panel {panel.get('title', '?')!r}", target["expr"]))
    for var in board.get("templating", {}).get("list", []):
        query = var.get("query")
        text = query.get("query") if isinstance(query, dict) else query
        if var.get("type") == "query" and text:
            out.append((f"variable {var.get('name')!r}", text))
    return out


def dashboard_metrics(path: Path | str = DASHBOARD) -> set[str]:
    """Every metric name the dashboard's queries select."""
    return {name for _, query in dashboard_queries(path) for name in metric_names(query)}
