"""Batch prediction figure: users/s and peak memory of ``app.predict.run`` vs a single process.

python -m bench.batch_predict [--quick] [--users 1000000] [--items 100000] [--dim 64]
    [--actors N] [--cpus-per-actor 1] [--batch 4096] [--chunk N] [--num-cpus N] [--repeats 1]

Workload (the issue's by default): a synthetic dataset version of ``--users`` x ``--items`` (3
train + 1 valid + 1 test random items per user) and a registered MF model with random
``--dim``-dim embeddings; the top 10 per user, train + valid items excluded, raw ids and scores
in Parquet. ``--quick`` is a smoke run at 20,000 x 20,000. The lake is built once per workload
(in a subprocess) under ``--workdir`` and reused.

Both paths run ``app.predict.Ranker`` (loaded from the lake, one matrix product per chunk of
users, known items masked from the CSR, ``top_k``) on the same batches and chunks:

- ``single_process``: a plain loop in a subprocess, torch and BLAS at every core, one Parquet
  file per batch; memory: peak RSS (``ru_maxrss``) and peak PSS of that process. The single
  runs go first, before Ray starts.
- ``ray_data``: ``app.predict.run`` on an embedded Ray cluster (``--num-cpus`` logical CPUs);
  memory: the peak summed PSS of the driver and every process it started (GCS, raylet, agents,
  actors, write tasks; object-store pages count once), sampled as ``bench.ingest`` does.

Each run records the host's load average before and after it. Ray's lists are compared with
the single process's, user by user. Writes ``bench/results/batch_predict.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import posixpath
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bench.ingest import MemorySampler

RESULTS = Path(__file__).parent / "results" / "batch_predict.json"
PER_USER = {"train": 3, "valid": 1, "test": 1}
K = 10
DATASET = "bench"
QUICK = {"users": 20_000, "items": 20_000}
FULL = {"users": 1_000_000, "items": 100_000}
SCORE_RTOL = 1e-5
"""Positional score difference tolerated between the two outputs (float rounding only)."""


def _name() -> str:
    from app.store import registry_name

    return registry_name(DATASET, "mf")


# ---------------------------------------------------------------- workload (subprocess)


def _setup(lake_dir: str, n_users: int, n_items: int, dim: int) -> None:
    """Publish the dataset version and register the model (random embeddings, seed 0)."""
    from app.config import AppConfig, DataArgs, ModelArgs
    from app.models import build_model
    from app.store import ITEM_IDX, USER_IDX, Lake, load_dataset, register, write_dataset

    lake = Lake(lake_dir)
    rng = np.random.default_rng(0)
    splits = {}
    for split, per in PER_USER.items():
        users = np.repeat(np.arange(n_users, dtype=np.int32), per)
        splits[split] = {USER_IDX: users, ITEM_IDX: rng.integers(n_items, size=len(users))}
    write_dataset(
        lake,
        DATASET,
        "v-bench",
        splits,
        user_ids=[f"u{u}" for u in range(n_users)],
        item_ids=[f"i{i}" for i in range(n_items)],
        source={"kind": "bench.batch_predict"},
    )
    cfg = AppConfig(
        lake=lake.uri,
        data=DataArgs(name=DATASET, source="synthetic"),
        model=ModelArgs(name="mf", embed_dim=dim),
    )
    model = build_model(cfg.model, n_users, n_items, seed=0)
    register(lake, _name(), model, cfg, load_dataset(lake, DATASET), {})


def _ensure_lake(workdir: Path, n_users: int, n_items: int, dim: int) -> tuple[Path, float]:
    """The workload's lake (built once; the driver's memory stays clean) and the build time."""
    lake_dir = workdir / f"lake-u{n_users}-i{n_items}-d{dim}"
    marker = lake_dir / "_BENCH_READY"
    if marker.is_file():
        return lake_dir, 0.0
    shutil.rmtree(lake_dir, ignore_errors=True)
    print(f"building the workload lake {lake_dir}", flush=True)
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "bench.batch_predict", "--_setup", str(lake_dir)]
    sizes = ["--users", str(n_users), "--items", str(n_items), "--dim", str(dim)]
    subprocess.run([*cmd, *sizes], check=True)
    marker.touch()
    return lake_dir, time.perf_counter() - t0


# ---------------------------------------------------------------- single process


def _threads() -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {"torch": torch.get_num_threads()}
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return out
    for pool in threadpool_info():
        out[f"{pool['user_api']}:{pool['internal_api']}"] = pool["num_threads"]
    return out


def _single_main(lake_dir: str, out_dir: str, batch: int, chunk: int) -> None:
    """Subprocess entry point: the plain loop; prints its result as one JSON line."""
    import torch

    from app import predict
    from app.store import Lake, load_dataset, resolve

    torch.set_num_threads(os.cpu_count() or 1)  # BLAS already uses every core by default
    t0 = time.perf_counter()
    lake = Lake(lake_dir)
    ds = load_dataset(lake, DATASET)
    version = resolve(lake, _name(), "latest")
    ranker = predict.Ranker.load(lake, _name(), version, ds, K, chunk_rows=chunk)
    rows = 0
    for part, start in enumerate(range(0, ds.n_users, batch)):
        table = ranker.predict(np.arange(start, min(start + batch, ds.n_users)))
        pq.write_table(table, posixpath.join(out_dir, f"part-{part:05d}.parquet"))
        rows += table.num_rows
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {"seconds": seconds, "rows": rows, "max_rss_mb": round(peak, 1)}
    print(json.dumps({**result, "threads": _threads()}), flush=True)


def _run_single(lake_dir: Path, out_dir: Path, batch: int, chunk: int) -> dict[str, Any]:
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    from app.predict import THREAD_ENV

    cmd = [sys.executable, "-m", "bench.batch_predict", "--_single", str(lake_dir), str(out_dir)]
    # Every core for BLAS and OpenMP, whatever this shell sets: the baseline's full speed.
    env = {**os.environ, **dict.fromkeys(THREAD_ENV, str(os.cpu_count() or 1))}
    load_before = os.getloadavg()
    proc = subprocess.Popen(
        [*cmd, "--batch", str(batch), "--chunk", str(chunk)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    sampler = MemorySampler(proc.pid)
    sampler.start()
    stdout, _ = proc.communicate()
    sampler.stop()
    load_after = os.getloadavg()
    if proc.returncode:
        raise RuntimeError(f"the single process failed with exit code {proc.returncode}")
    result = json.loads(stdout.strip().splitlines()[-1])
    mem = sampler.report()
    return {
        "seconds": round(result["seconds"], 2),
        "rows": result["rows"],
        "threads": result["threads"],
        "peak_rss_mb": result["max_rss_mb"],
        "peak_pss_mb": mem["peak_pss_mb"],
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in load_after],
    }


# ---------------------------------------------------------------- Ray Data


def _idle_pss_mb() -> float:
    sampler = MemorySampler(os.getpid())
    sampler.start()
    time.sleep(2.0)  # a few PSS samples of the idle cluster
    sampler.stop()
    return float(sampler.report()["peak_pss_mb"])


def _run_ray(lake: Any, args: argparse.Namespace, batch: int, chunk: int) -> dict[str, Any]:
    from app import predict

    # A published folder is returned as is: remove it so every run predicts.
    shutil.rmtree(lake.path("predictions"), ignore_errors=True)
    load_before = os.getloadavg()
    sampler = MemorySampler(os.getpid())
    sampler.start()
    t0 = time.perf_counter()
    path = predict.run(
        lake,
        _name(),
        None,
        k=K,
        num_actors=args.actors,
        num_cpus=args.cpus_per_actor,
        batch_size=batch,
        chunk_rows=chunk,
    )
    seconds = time.perf_counter() - t0
    sampler.stop()
    load_after = os.getloadavg()
    return {
        "seconds": round(seconds, 2),
        "path": path,
        **sampler.report(),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in load_after],
    }


# ---------------------------------------------------------------- outputs


def _compare(ray_t: pa.Table, single_t: pa.Table, n_users: int) -> dict[str, Any]:
    """How Ray's lists differ from the single process's, user by user.

    They match when both hold a row for each of the ``n_users`` users, with lists of the same
    lengths whose scores agree position by position within ``SCORE_RTOL``: items may then differ
    only where scores tie up to float rounding.
    """
    out: dict[str, Any] = {"ray_rows": ray_t.num_rows, "single_rows": single_t.num_rows}
    if not ray_t.num_rows == single_t.num_rows == n_users:
        return {**out, "match": False, "reason": f"row counts differ from {n_users} users"}
    a, b = (t.sort_by("user_id") for t in (ray_t, single_t))
    if not a.column("user_id").equals(b.column("user_id")):
        return {**out, "match": False, "reason": "user ids differ"}
    ia, ib = (t.column("items").combine_chunks() for t in (a, b))
    offsets = ia.offsets.to_numpy()
    if not np.array_equal(offsets, ib.offsets.to_numpy()):
        return {**out, "match": False, "reason": "list lengths differ"}
    same = pc.equal(ia.flatten(), ib.flatten()).to_numpy(zero_copy_only=False)
    sa, sb = (t.column("scores").combine_chunks().flatten().to_numpy() for t in (a, b))
    diff = np.abs(sa.astype(np.float64) - sb)
    row_of = np.repeat(np.arange(a.num_rows), np.diff(offsets))
    differing = len(np.unique(row_of[~same]))
    close = bool(np.all(diff <= SCORE_RTOL * (1.0 + np.abs(sa))))
    return {
        **out,
        "match": close,
        "identical_rows": a.num_rows - differing,
        "differing_rows": differing,
        "max_abs_score_diff": float(diff.max()) if len(diff) else 0.0,
    }


# ---------------------------------------------------------------- driver


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return round(statistics.median(r[key] for r in runs), 2)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Run the benchmark and write ``bench/results/batch_predict.json``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run at 20,000 x 20,000")
    p.add_argument("--users", type=int, help=f"default {FULL['users']:,}")
    p.add_argument("--items", type=int, help=f"default {FULL['items']:,}")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--actors", type=int, default=None, help="default: one per free CPU")
    p.add_argument("--cpus-per-actor", type=float, default=1.0)
    p.add_argument("--batch", type=int, default=4096, help="users per batch")
    p.add_argument("--chunk", type=int, default=None, help="users per matrix product")
    p.add_argument("--num-cpus", type=int, default=None, help="embedded Ray cluster CPUs")
    p.add_argument("--repeats", type=int, default=1, help="runs per path; medians reported")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/scalerec-bench-predict"))
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--_setup", help=argparse.SUPPRESS)
    p.add_argument("--_single", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    n_users = args.users or sizes["users"]
    n_items = args.items or sizes["items"]
    if args._setup:
        _setup(args._setup, n_users, n_items, args.dim)
        return None
    from app import predict

    chunk = args.chunk or predict.default_chunk_rows(n_items)
    if args._single:
        _single_main(args._single[0], args._single[1], args.batch, chunk)
        return None

    lake_dir, setup_s = _ensure_lake(args.workdir, n_users, n_items, args.dim)
    single_out = args.workdir / "single-out"
    singles = []
    for rep in range(args.repeats):
        print(f"single process, run {rep + 1}/{args.repeats}", flush=True)
        singles.append(_run_single(lake_dir, single_out, args.batch, chunk))
        print(f"  {singles[-1]['seconds']:.1f} s", flush=True)

    from app import cluster
    from app.config import ClusterArgs
    from app.store import Lake, read_predictions

    cluster.connect(ClusterArgs(num_cpus=args.num_cpus, progress_bars=False))
    import ray

    cluster_cpus = ray.cluster_resources().get("CPU")
    n_batches = -(-n_users // args.batch)
    actors = predict.pool_size(args.cpus_per_actor, n_batches, args.actors)
    idle_mb = _idle_pss_mb()
    lake = Lake(str(lake_dir))
    rays = []
    try:
        for rep in range(args.repeats):
            print(f"ray data, run {rep + 1}/{args.repeats}", flush=True)
            rays.append(_run_ray(lake, args, args.batch, chunk))
            print(f"  {rays[-1]['seconds']:.1f} s", flush=True)
        outputs = _compare(read_predictions(lake, "latest"), pq.read_table(single_out), n_users)
    finally:
        ray.shutdown()

    ray_s, single_s = _median(rays, "seconds"), _median(singles, "seconds")
    ray_pss, single_rss = _median(rays, "peak_pss_mb"), _median(singles, "peak_rss_mb")
    result = {
        "benchmark": "batch_predict",
        "workload": {
            "users": n_users,
            "items": n_items,
            "dim": args.dim,
            "k": K,
            "history_per_user": PER_USER["train"] + PER_USER["valid"],
            "actors": actors,
            "cpus_per_actor": args.cpus_per_actor,
            "threads_per_actor": max(1, int(args.cpus_per_actor)),
            "batch": args.batch,
            "chunk": chunk,
            "cluster_cpus": cluster_cpus,
            "host_cpus": os.cpu_count(),
            "quick": args.quick,
            "setup_s": round(setup_s, 1),
            "setup_cached": setup_s == 0.0,
        },
        "ray_data": {
            "seconds": ray_s,
            "users_per_s": round(n_users / ray_s),
            "path": rays[-1]["path"],
            "peak_pss_mb": ray_pss,
            "idle_cluster_pss_mb": idle_mb,
            "runs": rays,
        },
        "single_process": {
            "seconds": single_s,
            "users_per_s": round(n_users / single_s),
            "peak_rss_mb": single_rss,
            "peak_pss_mb": _median(singles, "peak_pss_mb"),
            "threads": singles[-1]["threads"],
            "runs": singles,
        },
        "ratio_ray_over_single": round(single_s / ray_s, 3),
        "memory_ratio_ray_over_single": round(ray_pss / single_rss, 2),
        "outputs": outputs,
        "memory": {
            "ray": "peak summed PSS of the driver and all its descendants (GCS, raylet, agents, "
            "actors, write tasks), bench.ingest's sampler; includes the idle cluster "
            "(idle_cluster_pss_mb)",
            "single_process": "peak RSS (ru_maxrss) of the subprocess, and its sampled PSS",
        },
        "machine": {
            "host_cpus": os.cpu_count(),
            "note": "shared host: compare ratios; each run records the load average around it",
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'runner':16} {'seconds':>9} {'users/s':>10} {'peak MB':>9}")
    print(f"{'ray data pool':16} {ray_s:>9.1f} {n_users / ray_s:>10.0f} {ray_pss:>9.0f} (PSS)")
    print(f"{'single process':16} {single_s:>9.1f} {n_users / single_s:>10.0f} {single_rss:>9.0f}")
    print(f"ratio (ray / single): {single_s / ray_s:.2f}x; outputs match: {outputs['match']}")
    print(args.out)
    if not outputs["match"]:
        raise SystemExit(f"Ray's predictions differ from the single process's: {outputs}")
    return result


if __name__ == "__main__":
    main()
