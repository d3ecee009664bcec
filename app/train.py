"""Training stage: Ray Train (TorchTrainer, DDP) for embedding models, closed form for the rest.

Run with ``python -m jobs.train --config jobs/configs/<name>.yaml [train.num_workers=2 ...]``.
``build_trainer`` is the one place that wires ``ScalingConfig``, datasets and checkpoints; the
tuning stage reuses it for every trial, and ``register_validated`` for its best trial. Workers
step with ``app.models.run_epoch``, the loop ``TorchRecommender.fit`` runs in one process.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from app.cluster import call_in_thread
from app.config import AppConfig, DataArgs, ModelArgs, TrainArgs
from app.evaluate import validation_metrics
from app.models import Recommender, TorchRecommender, build_model, run_epoch
from app.store import (
    ITEM_IDX,
    USER_IDX,
    DatasetVersion,
    Lake,
    ModelRecord,
    PromotionRefused,
    list_datasets,
    load_dataset,
    promote,
    register,
    registry_name,
)

if TYPE_CHECKING:
    import pyarrow.fs as pafs

log = logging.getLogger(__name__)

CLOSED_FORM = ("popularity", "ease", "edlae")
STATE_FILE = "state.pt"
HISTORY_FILE = "history.json"
VALID_METRIC = "valid_ndcg@10"
FAIL_AT_EPOCH_ENV = "SCALEREC_FAIL_AT_EPOCH"
FAIL_MARKER_ENV = "SCALEREC_FAIL_MARKER"


@dataclass
class TrainOutcome:
    """What a training run produced."""

    model: Recommender
    """The fitted model (weights of the last epoch)."""
    history: list[dict[str, Any]]
    """One metrics dict per epoch, in order (restarts included once)."""
    best_metrics: dict[str, Any]
    """The epoch with the best validation NDCG@10 (the last epoch when there is none)."""
    last_metrics: dict[str, Any]
    """The last epoch's metrics."""
    wall_time_s: float
    """Seconds from start to fitted model."""
    checkpoint_path: str | None
    """Where the final Ray Train checkpoint lives (None for closed-form models)."""


def fit_splits(train: TrainArgs) -> tuple[str, ...]:
    """The splits a fit covers: train, or train + validation on a refit."""
    return ("train", "valid") if train.refit else ("train",)


def with_train(cfg: AppConfig, **updates: Any) -> AppConfig:
    """``cfg`` with some ``train`` fields replaced."""
    return cfg.model_copy(update={"train": cfg.train.model_copy(update=updates)})


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


def _read_checkpoint(checkpoint: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The state dict and the epoch history stored in a Ray Train checkpoint."""
    with checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, STATE_FILE), weights_only=True, map_location="cpu")
        with open(os.path.join(d, HISTORY_FILE)) as f:
            history = json.load(f)
    return state, history


def _shard_batches(
    shard: Any, train: TrainArgs, seed: int, epoch: int, rank: int, device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of (users, items) batches from this worker's Ray Data shard."""
    for batch in shard.iter_torch_batches(
        batch_size=train.batch_size,
        local_shuffle_buffer_size=shuffle_buffer_rows(train.batch_size),
        local_shuffle_seed=seed * 1000 + epoch * 31 + rank,
        device=device,
    ):
        yield batch[USER_IDX].long(), batch[ITEM_IDX].long()


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
    fit_csr = ds.csr(*fit_splits(train_args))
    target = None if train_args.refit else ds.csr("valid")

    rec = build_model(model_args, ds.n_users, ds.n_items, ds.item_genres(), seed=seed)
    if not isinstance(rec, TorchRecommender):
        raise ValueError(f"model.name={model_args.name!r} has no torch module to train")
    rec.prepare(fit_csr, sparse=not train_args.use_gpu)  # NCCL all-reduces dense tensors only
    module = rec.module
    optimizer = rec.optimizer(train_args.lr)  # RowAdam: sparse tables step their rows only

    start_epoch, restarts, history = 0, 0, []
    if (checkpoint := ray.train.get_checkpoint()) is not None:
        state, history = _read_checkpoint(checkpoint)
        rec.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = int(state["epoch"])
        restarts = int(state.get("restarts", 0)) + 1
        log.info("resumed from checkpoint after epoch %d", start_epoch)

    # Negatives and history dropout differ per worker; the weights start equal (seeded init).
    torch.manual_seed(seed * 1000 + rank + 7919 * start_epoch)
    ddp = ray.train.torch.prepare_model(module)
    device = ray.train.torch.get_device()
    shard = ray.train.get_dataset_shard("train")
    here = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "driver"
    nodes: list[Any] = [here] * world  # where the group runs, in every epoch's metrics
    if torch.distributed.is_initialized():
        torch.distributed.all_gather_object(nodes, here)
    last_dir: str | None = None

    for epoch in range(start_epoch + 1, train_args.epochs + 1):
        _maybe_fail(epoch, rank, config.get("fail_at_epoch"), config.get("fail_marker"))
        module.train()
        t0 = time.perf_counter()
        batches = _shard_batches(shard, train_args, seed, epoch, rank, device)
        totals = torch.tensor(run_epoch(ddp, optimizer, batches), dtype=torch.float64)
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
        }
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


def ray_storage(folder: Lake) -> tuple[str, pafs.FileSystem | None]:
    """Ray's ``storage_path`` and ``storage_filesystem`` (None on local disk) for ``folder``."""
    return folder.path(), None if folder.is_local else folder.arrow_fs


def build_trainer(
    ds: DatasetVersion,
    model: ModelArgs,
    train: TrainArgs,
    *,
    runs: Lake,
    name: str,
    seed: int = 0,
    callbacks: list[Any] | None = None,
) -> Any:
    """The ``TorchTrainer`` for ``model`` on a dataset version (train, or train+valid on refit).

    Checkpoints go to ``<runs>/<name>`` (a local or ``s3://`` folder); ``seed`` drives the
    initialisation, negative sampling and shuffling; ``callbacks`` are extra ``RunConfig``
    callbacks (Tune adds its ``TuneReportCallback``).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if model.name in CLOSED_FORM:
        raise ValueError(f"model.name={model.name!r} is fitted in closed form: call fit()")
    loop_config: dict[str, Any] = {"dataset": ds, "model": model, "train": train, "seed": seed}
    loop_config["local_mode"] = train.num_workers == 0
    # The fault hook travels in the config: workers do not see the driver's later environment.
    if os.environ.get(FAIL_AT_EPOCH_ENV):
        loop_config["fail_at_epoch"] = int(os.environ[FAIL_AT_EPOCH_ENV])
        loop_config["fail_marker"] = os.environ.get(FAIL_MARKER_ENV, "")
    path, filesystem = ray_storage(runs)
    # Read the split once: else every epoch re-runs the Parquet reads (dearer than an epoch on
    # small data). The blocks live in the object store, not the driver.
    train_ds = ds.read_ds(*fit_splits(train)).materialize().randomize_block_order(seed=seed)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=train.num_workers,
            use_gpu=train.use_gpu,
            # Fractional CPUs leave room for Ray Data's read tasks on small machines.
            resources_per_worker={"CPU": train.cpus_per_worker, **train.worker_resources},
        ),
        run_config=RunConfig(
            storage_path=path,
            storage_filesystem=filesystem,
            name=name,
            failure_config=FailureConfig(max_failures=train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
        ),
        datasets={"train": train_ds},
    )


def _outcome(
    model: Recommender, history: list[dict[str, Any]], t0: float, checkpoint: str | None
) -> TrainOutcome:
    scored = [h for h in history if VALID_METRIC in h]
    best = max(scored, key=lambda h: h[VALID_METRIC]) if scored else history[-1]
    wall = time.perf_counter() - t0
    return TrainOutcome(model, history, dict(best), dict(history[-1]), wall, checkpoint)


def _fit_closed_form(
    ds: DatasetVersion, args: ModelArgs, train: TrainArgs, seed: int
) -> TrainOutcome:
    t0 = time.perf_counter()
    model = build_model(args, ds.n_users, ds.n_items, seed=seed)
    model.fit(ds.csr(*fit_splits(train)))
    metrics: dict[str, Any] = {"epoch": 1, "loss": math.nan, "interactions_per_s": math.nan}
    if not train.refit:
        history = model.history(ds, *fit_splits(train))
        metrics.update(validation_metrics(model, history, ds.csr("valid")))
    metrics["epoch_s"] = time.perf_counter() - t0
    return _outcome(model, [metrics], t0, None)


def fit(
    ds: DatasetVersion,
    model: ModelArgs,
    train: TrainArgs,
    *,
    seed: int = 0,
    runs: Lake | None = None,
    name: str | None = None,
) -> TrainOutcome:
    """Fit ``model`` on a dataset version: closed form in-process, or a Ray Train run.

    ``runs`` defaults to ``<dataset's lake>/runs`` and ``name`` to model, dataset, version and a
    random suffix; the other arguments are those of ``build_trainer``.
    """
    if model.name in CLOSED_FORM:
        return _fit_closed_form(ds, model, train, seed)
    t0 = time.perf_counter()
    name = name or f"{model.name}-{ds.name}-{ds.version[:8]}-{uuid.uuid4().hex[:6]}"
    runs = runs or Lake(ds.lake.full_uri("runs"))
    trainer = build_trainer(ds, model, train, runs=runs, name=name, seed=seed)
    result = call_in_thread(trainer.fit)
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"training run {name} finished without a checkpoint")
    state, history = _read_checkpoint(result.checkpoint)
    fitted = build_model(model, ds.n_users, ds.n_items, ds.item_genres(), seed=seed)
    fitted.load_state_dict(state["model"])
    return _outcome(fitted, history, t0, result.checkpoint.path)


def dataset_for(lake: Lake, data: DataArgs, seed: int = 0) -> DatasetVersion:
    """The latest version of dataset ``data.name`` in ``lake``; ingests it when there is none."""
    from app import ingest

    if list_datasets(lake, data.name):
        return load_dataset(lake, data.name, "latest")
    log.info("no dataset %r in %s yet: ingesting it first", data.name, lake.uri)
    return ingest.run(data, lake, seed=seed)


@dataclass
class Validation:
    """A configuration chosen on the validation split: what its refit and registration need.

    ``validate`` makes one from a train-only fit; ``app.tune`` makes one from its best trial.
    """

    cfg: AppConfig
    """The resolved configuration that was validated (recorded with the registered model)."""
    metrics: dict[str, Any]
    """Metrics to register: ``valid_*`` at the best epoch, plus any the caller adds."""
    best_epoch: int | None
    """The epoch count the refit trains for (``None``: ``train.epochs``)."""
    run: str | None = None
    """Checkpoint of the validated run: the refit's ``parent_run`` in the lineage."""
    wall_time_s: float = 0.0
    """Training seconds of the validating fit, counted in ``train_wall_s``."""
    lineage: dict[str, Any] = field(default_factory=dict)
    """Extra lineage: the epoch ``history``, or the search history under ``tune``."""
    outcome: TrainOutcome | None = None
    """The validating fit itself, registered as is when there is no refit."""


def validate(cfg: AppConfig, ds: DatasetVersion) -> Validation:
    """Fit ``cfg`` on the train split only and keep its best epoch's validation metrics."""
    first_cfg = with_train(cfg, refit=False)
    outcome = fit(ds, first_cfg.model, first_cfg.train, seed=first_cfg.seed)
    best = outcome.best_metrics
    valid = {k: v for k, v in best.items() if k.startswith("valid_")}
    log.info("validation at best epoch %s: %s", best.get("epoch"), valid)
    return Validation(
        cfg=first_cfg,
        metrics=valid,
        best_epoch=best.get("epoch"),
        run=outcome.checkpoint_path,
        wall_time_s=outcome.wall_time_s,
        lineage={"history": outcome.history},
        outcome=outcome,
    )


def register_validated(
    validation: Validation,
    ds: DatasetVersion,
    *,
    refit: bool = True,
    promote_to: str = "staging",
    reason: str = "jobs.train",
) -> ModelRecord:
    """Refit a validated configuration on train + validation (protocol), register and promote it.

    The model is registered in the lake of ``ds``, the version it was validated on. Without
    ``refit`` the validating fit itself is registered. ``promote_to`` is the alias to point at
    it (``none`` skips); a refused promotion to ``production`` is logged, the version stays.
    ``reason`` goes to the promotion log (the job's name).
    """
    if refit:
        epochs = int(validation.best_epoch or validation.cfg.train.epochs)
        final_cfg = with_train(validation.cfg, refit=True, epochs=epochs)
        final = fit(ds, final_cfg.model, final_cfg.train, seed=final_cfg.seed)
        parent, wall = validation.run, validation.wall_time_s + final.wall_time_s
    elif validation.outcome is not None:
        final_cfg, final, parent = validation.cfg, validation.outcome, None
        wall = validation.wall_time_s
    else:
        raise ValueError("nothing to register: no refit and no fitted model in the validation")
    name = registry_name(final_cfg.data.name, final_cfg.model.name)
    metrics = {
        **validation.metrics,
        "best_epoch": validation.best_epoch,
        "train_wall_s": round(wall, 2),
        "fit_on": "train+valid" if final_cfg.train.refit else "train",
    }
    lineage = {"run": final.checkpoint_path, "parent_run": parent, **validation.lineage}
    record = register(ds.lake, name, final.model, final_cfg, ds, metrics, lineage)
    if promote_to != "none":
        try:
            promote(ds.lake, name, record.version, promote_to, reason=reason)
        except PromotionRefused as exc:
            log.warning("%s", exc)
    return record


def run(cfg: AppConfig, ds: DatasetVersion) -> ModelRecord:
    """Train, validate, refit on train + validation (protocol) and register; returns the record.

    Validation metrics (``valid_ndcg@10`` ...) come from the train-only fit at its best epoch;
    with ``train.refit_final`` the registered weights come from the refit with that many epochs.
    The whole of ``cfg`` is recorded with the model, in the lake of ``ds``.
    """
    return register_validated(
        validate(cfg, ds),
        ds,
        refit=cfg.train.refit_final,
        promote_to=cfg.train.promote_to,
        reason="jobs.train",
    )
