"""Observability: the Grafana dashboard, the Prometheus scrape config and the HTML report.

``dashboards/scalerec.json`` (Grafana) and ``prometheus.yml`` (scraping a Ray cluster) are the
operational files; ``metrics_catalog`` lists the series they may query, and ``report`` writes
the offline report of a registered model (``python -m jobs.report --lake LAKE``). How to use
them: docs/observability.md.
"""

from app.monitoring.metrics_catalog import (
    DASHBOARD,
    RAY_METRICS,
    Metric,
    app_metrics,
    catalog,
    dashboard_metrics,
    dashboard_queries,
    metric_names,
    series_names,
    unknown_labels,
)
from app.monitoring.report import ReportError, build_report, pick_model, run

__all__ = [
    "DASHBOARD",
    "RAY_METRICS",
    "Metric",
    "ReportError",
    "app_metrics",
    "build_report",
    "catalog",
    "dashboard_metrics",
    "dashboard_queries",
    "metric_names",
    "pick_model",
    "run",
    "series_names",
    "unknown_labels",
]
