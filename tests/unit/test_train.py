from __future__ import annotations

import os

import pytest

from app.config import AppConfig, DataArgs, ModelArgs, TrainArgs
from app.evaluate import evaluate
from app.models import MatrixFactorization, Popularity, SequenceAutoencoder
from app.store import Lake, aliases, list_versions
from app.train import FAIL_AT_EPOCH_ENV, FAIL_MARKER_ENV, VALID_METRIC, TrainOutcome, fit, run


def _cfg(lake: str, **train) -> AppConfig:
    model = ModelArgs(name="mf", embed_dim=16, num_negatives=10_000, temperature=0.2)
    base = {"num_workers": 2, "cpus_per_worker": 0.5, "epochs": 8, "batch_size": 64, "lr": 0.02}
    return AppConfig(lake=lake, model=model, train=TrainArgs(**{**base, **train}))


def _fit(cfg: AppConfig, ds) -> TrainOutcome:
    return fit(ds, cfg.model, cfg.train, seed=cfg.seed)


def _popularity_valid(ds) -> float:
    train, valid = ds.csr("train"), ds.csr("valid")
    pop = Popularity(ds.n_users, ds.n_items).fit(train)
    return evaluate(lambda u: pop.score(u, train[u]), train, valid)["ndcg@10"]


def _check(outcome: TrainOutcome, ds, epochs: int) -> None:
    assert [h["epoch"] for h in outcome.history] == list(range(1, epochs + 1))
    losses = [h["loss"] for h in outcome.history]
    assert losses[-1] < 0.8 * losses[0]
    assert all(h["interactions_per_s"] > 0 for h in outcome.history)
    assert outcome.best_metrics[VALID_METRIC] > _popularity_valid(ds) + 0.1
    assert isinstance(outcome.model, MatrixFactorization)
    # The returned model is the last epoch's weights: it reproduces the last reported metric.
    train, valid = ds.csr("train"), ds.csr("valid")
    again = evaluate(lambda u: outcome.model.score(u, train[u]), train, valid)["ndcg@10"]
    assert again == pytest.approx(outcome.last_metrics[VALID_METRIC], abs=1e-9)


@pytest.fixture
def two_workers(ray_cluster, tiny_dataset, tmp_path) -> TrainOutcome:
    return _fit(_cfg(str(tmp_path / "unbroken")), tiny_dataset)


@pytest.mark.slow
def test_fit_two_workers(two_workers, tiny_dataset):
    _check(two_workers, tiny_dataset, 8)
    assert two_workers.checkpoint_path and os.path.isdir(two_workers.checkpoint_path)


def test_fit_in_driver_num_workers_0(ray_cluster, tiny_dataset, tmp_path):
    outcome = _fit(_cfg(str(tmp_path / "lake"), num_workers=0, eval_every=2), tiny_dataset)
    _check(outcome, tiny_dataset, 8)
    assert [VALID_METRIC in h for h in outcome.history] == [False, True] * 4


@pytest.mark.parametrize("name", ["popularity", "ease"])
def test_closed_form_fit_needs_no_trainer(tiny_dataset, name):
    model = ModelArgs(name=name, ease_lambda=10.0)
    outcome = fit(tiny_dataset, model, TrainArgs())
    assert outcome.model.family == name and len(outcome.history) == 1
    assert outcome.checkpoint_path is None
    if name == "ease":
        assert outcome.best_metrics[VALID_METRIC] > _popularity_valid(tiny_dataset) + 0.1
    refit = fit(tiny_dataset, model, TrainArgs(refit=True))
    assert VALID_METRIC not in refit.last_metrics


@pytest.mark.parametrize("refit_final", [True, False])
def test_run_validates_refits_registers_and_promotes(tiny_dataset, refit_final, caplog):
    def ease(ease_lambda: float) -> AppConfig:
        return AppConfig(
            lake=tiny_dataset.lake.uri,
            data=DataArgs(name="tiny", source="synthetic"),
            model=ModelArgs(name="ease", ease_lambda=ease_lambda),
            train=TrainArgs(refit_final=refit_final, promote_to="production"),
        )

    record = run(ease(10.0), tiny_dataset)
    assert record.metrics[VALID_METRIC] > _popularity_valid(tiny_dataset) + 0.1
    assert record.metrics["best_epoch"] == 1
    assert record.metrics["fit_on"] == ("train+valid" if refit_final else "train")
    assert record.config["train"]["refit"] is refit_final
    assert [h["epoch"] for h in record.lineage["history"]] == [1]
    assert aliases(tiny_dataset.lake, "tiny-ease")["production"] == record.version
    # A worse model is registered, but the production gate refuses it: a warning, not an error.
    worse = run(ease(1e-3), tiny_dataset)
    assert worse.metrics[VALID_METRIC] < record.metrics[VALID_METRIC]
    assert list_versions(tiny_dataset.lake, "tiny-ease")[-1] == worse.version
    assert aliases(tiny_dataset.lake, "tiny-ease")["production"] == record.version
    assert "refusing to promote" in caplog.text


@pytest.mark.slow
def test_resume_after_worker_failure(two_workers, tiny_dataset, tmp_path, monkeypatch):
    marker = tmp_path / "failed-once"
    monkeypatch.setenv(FAIL_AT_EPOCH_ENV, "4")
    monkeypatch.setenv(FAIL_MARKER_ENV, str(marker))
    outcome = _fit(_cfg(str(tmp_path / "lake"), max_failures=1), tiny_dataset)
    assert marker.exists()  # the run really died once
    _check(outcome, tiny_dataset, 8)
    # One restart from a checkpoint taken before epoch 4 (the controller may not have registered
    # epoch 3's report when the worker died, so the resume point is epoch 2 or 3), not from scratch.
    restarts = [h["restarts"] for h in outcome.history]
    assert restarts[0] == 0 and restarts[-1] == 1 and restarts == sorted(restarts)
    assert 2 <= restarts.count(0) <= 3
    # Resuming loses nothing: the weights and Adam moments come back, so the run ends where an
    # unbroken one does (up to the run-to-run noise of Ray Data's block order).
    resumed, unbroken = outcome.last_metrics[VALID_METRIC], two_workers.last_metrics[VALID_METRIC]
    assert resumed == pytest.approx(unbroken, rel=0.05)


def test_sequence_autoencoder_trains_on_ray_train_from_time_ranked_history(
    ray_cluster, tiny_dataset, tmp_path
):
    model = ModelArgs(name="seq_ae", embed_dim=32, history_dropout=0.2, seq_cuts=8.0)
    train = TrainArgs(num_workers=1, cpus_per_worker=0.5, epochs=15, batch_size=128, lr=0.01)
    outcome = fit(tiny_dataset, model, train, runs=Lake(str(tmp_path / "runs")))
    assert isinstance(outcome.model, SequenceAutoencoder)
    # Workers run at normal priority, and the shard read is timed apart from epoch 1's steps.
    assert {h["worker_nice"] for h in outcome.history} == {0}
    assert outcome.history[0]["shard_load_s"] >= 0
    assert all("shard_load_s" not in h for h in outcome.history[1:])
    assert outcome.best_metrics[VALID_METRIC] > _popularity_valid(tiny_dataset) + 0.1
    # The reported metric is the model scored on its own (time-ranked) history.
    history = outcome.model.history(tiny_dataset, "train")
    assert history.data.max() > 1  # ranks, not a binary matrix
    again = evaluate(
        lambda u: outcome.model.score(u, history[u]), history, tiny_dataset.csr("valid")
    )["ndcg@10"]
    assert again == pytest.approx(outcome.last_metrics[VALID_METRIC], abs=1e-9)
