from __future__ import annotations

import pytest

from app import registry, tune
from app.config import AppConfig, ConfigError, DataArgs, ModelArgs, TrainArgs, TuneArgs
from app.lake import Lake
from app.train import VALID_METRIC

# Everything but the searched keys is fixed: tiny, fast trials (exact softmax on 48 items).
FIXED = {
    "model.name": "mf",
    "model.embed_dim": 16,
    "model.loss": "softmax",
    "model.num_negatives": 10_000,
    "model.temperature": 0.2,
    "model.l2": 1e-4,
}


def _cfg(lake: str, space: dict, num_samples: int = 2, max_epochs: int = 2) -> AppConfig:
    return AppConfig(
        lake=lake,
        data=DataArgs(name="tiny", source="synthetic"),
        model=ModelArgs(name="mf"),
        # Trials run one Train worker (Tune needs its reports); the refit runs in the driver.
        train=TrainArgs(num_workers=0, cpus_per_worker=0.5, batch_size=64, max_failures=0),
        tune=TuneArgs(
            num_samples=num_samples,
            max_concurrent_trials=1,
            grace_period=1,
            max_epochs=max_epochs,
            search_space={**FIXED, **space},
        ),
    )


def _per_epoch(cfg: AppConfig) -> dict[str, list]:
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(tune.experiment_path(cfg))
    return {
        trial: list(zip(df["epoch"], df[VALID_METRIC], strict=True))
        for trial, df in analysis.trial_dataframes.items()
        if len(df)
    }


def test_search_space_defaults_overrides_and_errors():
    from ray.tune.search.sample import Categorical, Float, Integer

    space = tune.build_search_space(
        {"model.embed_dim": {"low": 8, "high": 64, "log": True}, "model.name": "mf"}
    )
    assert isinstance(space["model.embed_dim"], Integer)
    assert space["model.name"] == "mf"
    assert isinstance(space["train.lr"], Float) and isinstance(space["model.loss"], Categorical)
    assert {"model.l2", "model.num_negatives", "model.temperature"} <= set(space)
    with pytest.raises(ConfigError, match="tune.search_space.model.embed_dims"):
        tune.build_search_space({"model.embed_dims": [8]})
    with pytest.raises(ConfigError, match="low must be below high"):
        tune.build_search_space({"train.lr": {"low": 1.0, "high": 0.1}})
    cfg = tune.apply_params(AppConfig(), {"model.embed_dim": 8, "train.lr": 0.1})
    assert (cfg.model.embed_dim, cfg.train.lr) == (8, 0.1)
    with pytest.raises(ValueError, match="embed_dim"):
        tune.apply_params(AppConfig(), {"model.embed_dim": -1})


@pytest.mark.slow
def test_search_refit_register_promote(ray_cluster, tiny_dataset):
    lake = Lake(tiny_dataset.lake.uri)
    cfg = _cfg(lake.uri, {"train.lr": {"low": 0.01, "high": 0.05, "log": True}})
    record = tune.run(cfg, searcher="optuna")

    epochs = _per_epoch(cfg)
    assert len(epochs) == 2  # two trials, each reported validation NDCG@10 every epoch
    assert all([e for e, _ in rows] == [1, 2] for rows in epochs.values())
    assert all(0.0 <= v <= 1.0 for rows in epochs.values() for _, v in rows)

    search = record.lineage["tune"]
    assert search["searcher"] == "optuna" and len(search["trials"]) == 2
    best = search["trials"][0]
    assert best["status"] == "done" and best["epochs_run"] == 2
    assert best["best_valid_ndcg"] == max(v for rows in epochs.values() for _, v in rows)
    assert set(best["params"]) >= {"train.lr", "model.name"}
    # The protocol: refit on train + valid for the best epoch count, metrics from validation.
    assert record.config["train"]["refit"] is True
    assert record.config["train"]["epochs"] == best["best_epoch"]
    assert record.config["train"]["lr"] == pytest.approx(best["params"]["train.lr"])
    assert record.metrics[VALID_METRIC] == pytest.approx(best["best_valid_ndcg"])
    assert record.metrics["fit_on"] == "train+valid" and record.metrics["tune_trials"] == 2
    assert registry.aliases(lake, "tiny-mf")["staging"] == record.version
    assert "done" in tune.format_trials(search["trials"])


@pytest.mark.slow
def test_failing_trial_does_not_sink_the_search(ray_cluster, tiny_dataset):
    # A grid over lr with one invalid value: that trial fails validation, the other one wins.
    cfg = _cfg(tiny_dataset.lake.uri, {"train.lr": {"grid": [0.03, -1.0]}}, num_samples=1)
    cfg = cfg.model_copy(update={"tune": cfg.tune.model_copy(update={"max_epochs": 1})})
    record = tune.run(cfg, searcher="random")
    trials = record.lineage["tune"]["trials"]
    assert sorted(t["status"] for t in trials) == ["done", "error"]
    failed = next(t for t in trials if t["status"] == "error")
    assert failed["params"]["train.lr"] == -1.0
    assert failed["error"].startswith("ValidationError: train.lr: Input should be greater than 0")
    assert record.metrics["tune_errored_trials"] == 1
    assert record.config["train"]["lr"] == 0.03
