"""Tuning stage: Ray Tune over Ray Train runs (ASHA + Optuna), then refit, register and promote.

Run with ``python -m jobs.tune --config jobs/configs/<name>.yaml [tune.num_samples=16 ...]``.

Each trial is a Ray Train run built by ``app.train.build_trainer`` with a ``TuneReportCallback``
(nothing is copied from the training stage): trials fit on train and report validation NDCG@10
every epoch, ASHA stops the weak ones early, and the searcher proposes the next configuration.
The best trial's configuration goes through the training stage's ``register_validated``: refit
on train + validation for its best epoch count (protocol: docs/design.md), registered with the whole
search history in its lineage and promoted to ``staging``. The experiment lives at
``<lake>/tune/<name>``; with ``tune.resume`` a search interrupted by a driver crash continues
where it stopped (finished trials are not rerun, and unfinished ones resume from their last
Train checkpoint).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import posixpath
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from app import train
from app.config import AppConfig, ConfigError, set_dotted
from app.store import DatasetVersion, Lake, ModelRecord

if TYPE_CHECKING:
    from ray.tune import PlacementGroupFactory

log = logging.getLogger(__name__)

METRIC = train.VALID_METRIC
TIME_ATTR = "epoch"
"""Per-epoch key of ``train_loop_per_worker``'s reports (survives Train worker restarts)."""
TRIAL_DRIVER_CPUS = 0.01
"""A trial's driver only waits on its Train run; the CPUs go to the Train workers."""
CLOSED_FORM_TRIAL_CPUS = 1.0

"""A closed-form trial (EASE, EDLAE) solves its model in the trial process."""

DEFAULT_SEARCH_SPACE: dict[str, Any] = {
    "model.name": ["mf", "two_tower"],
    "model.embed_dim": [32, 64, 128],
    "model.loss": ["softmax", "bpr"],
    "model.num_negatives": [64, 256, 1024],
    "model.temperature": {"low": 0.05, "high": 0.5, "log": True},
    "model.l2": {"low": 1e-6, "high": 1e-2, "log": True},
    "train.lr": {"low": 1e-3, "high": 3e-2, "log": True},
}
"""Searched unless ``tune.search_space`` overrides a key. Epochs are searched by ASHA (each trial
runs up to ``tune.max_epochs``) and the refit uses the best trial's best epoch; add
``train.epochs`` to the search space to sample it as well."""


@dataclass
class TrialRow:
    """One line of the search history."""

    trial_id: str
    params: dict[str, Any]
    best_valid_ndcg: float | None
    best_epoch: int | None
    epochs_run: int
    status: str
    """``done`` (ran all its epochs), ``stopped`` (early-stopped by ASHA) or ``error``."""
    error: str | None = None


def build_search_space(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Tune's ``param_space`` from the default space updated with ``overrides``.

    A value is a list of choices, ``{"low", "high", "log"}`` (ints give an int range, bounds
    included), ``{"grid": [...]}`` (every value, random searcher only), a scalar (fixed), or
    ``None`` to drop a default dimension (e.g. the MF settings when searching EDLAE only).

    Raises:
        ConfigError: naming the ``tune.search_space`` key that is not a config field or is
            malformed.
    """
    from ray import tune

    space: dict[str, Any] = {}
    merged = {**DEFAULT_SEARCH_SPACE, **(overrides or {})}
    for key, spec in merged.items():
        _check_key(key)
        if spec is None:  # ``key: null`` removes a default dimension
            continue
        where = f"tune.search_space.{key}"
        if isinstance(spec, list | tuple):
            if not spec:
                raise ConfigError(f"{where}: empty list of choices")
            space[key] = tune.choice(list(spec))
        elif isinstance(spec, dict) and "grid" in spec:
            space[key] = tune.grid_search(list(spec["grid"]))
        elif isinstance(spec, dict):
            if set(spec) - {"low", "high", "log"} or not {"low", "high"} <= set(spec):
                raise ConfigError(f"{where}: expected {{low, high[, log]}}, got {spec!r}")
            low, high, use_log = spec["low"], spec["high"], bool(spec.get("log", False))
            if not low < high:
                raise ConfigError(f"{where}: low must be below high, got {spec!r}")
            if isinstance(low, int) and isinstance(high, int):
                space[key] = (tune.lograndint if use_log else tune.randint)(low, high + 1)
            else:
                space[key] = (tune.loguniform if use_log else tune.uniform)(low, high)
        else:
            space[key] = spec
    return space


def _check_key(key: str) -> None:
    node: Any = AppConfig
    for i, part in enumerate(key.split(".")):
        fields = getattr(node, "model_fields", None)
        if fields is None or part not in fields:
            raise ConfigError(
                f"tune.search_space.{key}: {'.'.join(key.split('.')[: i + 1])} is not a config key"
            )
        node = fields[part].annotation


def apply_params(cfg: AppConfig, params: dict[str, Any]) -> AppConfig:
    """``cfg`` with dotted ``params`` set, re-validated (a bad value raises in that trial only)."""
    tree = cfg.model_dump()
    for key, value in params.items():
        set_dotted(tree, key, value)
    return AppConfig.model_validate(tree)


def _trial_cfg(cfg: AppConfig, params: dict[str, Any]) -> AppConfig:
    """A trial's config: fit on train, validate every epoch, run until ASHA's ``max_t``."""
    cfg = apply_params(cfg, params)
    epochs = min(int(params.get("train.epochs", cfg.tune.max_epochs)), cfg.tune.max_epochs)
    # Local mode (num_workers=0) calls no Train callbacks, so Tune would see no reports.
    workers = max(cfg.train.num_workers, 1)
    return train.with_train(cfg, refit=False, eval_every=1, epochs=epochs, num_workers=workers)


def _trial(config: dict[str, Any], base: AppConfig, dataset: DatasetVersion, runs: Lake) -> None:
    """One trial: a Ray Train run whose per-epoch reports reach Tune (closed form: one fit)."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = _trial_cfg(base, config)
    if cfg.model.name in train.CLOSED_FORM:
        # Closed-form families (EASE, EDLAE, popularity) are fit in the trial itself by the
        # training stage's own path: one "epoch", one report.
        tune.report(train.fit(dataset, cfg.model, cfg.train, seed=cfg.seed).last_metrics)
        return
    # A stable run name: a restored trial resumes its Train run from the last checkpoint.
    trainer = train.build_trainer(
        dataset,
        cfg.model,
        cfg.train,
        runs=runs,
        name=tune.get_context().get_trial_id(),
        seed=cfg.seed,
        callbacks=[TuneReportCallback()],
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error


def trial_resources(base_family: str, config: dict[str, Any]) -> PlacementGroupFactory:
    """A trial's own CPUs: a closed-form fit computes in the trial, a Train run in its workers."""
    from ray.tune import PlacementGroupFactory

    family = config.get("model.name", base_family)
    cpus = CLOSED_FORM_TRIAL_CPUS if family in train.CLOSED_FORM else TRIAL_DRIVER_CPUS
    return PlacementGroupFactory([{"CPU": cpus}])


def experiment(cfg: AppConfig, ds: DatasetVersion) -> Lake:
    """Where the search lives: ``<dataset's lake>/tune/<tune.name or data.name>``."""
    return Lake(ds.lake.full_uri("tune", cfg.tune.name or cfg.data.name))


def _searcher(kind: str, cfg: AppConfig) -> Any:
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    if kind == "random":
        return BasicVariantGenerator(
            random_state=cfg.seed, max_concurrent=cfg.tune.max_concurrent_trials
        )
    if kind != "optuna":
        raise ConfigError(f"tune.searcher: expected 'optuna' or 'random', got {kind!r}")
    from ray.tune.search.optuna import OptunaSearch

    searcher = OptunaSearch(metric=METRIC, mode="max", seed=cfg.seed)
    return ConcurrencyLimiter(searcher, max_concurrent=cfg.tune.max_concurrent_trials)


def _default_searcher() -> str:
    try:
        import optuna  # noqa: F401
    except ImportError:
        return "random"
    return "optuna"


def build_tuner(
    cfg: AppConfig,
    ds: DatasetVersion,
    resume: bool = False,
    searcher: str | None = None,
    callbacks: list | None = None,
) -> Any:
    """The ``Tuner`` for ``cfg``'s search, restored from ``<lake>/tune/<name>`` when asked.

    Args:
        cfg: The whole config; trials vary the keys of the search space.
        ds: The dataset version every trial trains on.
        resume: Continue an interrupted search at the experiment path instead of starting over.
        searcher: ``optuna`` (default when installed) or ``random``.
        callbacks: Extra Tune callbacks.
    """
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    where = experiment(cfg, ds)
    storage, filesystem = train.ray_storage(where)
    trainable = tune.with_resources(
        tune.with_parameters(_trial, base=cfg, dataset=ds, runs=Lake(where.full_uri("runs"))),
        functools.partial(trial_resources, cfg.model.name),
    )
    if resume and tune.Tuner.can_restore(storage, storage_filesystem=filesystem):
        log.info("resuming the search at %s", where.uri)
        # Errored trials stay errored: a bad configuration would only fail again.
        return tune.Tuner.restore(storage, trainable, storage_filesystem=filesystem)
    space = build_search_space(cfg.tune.search_space)
    scheduler = ASHAScheduler(
        time_attr=TIME_ATTR,
        metric=METRIC,
        mode="max",
        grace_period=min(cfg.tune.grace_period, cfg.tune.max_epochs),
        # One past the last epoch: a trial that runs all its epochs ends when its Train run
        # returns. At max_t Tune would stop the trial actor at the last report, killing the Train
        # controller before it releases its workers' placement group (Ray Train's fallback
        # cleaner then has to find the cluster, which fails when a host runs several).
        max_t=cfg.tune.max_epochs + 1,
    )
    return tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            search_alg=_searcher(searcher or _default_searcher(), cfg),
            scheduler=scheduler,
            num_samples=cfg.tune.num_samples,
            max_concurrent_trials=cfg.tune.max_concurrent_trials,
        ),
        run_config=tune.RunConfig(
            name=posixpath.basename(storage),
            storage_path=posixpath.dirname(storage),
            storage_filesystem=filesystem,
            # A failing trial is recorded as errored; the search goes on without it.
            failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
            callbacks=callbacks,
            verbose=1,
        ),
    )


def trial_rows(results: Any, space_keys: list[str], max_epochs: int) -> list[tuple[TrialRow, Any]]:
    """The search history of a ``ResultGrid``: (row, ``Result``) per trial, best first."""
    rows = []
    for result in results:
        config = result.config or {}
        params = {k: config[k] for k in space_keys if k in config}
        df = result.metrics_dataframe
        best, best_epoch, epochs_run = None, None, 0
        if df is not None and len(df) and TIME_ATTR in df:
            epochs_run = int(df[TIME_ATTR].max())
            if METRIC in df and df[METRIC].notna().any():
                i = df[METRIC].idxmax()
                best, best_epoch = float(df[METRIC][i]), int(df[TIME_ATTR][i])
        planned = min(int(config.get("train.epochs", max_epochs)), max_epochs)
        if config.get("model.name") in train.CLOSED_FORM:
            planned = 1  # one fit, one report
        if result.error is not None:
            status = "error"
        elif epochs_run < planned:
            status = "stopped"
        else:
            status = "done"
        row = TrialRow(
            trial_id=(result.metrics or {}).get("trial_id")
            or os.path.basename(str(result.path or "?")),
            params=params,
            best_valid_ndcg=best,
            best_epoch=best_epoch,
            epochs_run=epochs_run,
            status=status,
            error=None if result.error is None else _first_line(result.error),
        )
        rows.append((row, result))
    rows.sort(key=lambda rr: math.inf if rr[0].best_valid_ndcg is None else -rr[0].best_valid_ndcg)
    return rows


def _first_line(error: BaseException) -> str:
    """A one-line reason for a failed trial (the user's exception, not Ray's wrapper)."""
    cause = getattr(error, "cause", None) or error
    errors = getattr(cause, "errors", None)
    if callable(errors):  # pydantic: name the offending keys
        try:
            text = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors())
        except (TypeError, KeyError):
            text = str(cause)
    else:
        lines = [ln for ln in str(cause).splitlines() if ln.strip()]
        text = lines[-1] if lines else ""
    return f"{type(cause).__name__}: {text}"[:300]


def format_trials(rows: list[dict[str, Any]] | list[TrialRow]) -> str:
    """A plain-text table of the search history (as stored in the lineage, or ``TrialRow``s)."""
    dicts = [r.__dict__ if isinstance(r, TrialRow) else r for r in rows]
    keys = sorted({k for r in dicts for k in r["params"]})
    head = ["trial", "status", "epochs", "best_epoch", METRIC, *keys]
    lines = []
    for r in dicts:
        ndcg = r["best_valid_ndcg"]
        cells = [
            r["trial_id"],
            r["status"],
            str(r["epochs_run"]),
            str(r["best_epoch"] if r["best_epoch"] is not None else "-"),
            "-" if ndcg is None else f"{ndcg:.4f}",
        ]
        for k in keys:
            v = r["params"].get(k, "")
            cells.append(f"{v:.3g}" if isinstance(v, float) else str(v))
        lines.append(cells)
    widths = [max(len(str(c)) for c in col) for col in zip(head, *lines, strict=False)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*row) for row in [head, *lines])


def run(
    cfg: AppConfig, ds: DatasetVersion, resume: bool | None = None, searcher: str | None = None
) -> ModelRecord:
    """Search, refit the best configuration on train + validation, register and promote it.

    Args:
        cfg: The whole config (``tune`` drives the search, the rest is each trial's base).
        ds: The dataset version to search and refit on; the model is registered in its lake.
        resume: Continue an interrupted search (default ``tune.resume``, else false).
        searcher: ``optuna`` or ``random`` (default ``tune.searcher``, else Optuna when
            installed).

    Returns:
        The registry record of the refit model; its lineage holds the search history under
        ``tune``.
    """
    resume = cfg.tune.resume if resume is None else resume
    searcher = searcher or cfg.tune.searcher or _default_searcher()
    t0 = time.perf_counter()
    results = build_tuner(cfg, ds, resume=resume, searcher=searcher).fit()
    search_s = time.perf_counter() - t0
    space_keys = list({**DEFAULT_SEARCH_SPACE, **cfg.tune.search_space})
    pairs = trial_rows(results, space_keys, cfg.tune.max_epochs)
    rows = [row for row, _ in pairs]
    log.info("search finished in %.1f s:\n%s", search_s, format_trials(rows))
    if not rows or rows[0].best_valid_ndcg is None:
        errors = "; ".join(f"{r.trial_id}: {r.error}" for r in rows if r.error)
        raise RuntimeError(f"no trial reported {METRIC} (errors: {errors or 'none'})")
    best, best_result = pairs[0]
    df = best_result.metrics_dataframe
    best_row = df[df[TIME_ATTR] == best.best_epoch].iloc[-1].to_dict()

    chosen = train.Validation(
        cfg=apply_params(cfg, best.params),
        metrics={
            **{k: float(v) for k, v in best_row.items() if k.startswith("valid_")},
            "tune_wall_s": round(search_s, 2),
            "tune_trials": len(rows),
            "tune_errored_trials": sum(r.status == "error" for r in rows),
        },
        best_epoch=best.best_epoch,
        run=best_row.get("checkpoint_path"),
        lineage={
            "tune": {
                "experiment": experiment(cfg, ds).uri,
                "searcher": searcher,
                "scheduler": "ASHA",
                "metric": METRIC,
                "search_space": {**DEFAULT_SEARCH_SPACE, **cfg.tune.search_space},
                "best_trial": best.trial_id,
                "wall_s": round(search_s, 2),
                "trials": [r.__dict__ for r in rows],
            },
        },
    )
    return train.register_validated(
        chosen, ds, refit=True, promote_to=cfg.tune.promote_to, reason="jobs.tune"
    )
