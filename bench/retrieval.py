"""Top-10 retrieval latency over 1M items x 64 dims: ScaleRec's retriever vs brute-force numpy.

python -m bench.retrieval [--items 1000000 --dim 64 --repeats 15]  → bench/results/retrieval.json

Both sides do exact search (every item scored) and exclude 20 seen items per user. ScaleRec's
``app.models.top_k_dot`` (numpy BLAS over column-major items + the chunked ``top_k``, what the
retriever runs) is timed for one user and for batches of 16 and 64 users; the baseline is
``numpy`` ``u @ V.T`` + ``argpartition`` + sort per call. Medians of ``--repeats`` runs, same
process, same data.

``--ann-items N`` (default 200k; 0 skips) adds the approximate path the retriever takes for
large catalogues (faiss HNSW, ``app/serve/ann.py``) over the first N of those items: its build
time, its latency per batch against exact ``top_k_dot`` over the same N items, and its
recall@10 against the exact lists. The items are Gaussian noise, the hardest case for a graph
index; trained embeddings are clustered and easier.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from app.models import item_matrix, top_k_dot
from app.serve.ann import AnnIndex

K = 10


def numpy_top_k(
    users: np.ndarray, items: np.ndarray, exclude: list[np.ndarray], k: int
) -> np.ndarray:
    """Brute force: one matrix-vector product and argpartition per user."""
    out = np.empty((len(users), k), dtype=np.int64)
    for row, u in enumerate(users):
        s = items @ u
        s[exclude[row]] = -np.inf
        part = np.argpartition(s, len(s) - k)[-k:]
        out[row] = part[np.argsort(-s[part], kind="stable")]
    return out


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up (page faults, thread pools)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--ann-items", type=int, default=200_000, help="HNSW rows (0: skip)")
    p.add_argument("--out", default="bench/results/retrieval.json")
    ns = p.parse_args(argv)
    torch.set_num_threads(ns.threads)
    rng = np.random.default_rng(0)
    items = rng.standard_normal((ns.items, ns.dim), dtype=np.float32)
    items_t = item_matrix(items)
    rows = []
    for batch in (1, 16, 64):
        users = rng.standard_normal((batch, ns.dim), dtype=np.float32)
        exclude = [rng.choice(ns.items, 20, replace=False) for _ in range(batch)]
        ours, _ = top_k_dot(users, items_t, exclude, K)
        base = numpy_top_k(users, items, exclude, K)
        assert (ours == base).mean() > 0.99, "the two searches disagree"
        t_ours = _median_ms(lambda u=users, e=exclude: top_k_dot(u, items_t, e, K), ns.repeats)
        t_base = _median_ms(lambda u=users, e=exclude: numpy_top_k(u, items, e, K), ns.repeats)
        rows.append(
            {
                "batch": batch,
                "scalerec_ms": round(t_ours, 3),
                "scalerec_ms_per_user": round(t_ours / batch, 3),
                "numpy_ms": round(t_base, 3),
                "numpy_ms_per_user": round(t_base / batch, 3),
                "speedup": round(t_base / t_ours, 2),
            }
        )
    ann = _ann_rows(items[: ns.ann_items], rng, ns.repeats) if ns.ann_items else None
    result = {
        "ann": ann,
        "workload": f"exact top-{K} over {ns.items:,} items x {ns.dim} dims (float32), 20 "
        "excluded items per user",
        "threads": ns.threads,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "baseline": "numpy items @ u + argpartition + sort, one user at a time",
        "rows": rows,
    }
    print(
        f"{'batch':>5} {'scalerec ms':>12} {'per user':>9} {'numpy ms':>9} {'per user':>9} {'x':>6}"
    )
    for r in rows:
        print(
            f"{r['batch']:>5} {r['scalerec_ms']:>12.2f} {r['scalerec_ms_per_user']:>9.2f} "
            f"{r['numpy_ms']:>9.2f} {r['numpy_ms_per_user']:>9.2f} {r['speedup']:>6.2f}"
        )
    if ann:
        print(f"HNSW over {ann['items']:,} items: built in {ann['build_s']} s")
        print(f"{'batch':>5} {'hnsw ms':>9} {'exact ms':>9} {'x':>6} {'recall@10':>10}")
        for r in ann["rows"]:
            print(
                f"{r['batch']:>5} {r['hnsw_ms']:>9.2f} {r['exact_ms']:>9.2f} "
                f"{r['speedup']:>6.2f} {r['recall_at_10']:>10.3f}"
            )
    Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
    Path(ns.out).write_text(json.dumps(result, indent=2))
    return result


def _ann_rows(items: np.ndarray, rng: np.random.Generator, repeats: int) -> dict:
    """HNSW against exact top-k over the same items: build time, latency, recall@10."""
    t0 = time.perf_counter()
    index = AnnIndex(items)
    build_s = time.perf_counter() - t0
    exact_items = item_matrix(items)
    rows = []
    for batch in (1, 16, 64):
        users = rng.standard_normal((batch, items.shape[1]), dtype=np.float32)
        exclude = [rng.choice(len(items), 20, replace=False) for _ in range(batch)]
        got, _, _ = index.search(users, exclude, K)
        want, _ = top_k_dot(users, exact_items, exclude, K)
        recall = float(np.mean([len(set(a) & set(b)) / K for a, b in zip(got, want, strict=True)]))
        t_ann = _median_ms(lambda u=users, e=exclude: index.search(u, e, K), repeats)
        t_exact = _median_ms(lambda u=users, e=exclude: top_k_dot(u, exact_items, e, K), repeats)
        rows.append(
            {
                "batch": batch,
                "hnsw_ms": round(t_ann, 3),
                "exact_ms": round(t_exact, 3),
                "speedup": round(t_exact / t_ann, 2),
                "recall_at_10": round(recall, 3),
            }
        )
    return {"items": len(items), "build_s": round(build_s, 1), "rows": rows}


if __name__ == "__main__":
    main()
