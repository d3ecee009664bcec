"""The report's charts: matplotlib figures drawn on the Agg canvas, returned as PNG ``data:`` URIs.

Used by ``app.monitoring.report`` (``python -m jobs.report``); each function takes plain
numbers, so the report decides what to draw and these only draw it. Figures are built without
``pyplot``: no global figure state, no GUI backend, safe in any process.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

DPI = 100
STATUS_COLORS = {"done": "tab:blue", "stopped": "tab:orange", "error": "tab:red"}


def _figure(width: float = 6.4, height: float = 3.4) -> tuple[Figure, Axes]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.grid(True, alpha=0.3)
    return fig, ax


def data_uri(fig: Figure) -> str:
    """The figure as a base64 PNG ``data:`` URI (the report inlines every image)."""
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def popularity(item_counts: np.ndarray) -> str:
    """Interactions per item, most popular first (log-log): the catalogue's long tail."""
    fig, ax = _figure()
    counts = np.sort(np.asarray(item_counts))[::-1]
    counts = counts[counts > 0]
    ranks = np.arange(1, len(counts) + 1)
    ax.loglog(ranks, counts, marker="." if len(counts) < 200 else None)
    head = max(1, int(np.ceil(0.2 * len(counts))))
    share = counts[:head].sum() / max(1, counts.sum())
    ax.axvline(head, linestyle="--", color="k", linewidth=1)
    ax.set_title(f"item popularity: the top 20 % of items hold {share:.0%} of interactions")
    ax.set_xlabel("item rank")
    ax.set_ylabel("interactions")
    return data_uri(fig)


def activity(user_counts: np.ndarray) -> str:
    """Histogram of interactions per user (log-spaced bins)."""
    fig, ax = _figure()
    counts = np.asarray(user_counts)
    counts = counts[counts > 0]
    top = max(2.0, float(counts.max())) if len(counts) else 2.0
    ax.hist(counts, bins=np.unique(np.geomspace(1, top + 1, 40).round()).tolist())
    ax.set_xscale("log")
    median = float(np.median(counts)) if len(counts) else 0.0
    ax.set_title(f"user activity: median {median:g} interactions per user")
    ax.set_xlabel("interactions per user")
    ax.set_ylabel("users")
    return data_uri(fig)


def metric_bars(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """Grouped bars: one group per metric column, one bar per row (``row["model"]``)."""
    fig, ax = _figure(7.2, 4.4)
    width = 0.8 / max(1, len(rows))
    x = np.arange(len(columns))
    for i, row in enumerate(rows):
        values = [float(row.get(c) or 0.0) for c in columns]
        ax.bar(x + i * width - 0.4 + width / 2, values, width, label=str(row["model"]))
    ax.set_xticks(x, list(columns))
    ax.set_ylabel("value")
    # below the axes: model names are long and the bars reach 1.0
    ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)
    ax.set_title("model vs baselines")
    return data_uri(fig)


def epochs(history: Sequence[dict[str, Any]], metric: str) -> str:
    """``metric`` per training epoch (the lineage's ``history``)."""
    fig, ax = _figure()
    points = [
        (int(h.get("epoch", i + 1)), float(h[metric]))
        for i, h in enumerate(history)
        if h.get(metric) is not None
    ]
    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o")
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per epoch (validating fit)")
    return data_uri(fig)


def trials(rows: Sequence[dict[str, Any]], metric: str) -> str:
    """Best ``metric`` of each Tune trial, coloured by how the trial ended."""
    fig, ax = _figure(7.2, 3.6)
    ids = [str(r["trial_id"]) for r in rows]
    values = [float(r["best_valid_ndcg"] or 0.0) for r in rows]
    colors = [STATUS_COLORS.get(str(r.get("status")), "tab:gray") for r in rows]
    ax.bar(range(len(rows)), values, color=colors)
    ax.set_xticks(range(len(rows)), ids, rotation=60, ha="right", fontsize="x-small")
    from matplotlib.patches import Patch

    handles = [Patch(color=color, label=status) for status, color in STATUS_COLORS.items()]
    ax.legend(handles=handles, fontsize="small", loc="lower right")
    ax.set_ylabel(f"best {metric}")
    ax.set_title(f"Tune trials ({len(rows)}), best {metric} of each")
    return data_uri(fig)


PERCENTILES = ("p50_ms", "p95_ms", "p99_ms", "max_ms")


def latency(result: dict[str, Any]) -> str:
    """Latency percentiles of a load test: all requests, and per status when it has them."""
    fig, ax = _figure(7.2, 3.6)
    groups = {"all": result, **(result.get("per_status") or {})}
    x = np.arange(len(PERCENTILES))
    width = 0.8 / len(groups)
    for i, (label, g) in enumerate(groups.items()):
        values = [float(g.get(p) or 0.0) for p in PERCENTILES]
        bars = ax.bar(x + i * width - 0.4 + width / 2, values, width, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize="x-small")
    ax.set_xticks(x, [p.removesuffix("_ms") for p in PERCENTILES])
    ax.set_ylabel("latency (ms)")
    ax.legend(fontsize="small")
    ax.set_title(f"latency percentiles at {float(result.get('qps', 0)):.0f} QPS")
    return data_uri(fig)


def latency_histogram(ms: Sequence[float]) -> str:
    """Histogram of a load test's request latencies (log-spaced bins)."""
    fig, ax = _figure()
    values = np.asarray(ms, dtype=float)
    low, high = max(float(values.min()), 0.05), float(values.max()) + 1e-3
    ax.hist(values, bins=np.geomspace(low, max(high, low * 1.01), 50).tolist())
    ax.set_xscale("log")
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("requests")
    ax.set_title(f"{len(values):,} requests")
    return data_uri(fig)
