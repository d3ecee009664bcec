"""Offline evaluation stage: full-ranking top-K metrics for any ``Recommender``.

Run with ``python -m jobs.evaluate --config jobs/configs/<cfg>.yaml model=<version|alias>``.

Protocol (docs/design.md, "Evaluation protocol"): every item is a candidate except the user's
``history`` items (train for validation; train + validation for test). Metrics are averaged over
users with at least one relevant item:

- Recall@K = hits / min(K, |relevant|)
- NDCG@K with binary gains and the ideal DCG over min(K, |relevant|) items
- HR@K = 1 if any hit; MRR@K = 1 / rank of the first hit (0 without a hit)
- coverage@K = distinct items in all top-K lists of the evaluated users / number of items

Lists come from ``app.models.top_k`` (equal scores: lower item index first). Averages are
computed from exact (error-free) sums, so ``evaluate`` and the Ray Data version ``evaluate_ds``
give bit-identical numbers whatever the batching, as long as the model's scores themselves do
not depend on the batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import scipy.sparse as sp

from app.config import ModelArgs
from app.models import Recommender, build_model, top_k
from app.store import DatasetVersion, Lake, load_dataset, load_model, update_metrics

METRICS = ("ndcg", "recall", "hr", "mrr")
"""Per-user metrics, in the order of the result keys (coverage is a catalogue-level metric)."""

_TABLE_COLUMNS = ("ndcg", "recall", "hr", "mrr", "coverage")


def _discounts(k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-rank discounts 1/log2(rank + 1) and ideal DCG for 0..k relevant items."""
    disc = 1.0 / np.log2(np.arange(2, k + 2, dtype=np.float64))
    ideal = np.zeros(k + 1, dtype=np.float64)
    for j in range(k):
        ideal[j + 1] = ideal[j] + disc[j]
    return disc, ideal


def _hits(top: np.ndarray, relevant: sp.csr_matrix) -> np.ndarray:
    """Boolean ``(n_rows, k)``: whether ``top[r, j]`` is a relevant item of row ``r``."""
    n_rows, n_items = relevant.shape
    rel = sp.csr_matrix(relevant)
    rel.eliminate_zeros()
    rel.sum_duplicates()  # also sorts the indices
    rel_keys = np.repeat(np.arange(n_rows, dtype=np.int64), np.diff(rel.indptr)) * n_items
    rel_keys += rel.indices
    valid = top >= 0
    keys = np.arange(n_rows, dtype=np.int64)[:, None] * n_items + np.where(valid, top, 0)
    if rel_keys.size == 0:
        return np.zeros(top.shape, dtype=bool)
    pos = np.minimum(np.searchsorted(rel_keys, keys), rel_keys.size - 1)
    return valid & (rel_keys[pos] == keys)


def ranking_metrics(top: np.ndarray, relevant: sp.csr_matrix, k: int) -> dict[str, np.ndarray]:
    """Per-user NDCG@K, Recall@K, HR@K and MRR@K of top-K lists.

    Args:
        top: ``(n_rows, >=k)`` item indices, best first; ``-1`` marks an empty slot.
        relevant: ``(n_rows, n_items)`` matrix whose non-zero entries are the relevant items.
        k: Cut-off; only the first ``k`` columns of ``top`` count.

    Returns:
        ``{"ndcg@K", "recall@K", "hr@K", "mrr@K"}`` float64 arrays (NaN for rows without relevant
        items) and ``"n_relevant"`` (int64 counts).
    """
    top = np.asarray(top)[:, :k]
    if top.shape[0] != relevant.shape[0]:
        raise ValueError(f"top has {top.shape[0]} rows, relevant {relevant.shape[0]}")
    rel = sp.csr_matrix(relevant)
    rel.eliminate_zeros()
    rel.sum_duplicates()
    n_rel = np.diff(rel.indptr).astype(np.int64)
    hits = _hits(top, rel)
    disc, ideal = _discounts(k)
    n_rows, width = hits.shape
    # Accumulate column by column so that each user's value never depends on the batch shape.
    dcg = np.zeros(n_rows, dtype=np.float64)
    n_hits = np.zeros(n_rows, dtype=np.int64)
    rr = np.zeros(n_rows, dtype=np.float64)
    for j in range(width):
        h = hits[:, j]
        dcg += np.where(h, disc[j], 0.0)
        rr = np.where(h & (n_hits == 0), 1.0 / (j + 1), rr)
        n_hits += h
    denom = np.minimum(n_rel, k)
    has_rel = n_rel > 0
    safe = np.maximum(denom, 1)
    nan = np.float64("nan")
    return {
        f"ndcg@{k}": np.where(has_rel, dcg / ideal[safe], nan),
        f"recall@{k}": np.where(has_rel, n_hits / safe, nan),
        f"hr@{k}": np.where(has_rel, (n_hits > 0).astype(np.float64), nan),
        f"mrr@{k}": np.where(has_rel, rr, nan),
        "n_relevant": n_rel,
    }


def _partials(values: Iterable[float], partials: list[float] | None = None) -> list[float]:
    """Shewchuk's exact summation: non-overlapping floats whose sum is exactly the input's sum.

    ``math.fsum`` of the partials of several batches equals ``math.fsum`` of all the values, so
    batch results can be combined in any order with no rounding difference.
    """
    parts: list[float] = list(partials or [])
    for x in values:
        x = float(x)
        i = 0
        for y in parts:
            if abs(x) < abs(y):
                x, y = y, x
            hi = x + y
            lo = y - (hi - x)
            if lo:
                parts[i] = lo
                i += 1
            x = hi
        parts[i:] = [x]
    return parts


class _Accumulator:
    """Exact per-metric sums, the user count and the distinct recommended items."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.partials: dict[str, list[float]] = {m: [] for m in METRICS}
        self.users = 0
        self.items: list[np.ndarray] = []

    def add_batch(self, top: np.ndarray, target: sp.csr_matrix) -> None:
        per_user = ranking_metrics(top, target, self.k)
        keep = per_user["n_relevant"] > 0
        for m in METRICS:
            self.partials[m] = _partials(per_user[f"{m}@{self.k}"][keep], self.partials[m])
        self.users += int(keep.sum())
        chosen = top[keep]
        self.items.append(np.unique(chosen[chosen >= 0]))

    def add_summary(self, summary: dict[str, Any]) -> None:
        for m in METRICS:
            self.partials[m].extend(float(x) for x in summary[m])
        self.users += int(summary["users"])
        self.items.append(np.asarray(summary["items"], dtype=np.int64))

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {m: list(self.partials[m]) for m in METRICS}
        out["users"] = self.users
        out["items"] = np.unique(np.concatenate(self.items)) if self.items else np.zeros(0, int)
        return out

    def result(self, n_items: int) -> dict[str, float]:
        k = self.k
        n = self.users
        res = {f"{m}@{k}": (math.fsum(self.partials[m]) / n if n else 0.0) for m in METRICS}
        distinct = np.unique(np.concatenate(self.items)).size if self.items else 0
        res[f"coverage@{k}"] = distinct / n_items if n_items else 0.0
        res["users"] = n
        return res


def _eval_users(target: sp.csr_matrix) -> np.ndarray:
    """Rows of ``target`` with at least one relevant item."""
    t = sp.csr_matrix(target)
    t.eliminate_zeros()
    return np.flatnonzero(np.diff(t.indptr) > 0)


def _check_shapes(history: sp.csr_matrix, target: sp.csr_matrix) -> None:
    if history.shape != target.shape:
        raise ValueError(f"history has shape {history.shape} but target {target.shape}")


def evaluate(
    score_fn: Callable[[np.ndarray], np.ndarray],
    history: sp.csr_matrix,
    target: sp.csr_matrix,
    k: int = 10,
    batch_size: int = 1024,
) -> dict[str, float]:
    """Full-ranking metrics in this process, batched over users.

    Args:
        score_fn: Maps user indices to their ``(len(users), n_items)`` scores.
        history: ``(n_users, n_items)`` items excluded from each user's ranking.
        target: ``(n_users, n_items)`` relevant (held-out) items.
        k: Cut-off.
        batch_size: Users scored at once.

    Returns:
        ``ndcg@K``, ``recall@K``, ``hr@K``, ``mrr@K``, ``coverage@K`` and ``users`` (the number of
        users with at least one relevant item).
    """
    _check_shapes(history, target)
    history = sp.csr_matrix(history)
    target = sp.csr_matrix(target)
    acc = _Accumulator(k)
    users = _eval_users(target)
    for start in range(0, len(users), batch_size):
        batch = users[start : start + batch_size]
        scores = score_fn(batch)
        acc.add_batch(top_k(scores, history[batch], k).indices, target[batch])
    return acc.result(target.shape[1])


def evaluate_model(
    model: Recommender,
    history: sp.csr_matrix,
    target: sp.csr_matrix,
    k: int = 10,
    batch_size: int = 1024,
) -> dict[str, float]:
    """``evaluate`` with ``model.score(users, history[users])`` as the score function."""
    return evaluate(
        lambda users: model.score(users, history[users]), history, target, k, batch_size
    )


def validation_metrics(
    model: Recommender, history: sp.csr_matrix, target: sp.csr_matrix, k: int = 10
) -> dict[str, float]:
    """``evaluate_model``'s metrics under ``valid_`` keys (``valid_ndcg@10`` ...), no user count."""
    metrics = evaluate_model(model, history, target, k)
    return {f"valid_{key}": float(v) for key, v in metrics.items() if key != "users"}


class _EvalBatch:
    """Ray Data actor: holds the model and matrices, turns a batch of users into exact sums."""

    def __init__(self, refs: dict[str, Any], k: int) -> None:
        import ray

        # The refs are nested in a dict so Ray does not resolve them: fetch them once per actor.
        self.model = ray.get(refs["model"])
        self.history = ray.get(refs["history"])
        self.target = ray.get(refs["target"])
        self.users = ray.get(refs["users"])
        self.k = k

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        users = self.users[np.asarray(batch["id"], dtype=np.int64)]
        acc = _Accumulator(self.k)
        hist = self.history[users]
        scores = self.model.score(users, hist)
        acc.add_batch(top_k(scores, hist, self.k).indices, self.target[users])
        summary = acc.summary()
        # One row per batch; ragged columns are stored as object arrays of 1-D arrays.
        out: dict[str, np.ndarray] = {"users": np.array([summary["users"]], dtype=np.int64)}
        for name in (*METRICS, "items"):
            col = np.empty(1, dtype=object)
            col[0] = np.asarray(summary[name], dtype=np.float64 if name != "items" else np.int64)
            out[name] = col
        return out


def evaluate_ds(
    model: Recommender,
    history: sp.csr_matrix,
    target: sp.csr_matrix,
    k: int = 10,
    batch_size: int = 256,
    *,
    num_actors: int = 2,
    num_cpus: float = 0.5,
) -> dict[str, float]:
    """The same metrics as ``evaluate``, computed with Ray Data over batches of users.

    The model and both matrices are put in the object store once; a pool of ``num_actors`` actors
    (``num_cpus`` each, fractional so that it fits a 2-CPU machine) scores batches of users and
    returns exact partial sums and the distinct recommended items, which the driver reduces.
    Same arguments and result as ``evaluate``, with ``model.score(users, history[users])``
    as the score function.
    """
    import ray
    import ray.data

    _check_shapes(history, target)
    history = sp.csr_matrix(history)
    target = sp.csr_matrix(target)
    users = _eval_users(target)
    acc = _Accumulator(k)
    if len(users):
        refs = {
            "model": ray.put(model),
            "history": ray.put(history),
            "target": ray.put(target),
            "users": ray.put(users),
        }
        n_batches = math.ceil(len(users) / batch_size)
        ds = ray.data.range(len(users), override_num_blocks=min(n_batches, 64)).map_batches(
            _EvalBatch,
            batch_size=batch_size,
            batch_format="numpy",
            fn_constructor_kwargs={"refs": refs, "k": k},
            compute=ray.data.ActorPoolStrategy(size=max(1, min(num_actors, n_batches))),
            num_cpus=num_cpus,
        )
        for row in ds.iter_rows():
            acc.add_summary(row)
    return acc.result(target.shape[1])


def metrics_table(rows: list[dict[str, Any]]) -> str:
    """Fixed-width table of model metrics: one row per dict with ``model`` and metric keys.

    The cut-off is read from the keys (``ndcg@10`` ...); missing values print as ``-``.
    """
    k = 10
    for row in rows:
        for key in row:
            if key.startswith("ndcg@"):
                k = int(key.split("@", 1)[1])
                break
    cols = [f"{c}@{k}" for c in _TABLE_COLUMNS]
    names = [str(r.get("model", "")) for r in rows]
    width = max([len("model"), *map(len, names)])
    col_w = max(len(c) for c in cols) + 2
    lines = ["model".ljust(width) + "".join(c.rjust(col_w) for c in cols)]
    lines.append("-" * len(lines[0]))
    for name, row in zip(names, rows, strict=True):
        cells = []
        for c in cols:
            v = row.get(c)
            cells.append(("-" if v is None else f"{float(v):.4f}").rjust(col_w))
        lines.append(name.ljust(width) + "".join(cells))
    return "\n".join(lines)


def margin_line(model: dict[str, Any], baselines: list[dict[str, Any]], k: int = 10) -> str:
    """One sentence comparing ``model``'s NDCG@k with the best of ``baselines`` (relative)."""
    key = f"ndcg@{k}"
    scored = [b for b in baselines if b.get(key) is not None]
    if not scored or model.get(key) is None:
        return f"no baseline with {key} to compare with"
    best = max(scored, key=lambda b: float(b[key]))
    ours, theirs = float(model[key]), float(best[key])
    rel = (ours - theirs) / theirs * 100 if theirs > 0 else float("inf")
    verdict = "ahead of" if ours > theirs else "behind"
    return (
        f"{model['model']} is {verdict} the best baseline, {best['model']}: "
        f"{key} {ours:.4f} vs {theirs:.4f} ({rel:+.1f} %)"
    )


def run(lake: Lake, name: str, model_ref: str = "latest") -> dict[str, float]:
    """Evaluate a registered model on its dataset version's test split; store and return metrics.

    History is train + validation (the protocol's test setting) whether the model was refit on
    train + validation or fit on train only; the latter is recorded as ``test_fit_on: train``.
    Metrics are merged into the version's ``metrics.json`` as ``ndcg@10`` ... plus ``test_users``.

    Args:
        lake: The lake holding the registry.
        name: Registry name of the model.
        model_ref: Version id, unique prefix, ``latest`` or an alias.
    """
    model, record = load_model(lake, name, model_ref)
    ds_info = record.lineage["dataset"]
    dataset = load_dataset(lake, ds_info["name"], ds_info["version"])
    # The model's own history (e.g. recency-weighted); its pattern is train + valid.
    history = model.history(dataset, "train", "valid")
    metrics = evaluate_ds(model, history, dataset.csr("test"))
    refit = bool(record.config.get("train", {}).get("refit", False))
    # Test metrics under the bare keys (``ndcg@10`` ...); validation ones carry ``valid_``.
    stored: dict[str, Any] = {key: value for key, value in metrics.items() if key != "users"}
    stored["test_users"] = int(metrics["users"])
    stored["test_fit_on"] = "train+valid" if refit else "train"
    stored["test_dataset_version"] = dataset.version
    update_metrics(lake, name, record.version, stored)
    return metrics


def baselines(
    dataset: DatasetVersion, k: int = 10, ease_lambda: float = 500.0
) -> list[dict[str, Any]]:
    """Popularity and EASE refit on train + validation and scored on test, for comparison tables.

    EASE is skipped (with a note in the row) when the catalogue is too large for its dense
    item-item matrix.
    """
    history = dataset.csr("train", "valid")
    target = dataset.csr("test")
    rows: list[dict[str, Any]] = []
    for args in (ModelArgs(name="popularity"), ModelArgs(name="ease", ease_lambda=ease_lambda)):
        try:
            model = build_model(args, dataset.n_users, dataset.n_items)
        except ValueError as exc:
            rows.append({"model": f"{args.name} (skipped: {exc})"})
            continue
        model.fit(history)
        metrics = evaluate_model(model, history, target, k=k)
        label = args.name if args.name != "ease" else f"ease (lambda {ease_lambda:g})"
        rows.append({"model": f"{label} [baseline]", **metrics})
    return rows
