"""Training stage: Ray Train (TorchTrainer, DDP) for embedding models, closed form for the rest.

Run with ``python -m jobs.train --config jobs/configs/<name>.yaml [train.num_workers=2 ...]``.
``build_trainer`` is the one place that wires ``ScalingConfig``, datasets and checkpoints; the
tuning stage reuses it for every trial, and ``register_validated`` (refit on train + validation,
register, promote) for its best trial.
"""

from __future__ import annotations

import json
import logging
import math
import os
import posixpath
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import scipy.sparse as sp
import torch

from app.cluster import call_in_thread
from app.config import AppConfig, ModelArgs, TrainArgs
from app.dataset import GENRES, ITEM_IDX, USER_IDX, DatasetVersion, load_dataset
from app.lake import Lake
from app.model import Recommender, build_model

if TYPE_CHECKING:
    from app.registry import ModelRecord

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
    history: list[dict[str, Any]] = field(default_factory=list)
    """One metrics dict per epoch, in order (restarts included once)."""
    best_metrics: dict[str, Any] = field(default_factory=dict)
    """The epoch with the best validation NDCG@10 (the last epoch when there is none)."""
    last_metrics: dict[str, Any] = field(default_factory=dict)
    """The last epoch's metrics."""
    wall_time_s: float = 0.0
    """Seconds from start to fitted model."""
    checkpoint_path: str | None = None
    """Where the final Ray Train checkpoint lives (None for closed-form models)."""


def _fit_splits(train: TrainArgs) -> tuple[str, ...]:
    return ("train", "valid") if train.refit else ("train",)


def _item_genres(ds: DatasetVersion) -> list[list[str]] | None:
    items = ds.items()
    if GENRES not in items.column_names:
        return None
    by_idx: list[list[str]] = [[] for _ in range(ds.n_items)]
    for idx, genres in zip(
        items.column(ITEM_IDX).to_pylist(), items.column(GENRES).to_pylist(), strict=True
    ):
        by_idx[int(idx)] = list(genres or [])
    return by_idx


def _valid_metrics(
    model: Recommender, history: sp.csr_matrix, target: sp.csr_matrix
) -> dict[str, float]:
    """Full-ranking validation metrics (``valid_ndcg@10`` ...), train items excluded."""
    from app.evaluate import evaluate

    metrics = evaluate(lambda users: model.score(users, history[users]), history, target, k=10)
    return {f"valid_{k}": float(v) for k, v in metrics.items() if k != "users"}


def _maybe_fail(epoch: int, rank: int, fail_at: int | None, marker: str | None) -> None:
    """Fault-injection hook: rank 0 dies once at the start of epoch ``fail_at``."""
    if fail_at is None or not marker or rank != 0 or epoch != fail_at or os.path.exists(marker):
        return
    with open(marker, "w") as f:
        f.write(f"failed at epoch {epoch}\n")
    log.warning("fault injection: exiting at the start of epoch %d", epoch)
    os._exit(1)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker loop: one report (metrics + checkpoint) per epoch.

    Args:
        config: ``train`` and ``model`` sections (dumped), ``seed``, and the dataset version's
            ``lake``, ``dataset`` and ``version``; optional ``fail_at_epoch`` and ``fail_marker``.
    """
    train_args = TrainArgs.model_validate(config["train"])
    model_args = ModelArgs.model_validate(config["model"])
    import ray.train
    import ray.train.torch

    seed = int(config.get("seed", 0))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    ds = load_dataset(config["lake"], config["dataset"], config["version"])
    fit_csr = ds.csr(*_fit_splits(train_args))
    target = None if train_args.refit else ds.csr("valid")

    rec = build_model(model_args, ds.n_users, ds.n_items, _item_genres(ds), seed=seed)
    if not hasattr(rec, "module"):
        raise ValueError(f"model.name={model_args.name!r} has no torch module to train")
    rec.set_train(fit_csr)  # type: ignore[attr-defined]
    module: torch.nn.Module = rec.module  # type: ignore[attr-defined]
    optimizer = torch.optim.Adam(module.parameters(), lr=train_args.lr)

    start_epoch, restarts, history = 0, 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, STATE_FILE), weights_only=True, map_location="cpu")
            with open(os.path.join(d, HISTORY_FILE)) as f:
                history = json.load(f)
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
    fail_at = config.get("fail_at_epoch")
    last_dir: str | None = None

    for epoch in range(start_epoch + 1, train_args.epochs + 1):
        _maybe_fail(epoch, rank, fail_at, config.get("fail_marker"))
        module.train()
        t0 = time.perf_counter()
        loss_sum = torch.zeros(2, dtype=torch.float64)
        for batch in shard.iter_torch_batches(
            batch_size=train_args.batch_size,
            local_shuffle_buffer_size=max(20 * train_args.batch_size, 50_000),
            local_shuffle_seed=seed * 1000 + epoch * 31 + rank,
            device=device,
        ):
            users, items = batch[USER_IDX].long(), batch[ITEM_IDX].long()
            loss = ddp(users, items)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += torch.tensor([loss.item() * len(users), len(users)], dtype=torch.float64)
        if world > 1:
            torch.distributed.all_reduce(loss_sum)
        seconds = time.perf_counter() - t0
        n_seen = float(loss_sum[1])
        metrics: dict[str, Any] = {
            "epoch": epoch,
            "loss": float(loss_sum[0] / max(n_seen, 1.0)),
            "interactions_per_s": n_seen / max(seconds, 1e-9),
            "epoch_s": seconds,
            "restarts": restarts,
        }
        is_eval = epoch % train_args.eval_every == 0 or epoch == train_args.epochs
        if rank == 0 and target is not None and is_eval:
            metrics.update(_valid_metrics(rec, fit_csr, target))
        if rank != 0:
            ray.train.report(metrics, checkpoint=None)
            continue
        history.append(metrics)
        d = tempfile.mkdtemp(prefix="scalerec-ckpt-")
        state = {"model": rec.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch}
        state["restarts"] = restarts
        torch.save(state, os.path.join(d, STATE_FILE))
        with open(os.path.join(d, HISTORY_FILE), "w") as f:
            json.dump(history, f)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        # Reports upload synchronously, so the previous folder is no longer needed. In local
        # mode (num_workers=0) the result points at the last folder itself: keep that one.
        if last_dir is not None:
            shutil.rmtree(last_dir, ignore_errors=True)
        last_dir = d
    if last_dir is not None and not config.get("local_mode", False):
        shutil.rmtree(last_dir, ignore_errors=True)


def _storage(storage_path: str) -> tuple[str, Any]:
    """Scheme-less storage path and the pyarrow filesystem for it (None on local disk)."""
    if storage_path.startswith(("s3://", "s3a://")):
        lake = Lake(storage_path)
        return lake.path(), lake.arrow_fs
    return os.path.abspath(storage_path), None


def build_trainer(
    cfg: AppConfig,
    ds: DatasetVersion,
    storage_path: str,
    name: str,
    callbacks: list[Any] | None = None,
) -> Any:
    """The ``TorchTrainer`` for ``cfg`` on a dataset version (train, or train+valid on refit).

    Args:
        cfg: The whole config (the trainer reads ``model``, ``train`` and ``seed``).
        ds: The dataset version to train on.
        storage_path: Local folder or ``s3://`` URI for checkpoints (``<lake>/runs`` by default).
        name: Run name (a folder under ``storage_path``).
        callbacks: Extra ``RunConfig`` callbacks (Tune adds its ``TuneReportCallback``).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if cfg.model.name in CLOSED_FORM:
        raise ValueError(f"model.name={cfg.model.name!r} is fitted in closed form: call fit()")
    loop_config: dict[str, Any] = {
        "train": cfg.train.model_dump(),
        "model": cfg.model.model_dump(),
        "seed": cfg.seed,
        "lake": ds.lake.uri,
        "dataset": ds.name,
        "version": ds.version,
        "local_mode": cfg.train.num_workers == 0,
    }
    # The fault hook travels in the config: workers do not see the driver's later environment.
    if os.environ.get(FAIL_AT_EPOCH_ENV):
        loop_config["fail_at_epoch"] = int(os.environ[FAIL_AT_EPOCH_ENV])
        loop_config["fail_marker"] = os.environ.get(FAIL_MARKER_ENV, "")
    path, filesystem = _storage(storage_path)
    # Read the split once: otherwise every epoch re-runs the Parquet read tasks, which costs
    # more than the epoch itself on small data. Blocks live in the object store, not the driver.
    train_ds = (
        ds.read_ds(*_fit_splits(cfg.train)).materialize().randomize_block_order(seed=cfg.seed)
    )
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=cfg.train.num_workers,
            use_gpu=cfg.train.use_gpu,
            # Fractional CPUs leave room for Ray Data's read tasks on small machines.
            resources_per_worker={"CPU": cfg.train.cpus_per_worker},
        ),
        run_config=RunConfig(
            storage_path=path,
            storage_filesystem=filesystem,
            name=name,
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
        ),
        datasets={"train": train_ds},
    )


def _best(history: list[dict[str, Any]]) -> dict[str, Any]:
    scored = [h for h in history if VALID_METRIC in h]
    if not scored:
        return dict(history[-1]) if history else {}
    return dict(max(scored, key=lambda h: h[VALID_METRIC]))


def _fit_closed_form(cfg: AppConfig, ds: DatasetVersion) -> TrainOutcome:
    t0 = time.perf_counter()
    model = build_model(cfg.model, ds.n_users, ds.n_items, seed=cfg.seed)
    fit_csr = ds.csr(*_fit_splits(cfg.train))
    model.fit(fit_csr)  # type: ignore[attr-defined]
    metrics: dict[str, Any] = {"epoch": 1, "loss": math.nan, "interactions_per_s": math.nan}
    if not cfg.train.refit:
        history = model.history(ds, *_fit_splits(cfg.train))
        metrics.update(_valid_metrics(model, history, ds.csr("valid")))
    wall = time.perf_counter() - t0
    metrics["epoch_s"] = wall
    return TrainOutcome(model, [metrics], dict(metrics), dict(metrics), wall, None)


def fit(
    cfg: AppConfig, ds: DatasetVersion, name: str | None = None, storage_path: str | None = None
) -> TrainOutcome:
    """Fit ``cfg.model`` on a dataset version: closed form in-process, or a Ray Train run.

    Args:
        cfg: The whole config.
        ds: The dataset version.
        name: Run name (default: model, dataset, version and a random suffix).
        storage_path: Checkpoint storage (default ``<cfg.lake>/runs``).
    """
    if cfg.model.name in CLOSED_FORM:
        return _fit_closed_form(cfg, ds)
    t0 = time.perf_counter()
    name = name or f"{cfg.model.name}-{ds.name}-{ds.version[:8]}-{uuid.uuid4().hex[:6]}"
    storage_path = storage_path or posixpath.join(cfg.lake.rstrip("/"), "runs")
    result = call_in_thread(build_trainer(cfg, ds, storage_path, name).fit)
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"training run {name} finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, STATE_FILE), weights_only=True, map_location="cpu")
        with open(os.path.join(d, HISTORY_FILE)) as f:
            history = json.load(f)
    model = build_model(cfg.model, ds.n_users, ds.n_items, _item_genres(ds), seed=cfg.seed)
    model.load_state_dict(state["model"])
    return TrainOutcome(
        model=model,
        history=history,
        best_metrics=_best(history),
        last_metrics=dict(history[-1]) if history else {},
        wall_time_s=time.perf_counter() - t0,
        checkpoint_path=result.checkpoint.path,
    )


def dataset_for(cfg: AppConfig) -> DatasetVersion:
    """The config's latest dataset version, ingesting it first when there is none."""
    from app import data
    from app.dataset import list_datasets, load_dataset

    if list_datasets(cfg.lake, cfg.data.name):
        return load_dataset(cfg.lake, cfg.data.name, "latest")
    log.info("no dataset %r in %s yet: ingesting it first", cfg.data.name, cfg.lake)
    return data.run(cfg.data, cfg.lake, seed=cfg.seed)


@dataclass
class Validation:
    """A configuration chosen on the validation split: what its refit and registration need.

    ``validate`` makes one from a train-only fit; ``app.tune`` makes one from its best trial.
    """

    cfg: AppConfig
    """The resolved configuration that was validated."""
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
    first_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"refit": False})})
    outcome = fit(first_cfg, ds)
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

    Args:
        validation: The configuration, its validation metrics and lineage.
        ds: The dataset version it was validated on.
        refit: Refit for the best epoch count; otherwise register the validating fit itself.
        promote_to: Alias to point at the new version (``none`` to skip); a refused promotion
            to ``production`` is logged, the version stays registered.
        reason: Why, for the promotion log (the job's name).

    Returns:
        The registry record of the registered model.
    """
    from app import registry

    if refit:
        epochs = int(validation.best_epoch or validation.cfg.train.epochs)
        final_cfg = validation.cfg.model_copy(
            update={
                "train": validation.cfg.train.model_copy(update={"refit": True, "epochs": epochs})
            }
        )
        final, parent = fit(final_cfg, ds), validation.run
        wall = validation.wall_time_s + final.wall_time_s
    elif validation.outcome is not None:
        final_cfg, final, parent = validation.cfg, validation.outcome, None
        wall = validation.wall_time_s
    else:
        raise ValueError("nothing to register: no refit and no fitted model in the validation")
    lake = Lake(final_cfg.lake)
    name = registry.registry_name(final_cfg)
    metrics = {
        **validation.metrics,
        "best_epoch": validation.best_epoch,
        "train_wall_s": round(wall, 2),
        "fit_on": "train+valid" if final_cfg.train.refit else "train",
    }
    lineage = {"run": final.checkpoint_path, "parent_run": parent, **validation.lineage}
    record = registry.register(lake, name, final.model, final_cfg, ds, metrics, lineage)
    if promote_to != "none":
        try:
            registry.promote(lake, name, record.version, promote_to, reason=reason)
        except registry.PromotionRefused as exc:
            log.warning("%s", exc)
    return record


def run(cfg: AppConfig) -> ModelRecord:
    """Train, validate, refit on train + validation (protocol) and register; returns the record.

    Validation metrics (``valid_ndcg@10`` ...) come from the train-only fit at its best epoch;
    the registered weights come from the refit with that many epochs when
    ``train.refit_final`` is set.
    """
    ds = dataset_for(cfg)
    return register_validated(
        validate(cfg, ds),
        ds,
        refit=cfg.train.refit_final,
        promote_to=cfg.train.promote_to,
        reason="jobs.train",
    )
