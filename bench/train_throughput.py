"""Training throughput: Ray Train (``app.train``) at 1 and 2 workers vs a plain PyTorch loop.

python -m bench.train_throughput [--quick | --interactions N] [--quality] [dotted.key=value ...]
→ bench/results/train_throughput.json

Workload: ``--interactions`` raw synthetic events (about 100 per user and 500 per item),
ingested once by ``app.ingest.run`` into a lake under ``--workdir`` and reused by later runs. An
epoch covers train + validation (``train.refit=true``: no per-epoch evaluation). Model and
training settings are the ``AppConfig`` defaults with ``model.name=mf``; dotted overrides change
them as for the jobs. ``model.name=seq_ae`` measures the sequence autoencoder instead and writes
its run beside MF's in an existing results file (``by_model.seq_ae``, ``summary.seq_ae``).

Variants, interleaved per repeat on one Ray cluster (the plain loops run in the driver):

- ``plain``: ``app.models.run_epoch`` in this process on ``torch.set_num_threads(cores)``, the
  model of ``build_model`` with the same seed, its optimiser (``TorchRecommender.optimizer``:
  ``RowAdam`` with ``train.lr``), in-memory batches of ``train.batch_size`` reshuffled every
  epoch, on the heap setting every ``run_epoch`` takes (``keep_freed_heap``, as in the Ray
  workers). ``plain_1t`` is the same on one thread (what a Ray worker under 1 CPU gets:
  ``OMP_NUM_THREADS=1``), the baseline of the targets: ``ray_1w`` >= 0.9x, ``ray_2w`` >= 1.3x.
- ``ray_1w`` / ``ray_2w``: ``app.train.fit``, the path ``jobs.train`` takes (a TorchTrainer fed
  by Ray Data shards held in memory after one read, gradients averaged by ``GradientSync`` with
  2 workers, each taking ``train.batch_size`` rows per step).

Throughput is each epoch's ``interactions_per_s`` as the loop reports it; Ray's start-up and each
run's set-up are reported on their own. Probes explain the ratios: where a plain step's time
goes (batching, forward + backward, optimiser), a gloo sync between 2 processes of what
``GradientSync`` sends per step (the dense parameters' gradient plus a batch's rows of each
sparse table) next to the whole model's dense gradient (what DDP synced before the tables had
sparse gradients), and Ray Data's ``iter_torch_batches`` alone (skip the last two with
``--no-probes``).

``--quality`` adds time to quality on ml-latest-small: validation NDCG@10 after every epoch of
the measured family (``app.train.fit``; MF with ``bench.quality.MF_SETTINGS``, others with the
settings of ``--quality-config``) and after every iteration of
implicit ALS (``ALS_PARAMS``), and the training seconds each needs to reach
``--quality-fraction`` (default 1: all) of ALS's best.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.config import AppConfig, ClusterArgs, load_config
from app.models import GradientSync, TorchRecommender, build_model, run_epoch
from app.store import ITEM_IDX, USER_IDX, DatasetVersion, Lake
from app.train import VALID_METRIC, fit, fit_splits, shuffle_buffer_rows, with_train
from bench.quality import MF_SETTINGS

RESULTS = Path(__file__).resolve().parent / "results" / "train_throughput.json"
DEFAULT_INTERACTIONS = 5_000_000
QUICK_INTERACTIONS = 500_000
# Ray Train vs the plain 1-thread loop, same model, loss and batch (the bar).
TARGETS = {"ray_1w": 0.9, "ray_2w": 1.3}
K = 10
# implicit ALS at a configuration that scores near the top of bench/quality.py's validation grid.
ALS_PARAMS = {"factors": 32, "regularization": 0.1, "alpha": 1.0}
ALLREDUCE_STEPS = 10
PLAIN = "plain"
PLAIN_1T = "plain_1t"


# --- workload and configuration -------------------------------------------------------------


def workload(n: int) -> dict[str, int]:
    """Synthetic generator settings for ``n`` raw events (about 100 per user, 500 per item).

    The embedding tables have sparse gradients (a step costs the rows its batch touches), but
    an exact softmax reads the whole item table, so the catalogue still sets that loss's cost.
    """
    return {"n_interactions": n, "n_users": max(10, n // 100), "n_items": max(10, n // 500)}


def bench_config(
    n: int, workdir: Path, epochs: int, config: str | None, overrides: list[str]
) -> AppConfig:
    """The benchmark's ``AppConfig``: its synthetic workload and lake, MF, refit, no restarts."""
    base = [
        f"lake={workdir / 'lake'}",
        f"data.name=train-throughput-{n}",
        "data.source=synthetic",
        *(f"data.synthetic.{key}={value}" for key, value in workload(n).items()),
        "data.synthetic.n_files=8",
        "model.name=mf",
        "train.refit=true",
        f"train.epochs={epochs}",
        "train.cpus_per_worker=0.5",
        "train.max_failures=0",
    ]
    return load_config(config, base + overrides)


@contextmanager
def local_ray(cpus: int) -> Iterator[float]:
    """A fresh embedded Ray cluster of ``cpus`` logical CPUs; yields its start-up seconds."""
    import ray

    from app.cluster import connect

    os.environ.pop("RAY_ADDRESS", None)  # never join another engineer's cluster
    t0 = time.perf_counter()
    connect(ClusterArgs(num_cpus=cpus, progress_bars=False))
    startup = time.perf_counter() - t0
    try:
        yield startup
    finally:
        ray.shutdown()


def ingest(cfg: AppConfig) -> tuple[DatasetVersion, float]:
    """The config's dataset version (``app.ingest.run`` reuses an existing one) and its seconds."""
    from app import ingest as stage

    t0 = time.perf_counter()
    ds = stage.run(cfg.data, Lake(cfg.lake), seed=cfg.seed)
    return ds, time.perf_counter() - t0


# --- Ray Train variants ---------------------------------------------------------------------


def timed_fit(cfg: AppConfig, ds: DatasetVersion, runs: Path, label: str) -> tuple[Any, float]:
    """``app.train.fit`` with checkpoints under ``runs`` (removed after); outcome and seconds."""
    name = f"{label}-{uuid.uuid4().hex[:6]}"
    t0 = time.perf_counter()
    outcome = fit(ds, cfg.model, cfg.train, seed=cfg.seed, runs=Lake(str(runs)), name=name)
    wall = time.perf_counter() - t0
    shutil.rmtree(runs / name, ignore_errors=True)
    return outcome, wall


def run_ray(cfg: AppConfig, ds: DatasetVersion, workers: int, runs: Path) -> dict[str, Any]:
    """One ``app.train.fit`` at ``workers`` workers; throughput from its per-epoch reports."""
    outcome, wall = timed_fit(
        with_train(cfg, num_workers=workers), ds, runs, f"throughput-{workers}w"
    )
    epochs = [
        {
            "epoch": h["epoch"],
            "seconds": round(h["epoch_s"], 3),
            "interactions": round(h["interactions_per_s"] * h["epoch_s"]),
            "interactions_per_s": round(h["interactions_per_s"]),
            "loss": round(h["loss"], 5),
        }
        for h in outcome.history
    ]
    return {
        "variant": f"ray_{workers}w",
        "workers": workers,
        "cpus_per_worker": cfg.train.cpus_per_worker,
        "rows_per_step": workers * cfg.train.batch_size,
        "epochs": epochs,
        "fit_wall_s": round(wall, 2),
        "setup_s": round(wall - sum(e["seconds"] for e in epochs), 2),
    }


def ray_data_probe(cfg: AppConfig, ds: DatasetVersion) -> dict[str, Any]:
    """Ray Data alone: ``iter_torch_batches`` over the materialised splits, no training.

    Same batch size and local shuffle buffer as the Train worker loop, one reader in the driver.
    """
    bs = cfg.train.batch_size
    t0 = time.perf_counter()
    mat = ds.read_ds(*fit_splits(cfg.train)).materialize().randomize_block_order(seed=cfg.seed)
    materialise = time.perf_counter() - t0
    rows = 0
    t0 = time.perf_counter()
    for batch in mat.iter_torch_batches(
        batch_size=bs, local_shuffle_buffer_size=shuffle_buffer_rows(bs), local_shuffle_seed=0
    ):
        users, _items = batch[USER_IDX].long(), batch[ITEM_IDX].long()
        rows += len(users)
    seconds = time.perf_counter() - t0
    return {
        "rows": rows,
        "materialise_s": round(materialise, 2),
        "iterate_s": round(seconds, 2),
        "rows_per_s": round(rows / seconds),
    }


# --- plain PyTorch baseline -----------------------------------------------------------------


class _TimedOptimizer:
    """The model's own optimiser, adding up the seconds its steps take (a step's split)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.seconds = 0.0

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Any = None) -> Any:
        t0 = time.perf_counter()
        out = self.optimizer.step(closure)
        self.seconds += time.perf_counter() - t0
        return out


def plain_model(cfg: AppConfig, ds: DatasetVersion) -> TorchRecommender:
    """The MF recommender as each Ray worker builds it (same config, sizes and seed), prepared."""
    rec = build_model(cfg.model, ds.n_users, ds.n_items, seed=cfg.seed)
    assert isinstance(rec, TorchRecommender)
    rec.prepare(rec.history(ds, *fit_splits(cfg.train)))  # time-ranked for the sequence model
    return rec


def interaction_tensors(ds: DatasetVersion, splits: tuple[str, ...]) -> tuple[torch.Tensor, ...]:
    """Users and items of the splits' interactions as int64 tensors (one pair per row)."""
    pairs = ds.csr(*splits).tocoo()
    return tuple(torch.from_numpy(x.astype(np.int64)) for x in (pairs.row, pairs.col))


def _timed_batches(
    users: torch.Tensor, items: torch.Tensor, perm: torch.Tensor, size: int, clock: dict
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of ``size`` rows in ``perm`` order, adding the slicing seconds to ``clock``."""
    for idx in perm.split(size):
        t0 = time.perf_counter()
        batch = users[idx], items[idx]
        clock["batching"] += time.perf_counter() - t0
        clock["steps"] += 1
        yield batch


def plain_epochs(
    rec: TorchRecommender,
    users: torch.Tensor,
    items: torch.Tensor,
    batch_size: int,
    lr: float,
    epochs: int,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """``run_epoch`` over reshuffled in-memory batches; per epoch its rate, loss and step split.

    The split times batching (slicing the shuffled tensors) and the optimiser's steps; the rest
    of a step (loss, backward, zeroing gradients) is ``forward_backward``.
    """
    opt = _TimedOptimizer(rec.optimizer(lr))
    gen = torch.Generator().manual_seed(seed)
    out = []
    for epoch in range(1, epochs + 1):
        clock = {"batching": 0.0, "steps": 0}
        batches = _timed_batches(
            users, items, torch.randperm(len(users), generator=gen), batch_size, clock
        )
        rec.module.train()
        opt.seconds = 0.0
        t0 = time.perf_counter()
        loss_sum, seen = run_epoch(rec.module, opt, batches)  # type: ignore[arg-type]
        seconds = time.perf_counter() - t0
        other = seconds - clock["batching"] - opt.seconds
        out.append(
            {
                "epoch": epoch,
                "seconds": round(seconds, 3),
                "interactions": seen,
                "interactions_per_s": round(seen / seconds),
                "loss": round(loss_sum / max(seen, 1), 5),
                "ms_per_step": round(1000 * seconds / max(clock["steps"], 1), 2),
                "step_split": {
                    "batching": round(clock["batching"] / seconds, 3),
                    "forward_backward": round(other / seconds, 3),
                    "optimizer": round(opt.seconds / seconds, 3),
                },
            }
        )
    return out


def gradient_layout(
    rec: TorchRecommender, users: torch.Tensor, items: torch.Tensor, batch_size: int
) -> dict[str, Any]:
    """What one step's gradient holds: dense floats, and the rows each sparse table gets.

    From one backward on ``batch_size`` random pairs (no optimiser step; the torch RNG is
    restored, so the measured epochs draw the same negatives).
    """
    with torch.random.fork_rng(devices=[]):
        rows = torch.randperm(len(users))[:batch_size]  # a shuffled batch, as training takes
        rec.module.train()
        rec.module(users[rows], items[rows]).backward()
    dense, sparse = 0, []
    for name, param in rec.module.named_parameters():
        grad = param.grad
        if grad is not None and grad.is_sparse:
            rows = int(grad.coalesce().indices().shape[1])
            sparse.append({"param": name, "rows": rows, "table_rows": int(param.shape[0])})
            sparse[-1]["dim"] = int(param.shape[1])
        elif grad is not None:
            dense += param.numel()
        param.grad = None
    per_step = dense + sum(t["rows"] * t["dim"] for t in sparse)
    return {"dense_floats": dense, "sparse_tables": sparse, "floats_per_step": per_step}


def run_plain(cfg: AppConfig, ds: DatasetVersion, threads: int, name: str) -> dict[str, Any]:
    """The plain baseline on ``threads`` torch threads (a fresh, identically seeded model)."""
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    users, items = interaction_tensors(ds, fit_splits(cfg.train))
    rec = plain_model(cfg, ds)
    load = time.perf_counter() - t0
    train = cfg.train
    return {
        "variant": name,
        "torch_threads": threads,
        "rows_per_step": train.batch_size,
        "parameters": sum(p.numel() for p in rec.module.parameters()),
        "gradient": gradient_layout(rec, users, items, train.batch_size),
        "epochs": plain_epochs(
            rec, users, items, train.batch_size, train.lr, train.epochs, cfg.seed
        ),
        "load_s": round(load, 2),
    }


# --- gloo all-reduce probe ------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _allreduce_rank(rank: int, port: int, plan: dict[str, Any], steps: int, queue: Any) -> None:
    """One of 2 gloo ranks: time ``steps`` per-step syncs of ``plan`` and of its dense version.

    The sync is what the Train workers run (``GradientSync``): the dense gradient and the
    touched rows of each sparse table (random rows, different on each rank), gathered or summed
    densely as ``GradientSync`` chooses; the dense version is one all-reduce of
    ``full_floats`` (the whole model's gradient, as dense tables sent it).
    """
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    gen = torch.Generator().manual_seed(rank)
    module = torch.nn.Module()
    module.dense = torch.nn.Parameter(torch.zeros(plan["dense_floats"]))
    module.tables = torch.nn.ModuleList(
        torch.nn.Embedding(t["table_rows"], t["dim"], sparse=True) for t in plan["sparse_tables"]
    )
    grads = [
        torch.sparse_coo_tensor(
            torch.randint(t["table_rows"], (1, t["rows"]), generator=gen),
            torch.ones(t["rows"], t["dim"]),
            (t["table_rows"], t["dim"]),
        ).coalesce()
        for t in plan["sparse_tables"]
    ]
    sync = GradientSync(module)
    full = torch.ones(plan["full_floats"])

    def rows_sync() -> None:
        module.dense.grad = torch.ones_like(module.dense)
        for table, grad in zip(module.tables, grads, strict=True):
            table.weight.grad = grad
        sync()

    out = []
    for step in (rows_sync, lambda: dist.all_reduce(full)):
        step()  # warm-up: connections and buffers
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        out.append((time.perf_counter() - t0) / steps)
    if rank == 0:
        queue.put(out)
    dist.destroy_process_group()


def allreduce_probe(
    gradient: dict[str, Any], full_floats: int, steps: int = ALLREDUCE_STEPS
) -> dict:
    """Milliseconds per step's gloo sync between 2 local processes: GradientSync's and dense.

    ``gradient`` is ``gradient_layout``'s; ``full_floats`` the model's parameter count.
    """
    plan = {**gradient, "full_floats": full_floats}
    ctx = torch.multiprocessing.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = _free_port()
    procs = [
        ctx.Process(target=_allreduce_rank, args=(rank, port, plan, steps, queue))
        for rank in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
    if any(p.exitcode != 0 for p in procs) or queue.empty():
        return {"error": f"gloo probe failed (exit codes {[p.exitcode for p in procs]})"}
    sparse_s, dense_s = queue.get()
    return {
        "floats_per_step": gradient["floats_per_step"],
        "megabytes_per_step": round(gradient["floats_per_step"] * 4 / 2**20, 2),
        "ms_per_step": round(1000 * sparse_s, 2),
        "dense_floats": full_floats,
        "dense_megabytes": round(full_floats * 4 / 2**20, 1),
        "dense_ms_per_step": round(1000 * dense_s, 2),
    }


# --- time to quality (optional) -------------------------------------------------------------


def quality_config(args: argparse.Namespace, family: str = "mf") -> AppConfig:
    """The ml-latest-small job config for ``family``, evaluated every epoch, train split only.

    MF takes ``bench.quality.MF_SETTINGS``; other families the config's own model section.
    """
    return load_config(
        args.quality_config,
        [
            f"lake={args.quality_lake}",
            f"data.path={args.quality_data}",
            f"model.name={family}",
            *(MF_SETTINGS if family == "mf" else ()),
            "train.refit=false",
            "train.eval_every=1",
            f"train.epochs={args.quality_epochs}",
            "train.max_failures=0",
        ],
    )


def mf_curve(cfg: AppConfig, ds: DatasetVersion, runs: Path) -> dict[str, Any]:
    """Validation NDCG@10 after each epoch of ``app.train.fit`` and the training seconds so far."""
    outcome, wall = timed_fit(cfg, ds, runs, f"quality-{cfg.model.name}")
    curve, train_s = [], 0.0
    for h in outcome.history:
        train_s += h["epoch_s"]
        curve.append(
            {"step": h["epoch"], "train_s": round(train_s, 3), VALID_METRIC: h[VALID_METRIC]}
        )
    return {
        "model": f"ScaleRec {cfg.model.name} (app.train.fit, Ray Train)",
        "params": {
            **cfg.model.model_dump(
                include={
                    "embed_dim",
                    "loss",
                    "num_negatives",
                    "temperature",
                    "l2",
                    "use_bias",
                    "normalize",
                    "history_dropout",
                    "recency_tau",
                    "seq_window",
                }
            ),
            **cfg.train.model_dump(include={"num_workers", "batch_size", "lr", "epochs"}),
        },
        "unit": "epoch",
        "curve": curve,
        "wall_s": round(wall, 2),
        "wall_note": "fit() wall time: worker start, per-epoch evaluation and checkpoints included",
    }


def als_curve(ds: DatasetVersion, iterations: int, threads: int) -> dict[str, Any]:
    """Validation NDCG@10 after each implicit ALS iteration (evaluation time excluded)."""
    from implicit.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    from app.evaluate import evaluate

    train, valid = ds.csr("train"), ds.csr("valid")
    model = AlternatingLeastSquares(
        **ALS_PARAMS, iterations=iterations, random_state=0, num_threads=threads
    )
    curve: list[dict[str, Any]] = []
    clock = {"train_s": 0.0, "mark": time.perf_counter()}

    def on_iteration(iteration: int, _elapsed: float, _loss: float | None) -> None:
        clock["train_s"] += time.perf_counter() - clock["mark"]
        uf, itf = np.asarray(model.user_factors), np.asarray(model.item_factors)
        res = evaluate(lambda u: (uf[u] @ itf.T).astype(np.float32), train, valid, k=K)
        point = {"step": iteration + 1, "train_s": round(clock["train_s"], 3)}
        curve.append({**point, VALID_METRIC: res[f"ndcg@{K}"]})
        clock["mark"] = time.perf_counter()

    with threadpool_limits(1, "blas"):  # implicit's advice: its own threads, serial BLAS
        model.fit(train, show_progress=False, callback=on_iteration)
    return {
        "model": "implicit ALS",
        "params": {**ALS_PARAMS, "iterations": iterations, "num_threads": threads},
        "unit": "iteration",
        "curve": curve,
        "wall_s": round(clock["train_s"], 2),
        "wall_note": "training seconds only",
    }


def time_to_target(curve: list[dict[str, Any]], target: float) -> dict[str, Any] | None:
    """The first point of ``curve`` whose validation NDCG@10 reaches ``target`` (or None)."""
    for point in curve:
        if point[VALID_METRIC] >= target:
            return {"step": point["step"], "train_s": point["train_s"]}
    return None


def summarise_quality(
    mf: dict[str, Any], als: dict[str, Any], fraction: float, family: str = "mf"
) -> dict[str, Any]:
    """Best NDCG of each model and the training seconds each needs to reach the target.

    ``mf`` is the curve of the ScaleRec model of ``family`` (keys ``scalerec_<family>``).
    """
    target = fraction * max(p[VALID_METRIC] for p in als["curve"])
    out: dict[str, Any] = {
        "target": {
            VALID_METRIC: round(target, 5),
            "definition": f"{fraction} x implicit ALS's best validation NDCG@{K}",
        }
    }
    for key, run in ((f"scalerec_{family}", mf), ("implicit_als", als)):
        best = max(run["curve"], key=lambda p: p[VALID_METRIC])
        out[key] = {
            f"best_{VALID_METRIC}": round(best[VALID_METRIC], 5),
            f"best_at_{run['unit']}": best["step"],
            "reached_target": time_to_target(run["curve"], target),
        }
    mf_hit = out[f"scalerec_{family}"]["reached_target"]
    als_hit = out["implicit_als"]["reached_target"]
    if mf_hit and als_hit:
        ratio = round(mf_hit["train_s"] / als_hit["train_s"], 2)
        out[f"time_to_target_ratio_{family}_over_als"] = ratio
    return out


# --- report ---------------------------------------------------------------------------------


def median_rate(variant: dict[str, Any]) -> float:
    """Median interactions/s over a variant's epochs."""
    return float(statistics.median(e["interactions_per_s"] for e in variant["epochs"]))


def summarise(variants: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-variant medians, the Ray variants' ratios to the plain loops, and the targets.

    ``ray_*_vs_plain_1t`` compares with the plain loop on one thread, the targets' baseline
    (``TARGETS``); ``ray_*_vs_plain`` with the plain loop on as many threads as cores and
    ``ray_*_vs_best_plain`` with the faster of the two.
    """
    by_name: dict[str, list[dict[str, Any]]] = {}
    for v in variants:
        by_name.setdefault(v["variant"], []).append(v)
    rates = {
        name: float(statistics.median(median_rate(r) for r in runs))
        for name, runs in by_name.items()
    }
    best_plain = max(rate for name, rate in rates.items() if name.startswith(PLAIN))
    ratios: dict[str, float] = {}
    for name in (n for n in rates if n.startswith("ray_")):
        for base in (PLAIN_1T, PLAIN):
            if base in rates:
                ratios[f"{name}_vs_{base}"] = round(rates[name] / rates[base], 3)
        ratios[f"{name}_vs_best_plain"] = round(rates[name] / best_plain, 3)
    targets = {}
    for name, bar in TARGETS.items():
        measured = ratios.get(f"{name}_vs_{PLAIN_1T}")
        targets[f"{name}_vs_{PLAIN_1T}"] = {
            "measured": measured,
            "target": f">= {bar}",
            "met": measured is not None and measured >= bar,
        }
    return {
        "interactions_per_s": {name: round(r) for name, r in rates.items()},
        "ratios": ratios,
        "targets": targets,
        "targets_met": all(t["met"] for t in targets.values()),
    }


def notes(result: dict[str, Any]) -> list[str]:
    """Explain the ratios with this run's own numbers (load, threads, all-reduce, optimiser)."""
    out = []
    rates = result["summary"]["interactions_per_s"]
    cores = result["machine"]["cpu_count"]
    loads = {
        v["variant"]: v["loadavg_1m_before_after"]
        for v in result["variants"]
        if "loadavg_1m_before_after" in v
    }
    load = (
        ", ".join(f"{name} {a}→{b}" for name, (a, b) in loads.items())
        or f"{result['machine']['loadavg_before'][0]} before the run"
    )
    out.append(f"host load average (1 min) on {cores} cores: {load}; ratios move with it.")
    if PLAIN_1T in rates and PLAIN in rates and rates[PLAIN_1T] > rates[PLAIN]:
        out.append(
            f"the plain loop ran faster on 1 torch thread ({rates[PLAIN_1T]:,}/s) than on "
            f"{cores} ({rates[PLAIN]:,}/s): on a host loaded above its core count, each of the "
            "~100 parallel regions of a step waits for its other threads to be scheduled. Ray "
            "workers under 1 CPU run one thread (OMP_NUM_THREADS=1), so they do not pay this."
        )
    plain = next(v for v in result["variants"] if v["variant"] == PLAIN_1T)
    split = plain["epochs"][0]["step_split"]
    grad = plain.get("gradient", {})
    tables = ", ".join(
        f"{t['param']} {t['rows']:,} of {t['table_rows']:,} rows"
        for t in grad.get("sparse_tables", [])
    )
    out.append(
        f"plain 1-thread step: {plain['epochs'][0]['ms_per_step']} ms, {split['optimizer']:.0%} "
        f"in the optimiser and {split['forward_backward']:.0%} in forward + backward. Of the "
        f"model's {plain['parameters']:,} parameters a step's gradient holds "
        f"{grad.get('floats_per_step', 0):,} floats: {grad.get('dense_floats', 0):,} dense and "
        f"sparse rows ({tables or 'none'}); RowAdam updates only those rows."
    )
    gloo = result["probes"].get("gloo_allreduce_2_ranks", {})
    two = [v for v in result["variants"] if v["variant"] == "ray_2w"]
    if "ms_per_step" in gloo and two:
        epoch = two[0]["epochs"][0]
        steps = epoch["interactions"] / two[0]["rows_per_step"]
        share = steps * gloo["ms_per_step"] / 1000 / epoch["seconds"]
        out.append(
            f"GradientSync sends {gloo['megabytes_per_step']} MB per step (touched rows): "
            f"{gloo['ms_per_step']} ms between 2 gloo processes here, about {share:.0%} of the "
            f"2-worker epoch ({steps:,.0f} steps); the dense gradient ({gloo['dense_megabytes']}"
            f" MB) would take {gloo['dense_ms_per_step']} ms per step."
        )
    data = result["probes"].get("ray_data_iter_torch_batches")
    if data:
        out.append(
            f"Ray Data alone (iter_torch_batches with the train loop's shuffle buffer) yields "
            f"{data['rows_per_s']:,} rows/s, "
            f"{data['rows_per_s'] / max(rates.values()):.0f}x the fastest training rate."
        )
    return out


def table(result: dict[str, Any]) -> str:
    """The throughput table, the target lines, set-up times and the time-to-quality lines."""
    ratios = result["summary"]["ratios"]
    head = (
        f"{'variant':<9} {'threads':>7} {'rows/step':>9} {'epoch s':>8} {'interactions/s':>14} "
        f"{'vs 1t':>8}"
    )
    lines = [head, "-" * len(head)]
    for v in result["variants"]:
        seconds = statistics.median(e["seconds"] for e in v["epochs"])
        ratio = ratios.get(f"{v['variant']}_vs_{PLAIN_1T}")
        threads = v.get("torch_threads", "1/wkr")
        lines.append(
            f"{v['variant']:<9} {threads:>7} {v['rows_per_step']:>9,} {seconds:>8.1f} "
            f"{median_rate(v):>14,.0f} {'' if ratio is None else f'{ratio:.2f}':>8}"
        )
    lines.append("")
    for key, t in result["summary"]["targets"].items():
        lines.append(
            f"{key}: {t['measured']} (target {t['target']}): {'met' if t['met'] else 'MISSED'}"
        )
    setups = ", ".join(
        f"{v['variant']} {v['setup_s']} s" for v in result["variants"] if "setup_s" in v
    )
    lines.append(
        f"Ray start-up {result['ray']['startup_s']} s; per-run set-up (not in the rates): {setups}"
    )
    quality = result.get("time_to_quality")
    if quality:
        s = quality["summary"]
        lines.append(f"\ntime to quality (target {s['target'][VALID_METRIC]} {VALID_METRIC}):")
        for key in (*(k for k in s if k.startswith("scalerec_")), "implicit_als"):
            hit = s[key]["reached_target"]
            reached = f"{hit['train_s']:.1f} s (step {hit['step']})" if hit else "not reached"
            lines.append(
                f"  {key:<13} best {s[key][f'best_{VALID_METRIC}']:.4f}; target: {reached}"
            )
    return "\n".join(lines)


def machine(load_before: tuple[float, ...], load_after: tuple[float, ...]) -> dict[str, Any]:
    """Host facts and the load average around the run (the host is shared)."""
    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in load_after],
        "note": "shared host: other work runs concurrently; compare ratios, not absolute rates",
    }


# --- driver ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--interactions", type=int, default=DEFAULT_INTERACTIONS, help="raw events")
    p.add_argument("--quick", action="store_true", help=f"{QUICK_INTERACTIONS:,} raw events")
    p.add_argument("--epochs", type=int, default=1, help="measured epochs per variant")
    p.add_argument("--repeats", type=int, default=1, help="runs per variant; medians reported")
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 2, help="Ray CPUs, torch threads")
    p.add_argument("--config", default=None, help="YAML base config (default: AppConfig defaults)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/scalerec-bench/train"))
    p.add_argument("--no-probes", dest="probes", action="store_false", help="skip the probes")
    p.add_argument("--quality", action="store_true", help="add time to quality vs implicit ALS")
    p.add_argument("--quality-config", default="jobs/configs/ml-latest-small.yaml")
    p.add_argument("--quality-data", default="../shared/data/ml-latest-small")
    p.add_argument("--quality-lake", default="/tmp/scalerec-bench-quality/lake")
    p.add_argument("--quality-epochs", type=int, default=20, help="MF epochs (quick: 3)")
    p.add_argument("--als-iterations", type=int, default=15, help="ALS iterations (quick: 5)")
    p.add_argument("--quality-fraction", type=float, default=1.0, help="of ALS's best NDCG")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. model.embed_dim=64")
    args = p.parse_args(argv)
    if args.quick:
        args.interactions = QUICK_INTERACTIONS
        args.quality_epochs = min(args.quality_epochs, 3)
        args.als_iterations = min(args.als_iterations, 5)
    return args


def with_load(run: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """``run(*args)``'s result with the host's 1-minute load average before and after it."""
    before = os.getloadavg()[0]
    out = run(*args)
    out["loadavg_1m_before_after"] = [round(before, 2), round(os.getloadavg()[0], 2)]
    return out


def measure(
    args: argparse.Namespace, cfg: AppConfig
) -> tuple[DatasetVersion, list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """Run every variant (interleaved per repeat) and the probes; returns what they measured.

    One Ray cluster serves the whole run; the plain loops run in this process while it idles,
    so that a change of host load hits all variants alike.
    """
    runs = args.workdir / "runs"
    variants: list[dict[str, Any]] = []
    probes: dict[str, Any] = {}
    quality: dict[str, Any] = {}
    qds: DatasetVersion | None = None
    with local_ray(args.cpus) as startup:
        ds, ingest_s = ingest(cfg)
        probes["ray_startup_s"], probes["ingest_s"] = startup, ingest_s
        for rep in range(args.repeats):
            plain_threads = {PLAIN_1T: 1} | ({PLAIN: args.cpus} if args.cpus > 1 else {})
            for name, threads in plain_threads.items():
                print(f"{name} run {rep + 1}/{args.repeats}", flush=True)
                variants.append(with_load(run_plain, cfg, ds, threads, name))
            for workers in (1, 2):
                print(f"ray_{workers}w run {rep + 1}/{args.repeats}", flush=True)
                variants.append(with_load(run_ray, cfg, ds, workers, runs))
        if args.probes:
            probes["ray_data_iter_torch_batches"] = ray_data_probe(cfg, ds)
        if args.quality:
            qcfg = quality_config(args, cfg.model.name)
            qds = ingest(qcfg)[0]
            quality["dataset"] = {"name": "ml-latest-small", "version": qds.version}
            quality[f"scalerec_{cfg.model.name}"] = mf_curve(qcfg, qds, runs)
    if args.probes:
        plain = next(v for v in variants if v["variant"] == PLAIN_1T)
        probes["gloo_allreduce_2_ranks"] = allreduce_probe(plain["gradient"], plain["parameters"])
    if qds is not None:
        quality["implicit_als"] = als_curve(qds, args.als_iterations, args.cpus)
        family = cfg.model.name
        quality["summary"] = summarise_quality(
            quality[f"scalerec_{family}"], quality["implicit_als"], args.quality_fraction, family
        )
    return ds, variants, probes, quality


def merged(result: dict[str, Any], out: Path) -> dict[str, Any]:
    """What to write: MF's run as the file, another family's beside it in an existing file.

    MF's figures stay at the top (``summary.interactions_per_s``); a run of another family
    (``model.name=seq_ae``) goes under ``by_model.<name>`` and its summary under
    ``summary.<name>``, with its own workload, machine and load averages.
    """
    name = result["workload"]["model"]["name"]
    if name == "mf" or not out.exists():
        if name == "mf" and out.exists():  # keep the other families' runs
            old = json.loads(out.read_text())
            result["by_model"] = old.get("by_model", {})
            for other in result["by_model"]:
                result["summary"][other] = old["summary"].get(other)
        return result
    file = json.loads(out.read_text())
    file.setdefault("by_model", {})[name] = result
    file["summary"][name] = result["summary"]
    return file


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print its table and write ``bench/results/train_throughput.json``."""
    args = parse_args(argv)
    if args.quality:
        try:
            import implicit  # noqa: F401  (checked first: the quality part runs last)
        except ImportError:
            raise SystemExit("--quality needs implicit ALS: pip install -e '.[bench]'") from None
    cfg = bench_config(args.interactions, args.workdir, args.epochs, args.config, args.overrides)
    load_before = os.getloadavg()
    ds, variants, probes, quality = measure(args, cfg)
    load_after = os.getloadavg()
    plain = next(v for v in variants if v["variant"] == PLAIN_1T)
    result: dict[str, Any] = {
        "benchmark": "train_throughput",
        "description": f"interactions/s of {cfg.model.name} training epochs: Ray Train "
        "(app.train.fit) at 1 and "
        "2 workers vs app.models.run_epoch in one process (1 thread: the targets' baseline), "
        "same model, loss, optimiser and batch size",
        "workload": {
            "raw_events": args.interactions,
            **{k: v for k, v in workload(args.interactions).items() if k != "n_interactions"},
            "dataset_version": ds.version,
            "users": ds.n_users,
            "items": ds.n_items,
            "splits_per_epoch": list(fit_splits(cfg.train)),
            "interactions_per_epoch": plain["epochs"][0]["interactions"],
            "epochs_per_variant": cfg.train.epochs,
            "repeats": args.repeats,
            "model": cfg.model.model_dump(
                include={
                    "name",
                    "embed_dim",
                    "history_dropout",
                    "recency_tau",
                    "seq_cuts",
                    "loss",
                    "num_negatives",
                    "temperature",
                    "l2",
                    "logq",
                    "use_bias",
                    "normalize",
                }
            ),
            "train": cfg.train.model_dump(include={"batch_size", "lr", "cpus_per_worker"}),
            "parameters": plain["parameters"],
        },
        "ray": {
            "startup_s": round(probes.pop("ray_startup_s"), 2),
            "ingest_s": round(probes.pop("ingest_s"), 2),
            "cpus": args.cpus,
            "note": "start-up: ray.init of an embedded cluster; ingest: app.ingest.run (reuses an "
            "existing version); neither is in the rates, nor is each run's setup_s",
        },
        "throughput": "per-epoch rows seen by all workers / epoch wall seconds, as the training "
        "loop reports them (plain: the same over its own loop); median over epochs and repeats",
        "variants": variants,
        "summary": summarise(variants),
        "probes": probes,
        "machine": machine(load_before, load_after),
    }
    if quality:
        result["time_to_quality"] = quality
    result["notes"] = notes(result)
    result["table"] = text = table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(merged(result, args.out), indent=2) + "\n")
    print(text)
    print("\n".join(f"- {n}" for n in result["notes"]))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
