"""Compression figure: size, top-10 retrieval latency and NDCG@10 of none / fp16 / int8.

python -m bench.compress [--items 1000000] [--epochs 10]

Trains an MF model (``TorchRecommender.fit`` in process, exact softmax) on ml-latest-small
ingested with ``app.ingest.run`` into a temporary lake, evaluates each variant under the test
protocol, and times top-10 search on that catalogue and on a synthetic 1M-item x 64-dim table
against the fp32 baseline (numpy product + ``app.models.top_k``). Writes
``bench/results/compress.json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.config import DataArgs, ModelArgs
from app.evaluate import evaluate
from app.models import (
    QUANTIZE_MODES,
    EmbeddingTable,
    QuantizedRecommender,
    TorchRecommender,
    build_model,
    state_nbytes,
    top_k,
)

RESULTS = Path(__file__).parent / "results" / "compress.json"
ML_SMALL = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-latest-small")


def _median_ms(fn: Any, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def _train_mf(train: Any, epochs: int, seed: int = 0) -> TorchRecommender:
    n_users, n_items = train.shape
    args = ModelArgs(name="mf", embed_dim=64, num_negatives=n_items, temperature=0.1)
    model = build_model(args, n_users, n_items, seed=seed)
    assert isinstance(model, TorchRecommender)
    return model.fit(train, epochs=epochs, seed=seed)


def _search_ndcg(model: Any, history: Any, target: Any) -> float:
    """NDCG@10 of the lists that ``search`` (the serving path) returns."""

    def score_fn(users: np.ndarray) -> np.ndarray:
        idx, _ = model.search(users, history[users], 10)
        scores = np.full((len(users), model.n_items), -np.inf, dtype=np.float32)
        rows = np.repeat(np.arange(len(users)), 10)
        ok = idx.ravel() >= 0
        scores[rows[ok], idx.ravel()[ok]] = np.tile(np.arange(10, 0, -1), len(users))[ok]
        return scores

    return evaluate(score_fn, history, target)["ndcg@10"]


def _latency(x: np.ndarray, batch: int, reps: int) -> dict[str, Any]:
    rng = np.random.default_rng(1)
    queries = x[rng.integers(len(x), size=batch)] + 0.1 * rng.standard_normal(
        (batch, x.shape[1]), dtype=np.float32
    )
    exact = top_k(queries @ x.T, None, 10).indices
    out: dict[str, Any] = {
        "numpy_bruteforce_ms": _median_ms(lambda: top_k(queries @ x.T, None, 10), reps)
    }
    for mode in QUANTIZE_MODES:
        table = EmbeddingTable.from_float(x, mode)
        idx, _ = table.search(queries, 10)
        overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(idx, exact, strict=True)])
        out[mode] = {
            "bytes": table.nbytes(),
            "ms": _median_ms(lambda t=table: t.search(queries, 10), reps),
            "top10_overlap": float(overlap),
        }
    out["int8_speedup_vs_none"] = out["none"]["ms"] / out["int8"]["ms"]
    out["int8_size_ratio"] = out["none"]["bytes"] / out["int8"]["bytes"]
    return out


def _synthetic_table(n: int, d: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((256, d)).astype(np.float32)
    x = centres[rng.integers(256, size=n)]
    x += 0.5 * rng.standard_normal((n, d), dtype=np.float32)
    return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)

    from app import cluster, ingest
    from app.config import ClusterArgs
    from app.store import Lake

    cluster.connect(ClusterArgs(num_cpus=2, progress_bars=False))
    lake = Lake(tempfile.mkdtemp(prefix="bench-compress-"))
    ds = ingest.run(
        DataArgs(name="ml-latest-small", source="movielens", path=ML_SMALL), lake, seed=42
    )
    history, target = ds.csr("train", "valid"), ds.csr("test")
    t0 = time.perf_counter()
    mf = _train_mf(history, args.epochs)
    train_s = time.perf_counter() - t0
    full_bytes = state_nbytes(mf.state_dict())
    rows: dict[str, Any] = {}
    for mode in QUANTIZE_MODES:
        # The "none" wrapper keeps fp32 and gives the same search path as the baseline.
        model = QuantizedRecommender(mf, mode)
        scored = evaluate(lambda b, m=model: m.score(b, history[b]), history, target)
        rows[mode] = {
            "model_bytes": state_nbytes(model.state_dict()),
            "ndcg@10": scored["ndcg@10"],
            "recall@10": scored["recall@10"],
        }
        rows[mode]["ndcg@10_search_path"] = _search_ndcg(model, history, target)
    for mode in QUANTIZE_MODES:
        rows[mode]["size_ratio"] = full_bytes / rows[mode]["model_bytes"]
        rows[mode]["ndcg_rel_change"] = rows[mode]["ndcg@10"] / rows["none"]["ndcg@10"] - 1.0
    items = mf.item_embeddings()
    result = {
        "workload": {
            "dataset": f"ml-latest-small {ds.n_users} users x {ds.n_items} items",
            "model": "MF 64 dims, exact softmax, fit on train+valid, test protocol",
            "train_s": train_s,
            "synthetic_items": args.items,
            "torch_threads": torch.get_num_threads(),
        },
        "quality": rows,
        "latency_ml_small": {
            "single": _latency(items, 1, args.reps),
            "batch256": _latency(items, 256, args.reps),
        },
    }
    big = _synthetic_table(args.items, 64)
    result["latency_synthetic"] = {
        "single": _latency(big, 1, args.reps),
        "batch64": _latency(big, 64, max(3, args.reps // 2)),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    print(f"{'mode':6} {'bytes':>10} {'ratio':>6} {'ndcg@10':>8} {'rel':>8}")
    for mode, r in rows.items():
        print(
            f"{mode:6} {r['model_bytes']:>10} {r['size_ratio']:>6.2f} {r['ndcg@10']:>8.4f} "
            f"{r['ndcg_rel_change']:>+8.4f}"
        )
    for name, lat in [*result["latency_ml_small"].items(), *result["latency_synthetic"].items()]:
        cells = " ".join(f"{m}={lat[m]['ms']:.2f}ms" for m in QUANTIZE_MODES)
        print(
            f"{name:9} numpy={lat['numpy_bruteforce_ms']:.2f}ms {cells} "
            f"int8x={lat['int8_speedup_vs_none']:.2f}"
        )
    print(RESULTS)


if __name__ == "__main__":
    main()
