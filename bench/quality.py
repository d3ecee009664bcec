"""Offline quality on ml-latest-small: ScaleRec's models vs reference baselines, same run.

python -m bench.quality [--quick] [--torch-epochs 60] [--skip seq_ae mf two_tower tune]
→ bench/results/quality.json

Protocol (docs/design.md): per-user temporal split (train / validation / test = the last 20%),
full ranking over every item minus the user's history, K=10. Every model is tuned on validation
NDCG@10 (fit on train, history = train), then the chosen configuration is refit on train +
validation and scored on test (history = train + validation). Test numbers never choose anything:
"ours" is the ScaleRec model with the best validation NDCG@10.

Baselines (``baseline: true``): popularity, implicit ALS and BPR, ItemKNN cosine (implicit's
``CosineRecommender``) and EASE. EASE is solved by ``EDLAE(dropout=0)`` on a binary history,
which is the EASE closed form (``test_edlae_without_dropout_is_ease`` checks it against
``app.models.EASE``) but solved by Cholesky on the items that have interactions only.
ScaleRec's own: the sequence autoencoder (``seq_ae``), MF and two-tower, trained by Ray Train
(``app.train.fit``) with the model and train sections of ``--config`` (``TORCH_OVERRIDES`` adds
MF's settings; the epoch count is chosen on validation, then refit on train + validation),
EDLAE scored on a recency-weighted history (``recency_weighted``), and the model the Ray Tune
search of ``--config`` selects (``app.tune.run``: Optuna over the search space of the config,
each trial a Ray Train run, the best refit on train + validation and registered), tested here.
Each row's ``trained_with`` says what fitted it: ``ray_train``, ``closed_form`` (ScaleRec's
closed-form models) or ``external`` (another library's model).
Each row's ``seconds`` covers its whole grid, the refit and the evaluations.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from app.evaluate import evaluate
from app.models import EDLAE, Popularity, recency_weighted
from app.store import DatasetVersion

K = 10
METRIC_KEYS = (f"ndcg@{K}", f"recall@{K}", f"hr@{K}", f"mrr@{K}", f"coverage@{K}")
ScoreFn = Callable[[np.ndarray], np.ndarray]


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


class Splits:
    """The dataset version's matrices: ``fit`` / ``history`` / ``target`` per stage."""

    def __init__(self, ds: DatasetVersion) -> None:
        self.ds = ds
        self.n_users, self.n_items = ds.n_users, ds.n_items
        self.train = ds.csr("train")
        self.train_valid = ds.csr("train", "valid")
        self.valid = ds.csr("valid")
        self.test = ds.csr("test")
        self.tables = {"valid": ds.read_table("train"), "test": ds.read_table("train", "valid")}
        self.genres = ds.item_genres()

    def stage(self, stage: str) -> tuple[sp.csr_matrix, sp.csr_matrix]:
        """(fit matrix = history, target) for ``valid`` or ``test``."""
        if stage == "valid":
            return self.train, self.valid
        return self.train_valid, self.test

    def recency(self, stage: str, tau: float) -> sp.csr_matrix:
        """The stage's history weighted by recency (binary for ``tau`` 0)."""
        return recency_weighted(self.tables[stage], self.n_users, self.n_items, tau)


@contextmanager
def small_ray() -> Iterator[None]:
    """A private 2-CPU Ray cluster for the block (never another engineer's)."""
    from app import cluster
    from app.config import ClusterArgs

    os.environ.pop("RAY_ADDRESS", None)
    cluster.connect(ClusterArgs(num_cpus=2, progress_bars=False))
    try:
        yield
    finally:
        cluster.shutdown()


def load_data(config: str, lake: str, data_path: str) -> DatasetVersion:
    """The latest ml-latest-small version in ``lake``, ingesting it (one small Ray) if absent."""
    from app import ingest
    from app.config import load_config
    from app.store import Lake, list_datasets, load_dataset

    cfg = load_config(config, [f"lake={lake}", f"data.path={data_path}"])
    root = Lake(cfg.lake)
    if list_datasets(root, cfg.data.name):
        return load_dataset(root, cfg.data.name)
    with small_ray():
        return ingest.run(cfg.data, root)


# --------------------------------------------------------------------------------------------
# Tuning: choose on validation, refit on train + validation, report test
# --------------------------------------------------------------------------------------------


def _metrics(score_fn: ScoreFn, history: sp.csr_matrix, target: sp.csr_matrix) -> dict:
    res = evaluate(score_fn, history, target, k=K)
    return {key: float(res[key]) for key in METRIC_KEYS}


def tune(
    name: str,
    baseline: bool,
    trained_with: str,
    data: Splits,
    fit: Callable[[dict, str], Any],
    fit_grid: Iterable[dict],
    scorer: Callable[[Any, dict, str], ScoreFn],
    score_grid: Iterable[dict] = ({},),
) -> dict[str, Any]:
    """Grid search on validation, then refit the best on train + validation and test it.

    Args:
        name: row label.
        baseline: whether the row is a reference implementation.
        trained_with: ``closed_form`` (ScaleRec's code) or ``external`` (another library).
        data: the splits.
        fit: ``(fit params, stage)`` → a fitted model (stage ``valid`` fits on train).
        fit_grid: parameter sets that need a fit each.
        scorer: ``(model, score params, stage)`` → score function over user indices.
        score_grid: parameter sets that only change scoring (one fit serves them all).
    """
    t0 = time.perf_counter()
    score_grid = list(score_grid)
    best: tuple[float, dict, dict] | None = None
    trials = []
    history, target = data.stage("valid")
    for fp in fit_grid:
        model = fit(fp, "valid")
        for spr in score_grid:
            ndcg = _metrics(scorer(model, spr, "valid"), history, target)[f"ndcg@{K}"]
            trials.append({**fp, **spr, f"valid_ndcg@{K}": round(ndcg, 5)})
            print(f"  {name} {fp | spr}: valid ndcg@{K} {ndcg:.4f}", flush=True)
            if best is None or ndcg > best[0]:
                best = (ndcg, fp, spr)
        del model
    assert best is not None
    valid_ndcg, fp, spr = best
    model = fit({**fp, "_refit_of": valid_ndcg}, "test")
    history, target = data.stage("test")
    test = _metrics(scorer(model, spr, "test"), history, target)
    seconds = time.perf_counter() - t0
    print(f"  {name} chosen {fp | spr}: test ndcg@{K} {test[f'ndcg@{K}']:.4f} ({seconds:.0f} s)")
    return {
        "model": name,
        "baseline": baseline,
        "trained_with": trained_with,
        "params": {k: v for k, v in (fp | spr).items() if not k.startswith("_")},
        f"valid_ndcg@{K}": valid_ndcg,
        **test,
        "seconds": round(seconds, 1),
        "trials": trials,
    }


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def _fit_matrix(data: Splits, stage: str) -> sp.csr_matrix:
    return data.stage(stage)[0]


def _history_scorer(model: Any, spr: dict, stage: str, data: Splits) -> ScoreFn:
    history = data.stage(stage)[0]
    return lambda users: model.score(users, history[users])


def run_popularity(data: Splits) -> dict:
    """Most-interacted items (``app.models.Popularity``)."""
    return tune(
        "Popularity",
        True,
        "closed_form",
        data,
        lambda fp, st: Popularity(data.n_users, data.n_items).fit(_fit_matrix(data, st)),
        [{}],
        lambda m, spr, st: _history_scorer(m, spr, st, data),
    )


def _implicit_scorer(model: Any, spr: dict, stage: str) -> ScoreFn:
    uf, itf = np.asarray(model.user_factors), np.asarray(model.item_factors)
    return lambda users: (uf[users] @ itf.T).astype(np.float32)


def run_als(data: Splits, quick: bool) -> dict:
    """ALS from implicit (``AlternatingLeastSquares``, confidence ``1 + alpha·x``)."""
    from implicit.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    grid = [
        {"factors": f, "regularization": r, "alpha": a, "iterations": 15}
        for f, r, a in itertools.product(
            [32, 64] if not quick else [32],
            [0.01, 0.1, 1.0] if not quick else [0.1],
            [1.0, 5.0, 20.0] if not quick else [1.0],
        )
    ]

    def fit(fp: dict, stage: str) -> Any:
        params = {k: v for k, v in fp.items() if not k.startswith("_")}
        model = AlternatingLeastSquares(**params, random_state=0, num_threads=2)
        with threadpool_limits(1, "blas"):  # implicit's advice: its own threads, serial BLAS
            model.fit(_fit_matrix(data, stage), show_progress=False)
        return model

    return tune("implicit ALS", True, "external", data, fit, grid, _implicit_scorer)


def run_bpr(data: Splits, quick: bool) -> dict:
    """BPR from implicit (the item bias rides in the factors)."""
    from implicit.bpr import BayesianPersonalizedRanking

    grid = [
        {"factors": f, "learning_rate": lr, "regularization": r, "iterations": 100}
        for f, lr, r in itertools.product(
            [64, 128] if not quick else [64],
            [0.005, 0.01, 0.05] if not quick else [0.01],
            [0.001, 0.01] if not quick else [0.01],
        )
    ]

    def fit(fp: dict, stage: str) -> Any:
        params = {k: v for k, v in fp.items() if not k.startswith("_")}
        model = BayesianPersonalizedRanking(**params, random_state=0, num_threads=2)
        model.fit(_fit_matrix(data, stage), show_progress=False)
        return model

    return tune("implicit BPR", True, "external", data, fit, grid, _implicit_scorer)


def run_itemknn(data: Splits, quick: bool) -> dict:
    """ItemKNN from implicit (``CosineRecommender``): score = history @ top-k cosine similarity."""
    from implicit.nearest_neighbours import CosineRecommender

    def fit(fp: dict, stage: str) -> Any:
        model = CosineRecommender(K=fp["k"], num_threads=2)
        model.fit(_fit_matrix(data, stage), show_progress=False)
        return model

    def scorer(model: Any, spr: dict, stage: str) -> ScoreFn:
        history = data.stage(stage)[0]
        sim = sp.csr_matrix(model.similarity)
        return lambda users: np.asarray((history[users] @ sim).toarray(), dtype=np.float32)

    ks = [10, 20, 50, 100, 200] if not quick else [20]
    return tune("ItemKNN cosine", True, "external", data, fit, [{"k": k} for k in ks], scorer)


class _ClosedFormCache:
    """EDLAE fits keyed by (params, stage): the EASE grid and EDLAE's p=0 points share them."""

    def __init__(self, data: Splits) -> None:
        self.data = data
        self.fits: dict[tuple, tuple[EDLAE, float]] = {}

    def fit(self, lam: float, p: float, zero_diagonal: bool, stage: str) -> tuple[EDLAE, float]:
        key = (lam, p, zero_diagonal, stage)
        if key not in self.fits:
            t0 = time.perf_counter()
            model = EDLAE(self.data.n_users, self.data.n_items, lam, p, zero_diagonal)
            model.fit(_fit_matrix(self.data, stage))
            self.fits[key] = (model, time.perf_counter() - t0)
        return self.fits[key]


def run_closed_form(data: Splits, quick: bool) -> list[dict]:
    """EASE (baseline) and ScaleRec's EDLAE + recency-weighted history."""
    cache = _ClosedFormCache(data)
    rows = []
    for label, baseline, fit_grid, score_grid in (
        (
            "EASE",
            True,
            [{"lambda": lam} for lam in ([200.0, 500.0, 1000.0] if not quick else [500.0])],
            [{}],
        ),
        (
            "ScaleRec EDLAE + recency",
            False,
            [
                {"lambda": lam, "dropout": p, "zero_diagonal": zd}
                for lam, p, zd in (
                    [
                        (200.0, 0.0, True),
                        (500.0, 0.0, True),
                        (200.0, 0.0, False),
                        (500.0, 0.0, False),
                        (200.0, 0.2, False),
                    ]
                    if not quick
                    else [(500.0, 0.0, True)]
                )
            ],
            [{"recency_tau": t} for t in ([0.0, 3.0, 5.0, 8.0, 12.0] if not quick else [0.0, 5.0])],
        ),
    ):
        used: list[float] = []

        def fit(fp: dict, stage: str, used: list[float] = used) -> EDLAE:
            model, seconds = cache.fit(
                fp["lambda"], fp.get("dropout", 0.0), fp.get("zero_diagonal", True), stage
            )
            used.append(seconds)
            return model

        def scorer(model: EDLAE, spr: dict, stage: str) -> ScoreFn:
            tau = spr.get("recency_tau", 0.0)
            history = data.recency(stage, tau)
            return lambda users: model.score(users, history[users])

        t0 = time.perf_counter()
        row = tune(label, baseline, "closed_form", data, fit, fit_grid, scorer, score_grid)
        # Charge every solve this row used, including ones another row computed first.
        wall = time.perf_counter() - t0
        row["seconds"] = round(max(wall, sum(used)), 1)
        rows.append(row)
    return rows


TORCH_LABELS = {
    "seq_ae": "ScaleRec sequence autoencoder",
    "mf": "ScaleRec MF",
    "two_tower": "ScaleRec two-tower",
}
MF_SETTINGS = (
    "model.embed_dim=128",
    "model.num_negatives=16384",  # >= the catalogue: the exact softmax
    "model.temperature=0.1",
    "model.normalize=true",
    "model.l2=0.0",
    "model.use_bias=false",
    "train.batch_size=2048",
    "train.lr=0.01",
)
"""MF's settings chosen on validation (cosine scores, exact softmax); two-tower shares them."""
TORCH_OVERRIDES: dict[str, tuple[str, ...]] = {"mf": MF_SETTINGS, "two_tower": MF_SETTINGS}
"""Per family, settings on top of ``--config`` (its model and train sections are seq_ae's)."""


def run_torch(
    data: Splits,
    family: str,
    config: str,
    lake: str,
    data_path: str,
    max_epochs: int,
    eval_every: int,
) -> dict:
    """MF or two-tower by Ray Train (``app.train.fit``), settings from ``config``.

    The epoch count is chosen on validation NDCG@10 (fit on train), then the model is refit on
    train + validation for that many epochs and scored on test as every other row is.
    """
    from app import train as app_train
    from app.config import load_config

    t0 = time.perf_counter()
    label = TORCH_LABELS[family]
    cfg = load_config(
        config,
        [
            f"model.name={family}",
            *TORCH_OVERRIDES.get(family, ()),
            f"lake={lake}",
            f"data.path={data_path}",
            "train.refit=false",
            f"train.eval_every={eval_every}",
            f"train.epochs={max_epochs}",
            "train.max_failures=0",
        ],
    )
    valid = app_train.fit(data.ds, cfg.model, cfg.train, seed=cfg.seed)
    metric = app_train.VALID_METRIC
    trials = [
        {"epochs": h["epoch"], metric: round(h[metric], 5)} for h in valid.history if metric in h
    ]
    for t in trials:
        print(f"  {label} epoch {t['epochs']}: valid ndcg@{K} {t[metric]:.4f}", flush=True)
    epochs, valid_ndcg = int(valid.best_metrics["epoch"]), float(valid.best_metrics[metric])

    refit_cfg = app_train.with_train(cfg, refit=True, epochs=epochs)
    model = app_train.fit(data.ds, refit_cfg.model, refit_cfg.train, seed=cfg.seed).model
    history, target = data.stage("test")
    weighted = model.history(data.ds, "train", "valid")  # ranked for the sequence model
    test = _metrics(lambda u: model.score(u, weighted[u]), history, target)
    seconds = time.perf_counter() - t0
    print(f"  {label} chosen {epochs} epochs: test ndcg@{K} {test[f'ndcg@{K}']:.4f}")
    m, tr = cfg.model, cfg.train
    params: dict[str, Any] = {"embed_dim": m.embed_dim}
    if family == "seq_ae":
        params |= {"recency_tau": m.recency_tau, "input_dropout": m.history_dropout}
        params |= {"window": m.seq_window, "cuts": m.seq_cuts, "min_cut": m.seq_min_cut}
    else:
        params["loss"] = m.loss
        if m.loss == "softmax" and m.num_negatives >= data.n_items:
            params["exact_softmax"] = True
        else:
            params["num_negatives"] = m.num_negatives
        params |= {"temperature": m.temperature, "l2": m.l2}
    if family == "mf":
        params |= {"normalize": m.normalize, "use_bias": m.use_bias}
    elif family == "two_tower":
        params["history_dropout"] = m.history_dropout
    params |= {
        "epochs": epochs,
        "lr": tr.lr,
        "batch_size": tr.batch_size,
        "num_workers": tr.num_workers,
        "cpus_per_worker": tr.cpus_per_worker,
        "seed": cfg.seed,
    }
    return {
        "model": label,
        "baseline": False,
        "trained_with": "ray_train",
        "params": params,
        f"valid_ndcg@{K}": valid_ndcg,
        **test,
        "seconds": round(seconds, 1),
        "trials": trials,
    }


def run_ray_tune(data: Splits, config: str, lake: str, data_path: str, samples: int | None) -> dict:
    """The Ray Tune search of ``config`` (``python -m jobs.tune``), its winner tested here.

    The search chooses on validation and refits on train + validation (``app.tune.run``); this
    row scores the registered model on test with the same metric code as every other row.
    """
    from app import tune as app_tune
    from app.config import AppConfig, load_config
    from app.store import load_model
    from app.train import CLOSED_FORM

    name = f"quality-{int(time.time())}"
    overrides = [f"lake={lake}", f"data.path={data_path}", f"tune.name={name}"]
    if samples is not None:
        overrides.append(f"tune.num_samples={samples}")
    cfg = load_config(config, overrides)
    t0 = time.perf_counter()
    record = app_tune.run(cfg, data.ds)
    wall = time.perf_counter() - t0
    chosen_cfg = AppConfig.model_validate(record.config)
    model, _ = load_model(data.ds.lake, record.name, record.version)
    history, target = data.stage("test")
    weighted = model.history(data.ds, "train", "valid")
    test = _metrics(lambda u: model.score(u, weighted[u]), history, target)
    search = record.lineage["tune"]
    params = {k.removeprefix("model."): v for k, v in search["trials"][0]["params"].items()}
    print(f"  Ray Tune: {len(search['trials'])} trials in {search['wall_s']:.0f} s, best {params}")
    return {
        "model": f"ScaleRec Ray Tune-selected ({chosen_cfg.model.name})",
        "baseline": False,
        "trained_with": "closed_form" if chosen_cfg.model.name in CLOSED_FORM else "ray_train",
        "params": params,
        f"valid_ndcg@{K}": float(record.metrics["valid_ndcg@10"]),
        **test,
        "seconds": round(wall, 1),
        "tune": {
            "trials": len(search["trials"]),
            "search_wall_s": search["wall_s"],
            "search_and_refit_wall_s": round(wall, 1),
            "searcher": search["searcher"],
            "registered_version": record.version,
        },
    }


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _params_text(params: dict) -> str:
    return ", ".join(
        f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in params.items()
    )


def table(rows: list[dict]) -> str:
    """Markdown table: per model how it was trained, chosen parameters, valid and test metrics."""
    head = (
        "| model | trained with | tuned on validation | valid NDCG@10 | NDCG@10 | Recall@10 "
        "| HR@10 | MRR@10 | coverage@10 | seconds |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['model']}{'' if r['baseline'] else ' (ours)'}"
            f" | {r['trained_with']}"
            f" | {_params_text(r['params']) or '–'}"
            f" | {r[f'valid_ndcg@{K}']:.4f} | {r[f'ndcg@{K}']:.4f} | {r[f'recall@{K}']:.4f}"
            f" | {r[f'hr@{K}']:.3f} | {r[f'mrr@{K}']:.4f} | {r[f'coverage@{K}']:.3f}"
            f" | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="one point per grid, few epochs")
    p.add_argument("--config", default="jobs/configs/ml-latest-small.yaml")
    p.add_argument("--lake", default="/tmp/scalerec-bench-quality/lake")
    p.add_argument("--data", default="../shared/data/ml-latest-small")
    p.add_argument("--torch-epochs", type=int, default=None, help="max epochs (60; quick 3)")
    p.add_argument("--eval-every", type=int, default=5, help="torch rows: validate every N")
    p.add_argument("--skip", nargs="*", default=[], help="leave out: seq_ae mf two_tower tune")
    p.add_argument(
        "--tune-samples", type=int, default=None, help="Ray Tune trials (config; quick 4)"
    )
    p.add_argument("--out", default="bench/results/quality.json")
    ns = p.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    max_epochs = ns.torch_epochs or (3 if ns.quick else 60)
    eval_every = min(ns.eval_every, max_epochs)

    t0 = time.perf_counter()
    data = Splits(load_data(ns.config, ns.lake, ns.data))
    print(
        f"ml-latest-small: {data.n_users} users, {data.n_items} items; train {data.train.nnz}, "
        f"valid {data.valid.nnz}, test {data.test.nnz} interactions",
        flush=True,
    )
    rows = [run_popularity(data), run_itemknn(data, ns.quick)]
    rows += [run_als(data, ns.quick), run_bpr(data, ns.quick)]
    rows += run_closed_form(data, ns.quick)
    families = [f for f in TORCH_LABELS if f not in ns.skip]
    if families or "tune" not in ns.skip:
        with small_ray():  # one cluster for the Ray Train rows and the Ray Tune search
            for family in families:
                rows.append(
                    run_torch(data, family, ns.config, ns.lake, ns.data, max_epochs, eval_every)
                )
            if "tune" not in ns.skip:
                samples = ns.tune_samples or (4 if ns.quick else None)
                rows.append(run_ray_tune(data, ns.config, ns.lake, ns.data, samples))
    order = {
        r: i for i, r in enumerate(["Popularity", "implicit ALS", "implicit BPR", "ItemKNN cosine"])
    }
    rows.sort(key=lambda r: (not r["baseline"], order.get(r["model"], 9)))

    base = [r for r in rows if r["baseline"]]
    ours = [r for r in rows if not r["baseline"]]
    best_base = max(base, key=lambda r: r[f"valid_ndcg@{K}"])  # chosen as ours is: on valid
    chosen = max(ours, key=lambda r: r[f"valid_ndcg@{K}"])
    ease = next(r for r in base if r["model"] == "EASE")
    best_base_test = max(base, key=lambda r: r[f"ndcg@{K}"])
    summary = {
        "ours": chosen["model"],
        "ours_params": chosen["params"],
        f"ours_test_ndcg@{K}": chosen[f"ndcg@{K}"],
        "ratio_vs_ease": chosen[f"ndcg@{K}"] / ease[f"ndcg@{K}"],
        "ratio_vs_best_baseline_on_test": chosen[f"ndcg@{K}"] / best_base_test[f"ndcg@{K}"],
        "best_baseline_on_test": best_base_test["model"],
        "best_baseline_on_valid": best_base["model"],
    }
    tuned = next((r for r in rows if "tune" in r), None)
    if tuned is not None:
        summary["tune_selected"] = tuned["model"]
        summary[f"tune_selected_test_ndcg@{K}"] = tuned[f"ndcg@{K}"]
        summary["tune_selected_ratio_vs_best_baseline_on_test"] = (
            tuned[f"ndcg@{K}"] / best_base_test[f"ndcg@{K}"]
        )
        summary["tune_search_wall_s_2_cpus"] = tuned["tune"]["search_wall_s"]
    text = table(rows)
    print(text)
    print(
        f"ours (best ScaleRec model on validation): {chosen['model']} test NDCG@{K} "
        f"{chosen[f'ndcg@{K}']:.4f} = {summary['ratio_vs_ease']:.3f}x EASE, "
        f"{summary['ratio_vs_best_baseline_on_test']:.3f}x the best baseline on test "
        f"({best_base_test['model']})"
    )
    result = {
        "benchmark": "quality",
        "dataset": {
            "name": "ml-latest-small",
            "version": data.ds.version,
            "users": data.n_users,
            "items": data.n_items,
            "train": int(data.train.nnz),
            "valid": int(data.valid.nnz),
            "test": int(data.test.nnz),
        },
        "protocol": "docs/design.md: temporal split, full ranking, valid-chosen, refit train+valid",
        "quick": ns.quick,
        "config": ns.config,
        "torch_training": "Ray Train (app.train.fit), model and train sections of config",
        "rows": rows,
        "summary": summary,
        "table": text,
        "wall_s": round(time.perf_counter() - t0, 1),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
    }
    out = Path(ns.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
