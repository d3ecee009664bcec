"""Training stage: Ray Train (TorchTrainer) for embedding models, closed form for the rest.

Run with ``python -m jobs.train --config jobs/configs/<name>.yaml [train.num_workers=2 ...]``.
``build_trainer`` is the one place that wires ``ScalingConfig``, datasets and checkpoints; the
tuning stage reuses it for every trial, and ``register_validated`` for its best trial. Workers
(``app.train_worker``) step with ``app.models.run_epoch``, as ``TorchRecommender.fit`` does.
"""

from __future__ import annotations

import logging
import math
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from app.cluster import call_in_thread
from app.config import AppConfig, DataArgs, ModelArgs, TrainArgs
from app.evaluate import validation_metrics
from app.models import Recommender, build_model
from app.store import (
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
from app.train_worker import (
    FAIL_AT_EPOCH_ENV,
    FAIL_MARKER_ENV,
    read_checkpoint,
    train_loop_per_worker,
)
from app.train_worker import (
    VALID_METRIC as VALID_METRIC,  # re-exported: the stages' selection metric
)
from app.train_worker import (
    fit_splits as fit_splits,
)
from app.train_worker import (
    shuffle_buffer_rows as shuffle_buffer_rows,
)

if TYPE_CHECKING:
    import pyarrow.fs as pafs

log = logging.getLogger(__name__)

CLOSED_FORM = ("popularity", "ease", "edlae")
WORKER_ENV = {
    # Ray starts workers at nice 15, below its own daemons and the driver: a worker group that
    # is the cluster's main job runs at normal priority, as a plain loop would.
    "RAY_worker_niceness": "0",
}
"""Environment of every Ray Train worker (``RunConfig.worker_runtime_env``)."""


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


def with_train(cfg: AppConfig, **updates: Any) -> AppConfig:
    """``cfg`` with some ``train`` fields replaced."""
    return cfg.model_copy(update={"train": cfg.train.model_copy(update=updates)})


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
            worker_runtime_env={"env_vars": WORKER_ENV},
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
    state, history = read_checkpoint(result.checkpoint)
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
