"""Report stage: one self-contained HTML page about a registered model and what produced it.

Run with ``python -m jobs.report --lake ./lake [--name synthetic-mf] [--out report.html]
[--loadtest load.json]``. No Ray: everything is read from the lake (and the load test's JSON).

Sections: the model's dataset version (counts, quarantine, long tail, user activity), its
metrics against baselines (other models registered on the same dataset version, and with
``baselines=True`` Popularity and EASE fitted here), the Tune search that chose it (its
lineage) and the last load test (``python -m jobs.loadtest --out``). A section whose data is
missing says so and what to run; the page is still written. Images are inline PNGs, and a
small script marks ``<body data-images-ok="true">`` once every image has decoded.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from app.monitoring import charts, page
from app.store import (
    ITEM_IDX,
    SPLITS,
    USER_IDX,
    DatasetVersion,
    Lake,
    LakeError,
    ModelRecord,
    aliases,
    get_record,
    list_versions,
    load_dataset,
)

log = logging.getLogger(__name__)

K = 10
METRIC_COLUMNS = tuple(f"{m}@{K}" for m in ("ndcg", "recall", "hr", "mrr", "coverage"))
TUNE_METRIC = f"valid_ndcg@{K}"
EXAMPLE_CONFIG = "jobs/configs/synthetic.yaml"


class ReportError(LakeError):
    """The lake or the model to report on does not exist; the message says what to run first."""


def model_names(lake: Lake) -> list[str]:
    """Registry names with at least one published version."""
    return [n for n in lake.listdir("models") if not n.startswith(".") and list_versions(lake, n)]


def pick_model(lake: Lake, name: str | None = None, ref: str = "latest") -> ModelRecord:
    """The record to report on: ``name`` at ``ref``, or the newest version of any model.

    Raises:
        ReportError: naming the job to run when the lake or the model does not exist.
        RegistryError: when ``ref`` is not a version or alias of ``name`` (it lists them).
    """
    if not lake.fs.exists(lake.root):
        raise ReportError(
            f"lake {lake.uri} does not exist: run python -m jobs.pipeline --config "
            f"{EXAMPLE_CONFIG} lake={lake.uri} (or jobs.ingest, then jobs.train) first"
        )
    names = model_names(lake)
    if not names:
        raise ReportError(
            f"no model is registered in lake {lake.uri}: run python -m jobs.train --config "
            f"{EXAMPLE_CONFIG} lake={lake.uri} first"
        )
    if name is None:
        # created_at has microseconds; version ids only seconds (two can share one)
        name = max(names, key=lambda n: get_record(lake, n).manifest.get("created_at", ""))
    elif name not in names:
        raise ReportError(
            f"no model {name!r} in lake {lake.uri} (registered: {', '.join(names)}); "
            f"python -m jobs.train registers one"
        )
    return get_record(lake, name, ref)


# -- sections -----------------------------------------------------------------------------


def _counts(ds: DatasetVersion) -> tuple[np.ndarray, np.ndarray]:
    """Interactions per user and per item over every split, read two columns at a time."""
    users = np.zeros(ds.n_users, np.int64)
    items = np.zeros(ds.n_items, np.int64)
    for split in SPLITS:
        parquet = ds.arrow_dataset(split)  # the listed files only
        for batch in parquet.to_batches(columns=[USER_IDX, ITEM_IDX]):
            users += np.bincount(batch.column(0).to_numpy(), minlength=ds.n_users)
            items += np.bincount(batch.column(1).to_numpy(), minlength=ds.n_items)
    return users, items


def dataset_section(lake: Lake, record: ModelRecord) -> str:
    """Counts, quarantine and the popularity and activity plots of the model's dataset."""
    info = record.lineage.get("dataset") or {}
    try:
        ds = load_dataset(lake, info["name"], info["version"])
    except (KeyError, LakeError) as exc:
        return page.missing(f"the model's dataset version is not readable ({exc}); re-ingest it")
    m = ds.manifest
    splits = m.get("splits", {})
    quarantine = (m.get("quarantine") or {}).get("reasons") or {}
    rows: list[tuple[str, Any]] = [
        ("dataset", f"{ds.name} {ds.version}"),
        ("created", m.get("created_at")),
        (
            "source",
            (m.get("source") or {}).get("description") or (m.get("source") or {}).get("kind"),
        ),
        ("interactions", m.get("n_interactions", sum(splits.values()))),
        ("users", ds.n_users),
        ("items", ds.n_items),
        *((f"{s} rows", splits.get(s)) for s in SPLITS),
        ("rows read", m.get("rows_read")),
        ("rows quarantined", m.get("rows_quarantined", sum(quarantine.values()))),
        ("duplicates collapsed", m.get("duplicates_collapsed")),
        ("density", m.get("density")),
    ]
    out = [page.pairs([(k, v) for k, v in rows if v is not None])]
    if quarantine:
        by_count = sorted(quarantine.items(), key=lambda kv: -kv[1])
        out.append(page.table(["quarantine reason", "rows"], by_count))
    try:
        users, items = _counts(ds)
    except (OSError, ValueError) as exc:
        return "".join(out) + page.missing(
            f"the interactions could not be read for the plots: {exc}"
        )
    if not users.sum():
        return "".join(out) + page.missing("the dataset version holds no interactions to plot")
    out.append(page.img(charts.popularity(items), "interactions per item, most popular first"))
    out.append(page.img(charts.activity(users), "interactions per user"))
    return "".join(out)


def records_on_dataset(lake: Lake, dataset: dict[str, Any]) -> Iterator[ModelRecord]:
    """Published model versions trained on ``dataset`` (``{"name", "version"}``), newest first.

    Each model's versions are listed newest first, one model after the other.
    """
    key = (dataset.get("name"), dataset.get("version"))
    for name in model_names(lake):
        for version in reversed(list_versions(lake, name)):
            rec = get_record(lake, name, version)
            ds = rec.lineage.get("dataset") or {}
            if (ds.get("name"), ds.get("version")) == key:
                yield rec


def _row(label: str, metrics: dict[str, Any], prefix: str) -> dict[str, Any] | None:
    if metrics.get(f"{prefix}{METRIC_COLUMNS[0]}") is None:
        return None
    return {"model": label, **{c: metrics.get(f"{prefix}{c}") for c in METRIC_COLUMNS}}


def comparison_rows(
    lake: Lake, record: ModelRecord, baselines: bool = False
) -> tuple[str, list[dict[str, Any]]]:
    """``(split, rows)``: the model first, then the baselines, on test when it was evaluated.

    Baselines are the newest version of every other model on the same dataset version with the
    same metrics, plus Popularity and EASE fitted here when ``baselines`` (test split only).
    """
    prefix = "" if record.metrics.get(METRIC_COLUMNS[0]) is not None else "valid_"
    ours = _row(f"{record.name} {record.version}", record.metrics, prefix)
    rows = [ours] if ours else []
    seen = {record.name}
    for rec in records_on_dataset(lake, record.lineage.get("dataset") or {}):
        row = _row(f"{rec.name} {rec.version}", rec.metrics, prefix)
        if rec.name not in seen and row:
            seen.add(rec.name)
            rows.append(row)
    if baselines and prefix == "":
        from app import evaluate  # torch and the models: only when asked

        info = record.lineage["dataset"]
        for row in evaluate.baselines(load_dataset(lake, info["name"], info["version"]), k=K):
            rows.append({"model": row["model"], **{c: row.get(c) for c in METRIC_COLUMNS}})
    return ("test" if prefix == "" else "validation"), rows


def metrics_section(lake: Lake, record: ModelRecord, baselines: bool = False) -> str:
    """The registry record's metrics, and the model against its baselines (table and chart)."""
    out = [page.table(["metric", "value"], sorted(record.metrics.items()))]
    if record.metrics.get(METRIC_COLUMNS[0]) is None:
        out.append(
            page.missing(
                f"not evaluated on the test split yet: run python -m jobs.evaluate --config "
                f"<config> model={record.version}; comparing validation metrics"
            )
        )
    split, rows = comparison_rows(lake, record, baselines)
    if len(rows) < 2:
        out.append(
            page.missing(
                f"no baseline with {split} {METRIC_COLUMNS[0]} on this dataset version: train "
                "model.name=popularity or ease on it (and evaluate it), or pass --baselines"
            )
        )
    if rows:
        out.append(f"<h3>{page.escape(split)} metrics, full ranking</h3>")
        out.append(
            page.table(
                ["model", *METRIC_COLUMNS],
                [[r["model"], *(r[c] for c in METRIC_COLUMNS)] for r in rows],
            )
        )
        out.append(
            page.img(charts.metric_bars(rows, METRIC_COLUMNS), f"{split} metrics vs baselines")
        )
    history = record.lineage.get("history") or []
    if sum(h.get(TUNE_METRIC) is not None for h in history) > 1:
        out.append(page.img(charts.epochs(history, TUNE_METRIC), f"{TUNE_METRIC} per epoch"))
    return "".join(out)


def tune_section(lake: Lake, record: ModelRecord) -> str:
    """The Tune search recorded in the model's lineage (or the newest one on its dataset)."""
    source, search = record, record.lineage.get("tune")
    if not search:
        for rec in records_on_dataset(lake, record.lineage.get("dataset") or {}):
            if rec.lineage.get("tune"):
                source, search = rec, rec.lineage["tune"]
                break
    if not search or not search.get("trials"):
        return page.missing(
            "no Tune search is recorded for this dataset version: run python -m jobs.tune "
            f"--config <config> lake={lake.uri}"
        )
    trials = search["trials"]
    keys = sorted({k for t in trials for k in t.get("params", {})})
    out = [
        page.para(
            f"recorded with {source.name} {source.version}"
            + ("" if source is record else " (another model)")
        ),
        page.pairs(
            [
                ("searcher", search.get("searcher")),
                ("scheduler", search.get("scheduler")),
                ("metric", search.get("metric")),
                ("best trial", search.get("best_trial")),
                ("search wall time (s)", search.get("wall_s")),
                ("experiment", search.get("experiment")),
            ]
        ),
        page.table(
            ["trial", "status", "epochs", "best epoch", TUNE_METRIC, *keys],
            [
                [t["trial_id"], t["status"], t["epochs_run"], t["best_epoch"], t["best_valid_ndcg"]]
                + [t["params"].get(k) for k in keys]
                for t in trials
            ],
        ),
    ]
    if any(t.get("best_valid_ndcg") is not None for t in trials):
        out.append(page.img(charts.trials(trials, TUNE_METRIC), f"best {TUNE_METRIC} per trial"))
    return "".join(out)


def loadtest_section(path: str | Path | None) -> str:
    """The load test ``python -m jobs.loadtest --out PATH`` wrote: summary and percentiles."""
    hint = "python -m jobs.loadtest --url http://127.0.0.1:8000 --out load.json"
    if not path:
        return page.missing(f"no load test given: run {hint} and pass --loadtest load.json")
    try:
        result = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        return page.missing(f"load test {path} is not readable ({exc}): run {hint}")
    if not isinstance(result, dict) or "p50_ms" not in result:
        return page.missing(f"{path} is not a jobs.loadtest summary (no p50_ms)")
    open_loop = "target_rate" in result
    rows: list[tuple[str, Any]] = [
        ("file", str(path)),
        ("mode", "open loop (fixed rate)" if open_loop else "closed loop"),
        (
            "target rate (req/s)" if open_loop else "concurrency",
            result.get("target_rate", result.get("concurrency")),
        ),
        *((k, result.get(k)) for k in ("requests", "duration_s", "qps", "error_rate")),
        *((k, result.get(k)) for k in charts.PERCENTILES),
        ("statuses", ", ".join(f"{s}: {n:,}" for s, n in (result.get("statuses") or {}).items())),
    ]
    out = [page.pairs([(k, v) for k, v in rows if v is not None])]
    out.append(page.img(charts.latency(result), "latency percentiles (ms)"))
    if result.get("latencies_ms"):
        out.append(page.img(charts.latency_histogram(result["latencies_ms"]), "latency histogram"))
    return "".join(out)


def build_report(
    lake: Lake,
    name: str | None = None,
    ref: str = "latest",
    loadtest: str | Path | None = None,
    baselines: bool = False,
) -> str:
    """The HTML report of model ``name`` at ``ref`` (default: the newest model in the lake)."""
    record = pick_model(lake, name, ref)
    lineage = record.lineage
    tags = [a for a, v in aliases(lake, record.name).items() if v == record.version]
    dataset = lineage.get("dataset") or {}
    header = [
        ("model", record.name),
        ("version", record.version + (f" ({', '.join(tags)})" if tags else "")),
        ("family", lineage.get("family")),
        ("hyperparameters", json.dumps(lineage.get("hparams") or {}, sort_keys=True)),
        ("dataset", f"{dataset.get('name')} {dataset.get('version')}"),
        ("registered", lineage.get("created_at")),
        ("code", (lineage.get("code") or {}).get("git_commit") or "-"),
        ("path", record.path),
    ]
    sections = [
        ("Model", page.pairs(header)),
        ("Dataset", dataset_section(lake, record)),
        ("Metrics", metrics_section(lake, record, baselines)),
        ("Tune trials", tune_section(lake, record)),
        ("Load test", loadtest_section(loadtest)),
    ]
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    return page.render(
        f"ScaleRec report: {record.name}", f"lake {lake.uri}, written {now}", sections
    )


def run(
    lake: Lake,
    out: str | Path = "report.html",
    name: str | None = None,
    ref: str = "latest",
    loadtest: str | Path | None = None,
    baselines: bool = False,
) -> Path:
    """Write the report to ``out``; returns its path."""
    text = build_report(lake, name, ref, loadtest, baselines)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    log.info("report written to %s (%d kB)", path, len(text) // 1024)
    return path
