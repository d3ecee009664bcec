"""Batch prediction figure: users/s of ``app.predict.run`` vs a single-process loop.

python -m bench.batch_predict [--users 1000000] [--items 10000] [--actors 2]

Workload: a synthetic dataset version (``--users`` x ``--items``, 3 train + 1 valid + 1 test items
per user) and a registered MF model with random 64-dim embeddings. The same model, history and
output (top-10 raw ids and scores, Parquet) are produced by the Ray Data actor pool and by a plain
loop in this process, in the same run. Writes ``bench/results/batch_predict.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import posixpath
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from app import predict
from app.config import AppConfig, ClusterArgs, DataArgs, ModelArgs
from app.models import build_model
from app.store import (
    ITEM_ID,
    ITEM_IDX,
    USER_ID,
    USER_IDX,
    Lake,
    load_dataset,
    load_model,
    read_predictions,
    register,
    registry_name,
    write_dataset,
)

RESULTS = Path(__file__).parent / "results" / "batch_predict.json"
PER_USER = {"train": 3, "valid": 1, "test": 1}


def _write_dataset(lake: Lake, n_users: int, n_items: int) -> None:
    """``PER_USER`` random items per user and split; raw ids ``u<idx>`` and ``i<idx>``."""
    rng = np.random.default_rng(0)
    splits = {}
    for split, per in PER_USER.items():
        users = np.repeat(np.arange(n_users, dtype=np.int32), per)
        splits[split] = {USER_IDX: users, ITEM_IDX: rng.integers(n_items, size=len(users))}
    write_dataset(
        lake,
        "bench",
        "v-bench",
        splits,
        user_ids=[f"u{u}" for u in range(n_users)],
        item_ids=[f"i{i}" for i in range(n_items)],
        source={"kind": "bench.batch_predict"},
    )


def _single_process(lake: Lake, name: str, out_dir: str, batch: int) -> int:
    """The baseline: one loop, same model, history, top-K, id mapping and Parquet output."""
    model, _ = load_model(lake, name, "latest")
    ds = load_dataset(lake, "bench")
    history = ds.csr("train", "valid")
    user_ids = np.asarray(ds.users().column(USER_ID).to_pylist(), dtype=object)
    item_ids = np.asarray(ds.items().column(ITEM_ID).to_pylist(), dtype=object)
    rows = 0
    for part, start in enumerate(range(0, ds.n_users, batch)):
        users = np.arange(start, min(start + batch, ds.n_users))
        table = predict.predict_table(model, users, history[users], user_ids, item_ids, 10)
        pq.write_table(table, posixpath.join(out_dir, f"part-{part:05d}.parquet"))
        rows += table.num_rows
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--cpus-per-actor", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--num-cpus", type=int, default=None, help="embedded Ray cluster CPUs")
    args = parser.parse_args()

    from app import cluster

    root = tempfile.mkdtemp(prefix="bench-predict-")
    lake = Lake(posixpath.join(root, "lake"))
    cfg = AppConfig(
        lake=lake.uri,
        data=DataArgs(name="bench", source="synthetic"),
        model=ModelArgs(name="mf", embed_dim=64),
        cluster=ClusterArgs(num_cpus=args.num_cpus, progress_bars=False),
    )
    t0 = time.perf_counter()
    _write_dataset(lake, args.users, args.items)
    ds = load_dataset(lake, "bench")
    model = build_model(cfg.model, args.users, args.items, seed=0)
    name = registry_name(cfg.data.name, cfg.model.name)
    register(lake, name, model, cfg, ds, {})
    setup_s = time.perf_counter() - t0

    cluster.connect(cfg.cluster)
    t0 = time.perf_counter()
    path = predict.run(
        lake,
        name,
        None,
        k=10,
        num_actors=args.actors,
        num_cpus=args.cpus_per_actor,
        batch_size=args.batch,
    )
    ray_s = time.perf_counter() - t0
    rows = read_predictions(lake, "latest").num_rows

    base_dir = tempfile.mkdtemp(prefix="single-", dir=root)
    t0 = time.perf_counter()
    base_rows = _single_process(lake, name, base_dir, args.batch)
    single_s = time.perf_counter() - t0
    assert rows == base_rows == args.users, (rows, base_rows)

    import ray

    result = {
        "workload": {
            "users": args.users,
            "items": args.items,
            "dim": 64,
            "k": 10,
            "history_per_user": PER_USER["train"] + PER_USER["valid"],
            "actors": args.actors,
            "cpus_per_actor": args.cpus_per_actor,
            "batch": args.batch,
            "cluster_cpus": ray.cluster_resources().get("CPU"),
            "host_cpus": os.cpu_count(),
            "setup_s": setup_s,
        },
        "ray_data": {"seconds": ray_s, "users_per_s": args.users / ray_s, "path": path},
        "single_process": {"seconds": single_s, "users_per_s": args.users / single_s},
        "ratio_ray_over_single": single_s / ray_s,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    print(f"{'runner':16} {'seconds':>9} {'users/s':>10}")
    print(f"{'ray data pool':16} {ray_s:>9.1f} {args.users / ray_s:>10.0f}")
    print(f"{'single process':16} {single_s:>9.1f} {args.users / single_s:>10.0f}")
    print(f"ratio (ray / single): {single_s / ray_s:.2f}x")
    print(RESULTS)


if __name__ == "__main__":
    main()
