"""The Ray Train worker loop: one DDP-style group stepping ``run_epoch`` over Ray Data shards.

``app.train.build_trainer`` hands ``train_loop_per_worker`` its config; each epoch ends in one
report whose checkpoint (weights, optimiser state, history) lets ``FailureConfig`` resume the
group after a lost worker. Gradients sync with ``GradientSync`` on gloo and DDP on NCCL.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.config import ModelArgs, TrainArgs
from app.evaluate import validation_metrics
from app.models import GradientSync, TorchRecommender, build_model, run_epoch
from app.store import ITEM_IDX, USER_IDX, DatasetVersion

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
HISTORY_FILE = "history.json"
VALID_METRIC = "valid_ndcg@10"
FAIL_AT_EPOCH_ENV = "SCALEREC_FAIL_AT_EPOCH"
FAIL_MARKER_ENV = "SCALEREC_FAIL_MARKER"


def fit_splits(train: TrainArgs) -> tuple[str, ...]:
    """The splits a fit covers: train, or train + validation on a refit."""
    return ("train", "valid") if train.refit else ("train",)


def shuffle_buffer_rows(batch_size: int) -> int:
    """Rows in the local shuffle buffer of the worker loop's Ray Data iterator."""
    return max(20 * batch_size, 50_000)


def _maybe_fail(epoch: int, rank: int, fail_at: int | None, marker: str | None) -> None:
    """Fault-injection hook: rank 0 dies once at the start of epoch ``fail_at``."""
    if fail_at is None or not marker or rank != 0 or epoch != fail_at or os.path.exists(marker):
        return
    Path(marker).write_text(f"failed at epoch {epoch}\n")
    log.warning("fault injection: exiting at the start of epoch %d", epoch)
    os._exit(1)


def read_checkpoint(checkpoint: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The state dict and the epoch history stored in a Ray Train checkpoint."""
    with checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, STATE_FILE), weights_only=True, map_location="cpu")
        with open(os.path.join(d, HISTORY_FILE)) as f:
            history = json.load(f)
    return state, history


class ShardBatches:
    """A worker's Ray Data shard as epochs of ``(users, items)`` batches.

    With ``train.cache_shard`` the shard is read once (two int64 columns) and reshuffled in
    memory every epoch, as the plain loop does, so a step pays no per-batch Ray Data cost;
    otherwise every epoch streams it through Ray Data's local shuffle buffer (shards beyond a
    worker's memory). Every rank gets as many rows (``streaming_split(equal=True)``), so as
    many steps.
    """

    def __init__(self, shard: Any, train: TrainArgs, seed: int, rank: int, device: Any) -> None:
        self.shard, self.train, self.seed, self.rank, self.device = shard, train, seed, rank, device
        self.cached: tuple[torch.Tensor, torch.Tensor] | None = None

    def load(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached shard's columns, read on the first call."""
        if self.cached is None:
            parts = list(self.shard.iter_batches(batch_size=1 << 17, batch_format="numpy"))
            cols = [
                np.concatenate([p[c] for p in parts]) if parts else np.empty(0)
                for c in (USER_IDX, ITEM_IDX)
            ]
            self.cached = tuple(torch.from_numpy(c.astype(np.int64, copy=False)) for c in cols)
        return self.cached

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of one epoch, shuffled by ``(seed, epoch, rank)``."""
        shuffle_seed = self.seed * 1000 + epoch * 31 + self.rank
        size = self.train.batch_size
        if not self.train.cache_shard:
            for batch in self.shard.iter_torch_batches(
                batch_size=size,
                local_shuffle_buffer_size=shuffle_buffer_rows(size),
                local_shuffle_seed=shuffle_seed,
                device=self.device,
            ):
                yield batch[USER_IDX].long(), batch[ITEM_IDX].long()
            return
        users, items = self.load()
        order = torch.randperm(len(users), generator=torch.Generator().manual_seed(shuffle_seed))
        for start in range(0, len(order), size):
            rows = order[start : start + size]
            yield users[rows].to(self.device), items[rows].to(self.device)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker loop: one report (metrics + checkpoint) per epoch.

    ``config``: ``build_trainer``'s dataset, model, train, seed, local_mode, and fault hook.
    """
    import ray.train
    import ray.train.torch

    ds: DatasetVersion = config["dataset"]
    model_args: ModelArgs = config["model"]
    train_args: TrainArgs = config["train"]
    seed = int(config.get("seed", 0))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    target = None if train_args.refit else ds.csr("valid")

    rec = build_model(model_args, ds.n_users, ds.n_items, ds.item_genres(), seed=seed)
    if not isinstance(rec, TorchRecommender):
        raise ValueError(f"model.name={model_args.name!r} has no torch module to train")
    # The model's own view of the history: binary, or time-ranked for the sequence model.
    fit_csr = rec.history(ds, *fit_splits(train_args))
    rec.prepare(fit_csr, sparse=not train_args.use_gpu)  # NCCL all-reduces dense tensors only
    module = rec.module
    optimizer = rec.optimizer(train_args.lr)  # RowAdam: sparse tables step their rows only

    start_epoch, restarts, history = 0, 0, []
    if (checkpoint := ray.train.get_checkpoint()) is not None:
        state, history = read_checkpoint(checkpoint)
        rec.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = int(state["epoch"])
        restarts = int(state.get("restarts", 0)) + 1
        log.info("resumed from checkpoint after epoch %d", start_epoch)

    # Negatives and history dropout differ per worker; the sync broadcasts rank 0's weights.
    torch.manual_seed(seed * 1000 + rank + 7919 * start_epoch)
    # NCCL needs DDP (dense gradients); on gloo GradientSync gathers the touched rows instead.
    device, sync = ray.train.torch.get_device(), None
    loss_fn = ray.train.torch.prepare_model(module) if train_args.use_gpu else module
    if not train_args.use_gpu and world > 1:
        sync = GradientSync(module)
    shard = ShardBatches(ray.train.get_dataset_shard("train"), train_args, seed, rank, device)
    here = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "driver"
    nodes: list[Any] = [here] * world  # where the group runs, in every epoch's metrics
    if torch.distributed.is_initialized():
        torch.distributed.all_gather_object(nodes, here)
    last_dir: str | None = None
    # The shard read is set-up, as the plain loop's load is: each epoch times its steps alone.
    t0 = time.perf_counter()
    if train_args.cache_shard:
        shard.load()
    load_s = time.perf_counter() - t0

    for epoch in range(start_epoch + 1, train_args.epochs + 1):
        _maybe_fail(epoch, rank, config.get("fail_at_epoch"), config.get("fail_marker"))
        module.train()
        t0 = time.perf_counter()
        step = run_epoch(loss_fn, optimizer, shard.epoch(epoch), sync)
        totals = torch.tensor(step, dtype=torch.float64)
        if world > 1:
            torch.distributed.all_reduce(totals)
        seconds, n_seen = time.perf_counter() - t0, float(totals[1])
        metrics: dict[str, Any] = {
            "epoch": epoch,
            "loss": float(totals[0] / max(n_seen, 1.0)),
            "interactions_per_s": n_seen / max(seconds, 1e-9),
            "epoch_s": seconds,
            "restarts": restarts,
            "worker_nodes": sorted(set(nodes)),
            "worker_nice": os.nice(0),
        }
        if epoch == start_epoch + 1:
            metrics["shard_load_s"] = load_s
        is_eval = epoch % train_args.eval_every == 0 or epoch == train_args.epochs
        if rank == 0 and target is not None and is_eval:
            metrics.update(validation_metrics(rec, fit_csr, target))
        if rank != 0:
            ray.train.report(metrics, checkpoint=None)
            continue
        history.append(metrics)
        d = tempfile.mkdtemp(prefix="scalerec-ckpt-")
        state = {"model": rec.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch}
        torch.save({**state, "restarts": restarts}, os.path.join(d, STATE_FILE))
        with open(os.path.join(d, HISTORY_FILE), "w") as f:
            json.dump(history, f)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        # Reports upload synchronously: drop the previous folder (local mode's result is the last)
        if last_dir is not None:
            shutil.rmtree(last_dir, ignore_errors=True)
        last_dir = d
    if last_dir is not None and not config.get("local_mode", False):
        shutil.rmtree(last_dir, ignore_errors=True)
