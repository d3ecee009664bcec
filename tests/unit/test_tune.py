from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from app import tune
from app.config import (
    AppConfig,
    ConfigError,
    DataArgs,
    ModelArgs,
    TrainArgs,
    TuneArgs,
    config_to_yaml,
)
from app.store import Lake, aliases, get_record
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


def _per_epoch(cfg: AppConfig, ds) -> dict[str, list]:
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(tune.experiment(cfg, ds).path())
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
    record = tune.run(cfg, tiny_dataset, searcher="optuna")

    epochs = _per_epoch(cfg, tiny_dataset)
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
    assert aliases(lake, "tiny-mf")["staging"] == record.version
    assert "done" in tune.format_trials(search["trials"])


@pytest.mark.slow
def test_failing_trial_does_not_sink_the_search(ray_cluster, tiny_dataset):
    # A grid over lr with one invalid value: that trial fails validation, the other one wins.
    cfg = _cfg(tiny_dataset.lake.uri, {"train.lr": {"grid": [0.03, -1.0]}}, num_samples=1)
    cfg = cfg.model_copy(update={"tune": cfg.tune.model_copy(update={"max_epochs": 1})})
    record = tune.run(cfg, tiny_dataset, searcher="random")
    trials = record.lineage["tune"]["trials"]
    assert sorted(t["status"] for t in trials) == ["done", "error"]
    failed = next(t for t in trials if t["status"] == "error")
    assert failed["params"]["train.lr"] == -1.0
    assert failed["error"].startswith("ValidationError: train.lr: Input should be greater than 0")
    assert record.metrics["tune_errored_trials"] == 1
    assert record.config["train"]["lr"] == 0.03


# --- driver crash and resume: jobs.tune as a subprocess with its own local Ray cluster ---
REPO = Path(__file__).resolve().parents[2]
TERMINATED = "TERMINATED"


def _trial_states(experiment: str) -> dict[str, str]:
    """Trial id → status in the newest experiment state Tune has synced to storage."""
    states = sorted(glob.glob(os.path.join(experiment, "experiment_state-*.json")))
    if not states:
        return {}
    try:
        with open(states[-1]) as f:
            trial_data = json.load(f)["trial_data"]
    except (OSError, ValueError, KeyError):  # mid-write: read it on the next poll
        return {}
    trials = [json.loads(state) for state, _ in trial_data]
    return {t["trial_id"]: t["status"] for t in trials}


def _results(experiment: str, trial_ids: set[str]) -> dict[str, bytes]:
    """Each trial's ``result.json`` (its per-epoch reports as Tune logged them)."""
    found = {}
    for path in glob.glob(os.path.join(experiment, "*", "result.json")):
        trial_id = next(
            (t for t in trial_ids if t in os.path.basename(os.path.dirname(path))), None
        )
        if trial_id is not None:
            found[trial_id] = Path(path).read_bytes()
    return found


class _Driver:
    """``python -m jobs.tune`` in its own session, with a private Ray temp dir.

    The driver starts a local Ray cluster whose processes live in the driver's process group;
    ``kill`` ends the group and any straggler that carries this driver's ``RAY_TMPDIR``, so a
    SIGKILLed driver leaks no raylet, GCS or worker into other tests.
    """

    def __init__(self, args: list[str], log_path: Path) -> None:
        self.ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: socket path limits
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(RAY_TMPDIR=self.ray_tmp, RAY_DATA_DISABLE_PROGRESS_BARS="1")
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "jobs.tune", *args],
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def _stragglers(self) -> list[int]:
        marker = f"RAY_TMPDIR={self.ray_tmp}".encode()
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if marker in f.read().split(b"\0"):
                        pids.append(int(entry))
            except OSError:  # gone, or not ours
                continue
        return pids

    def kill(self) -> None:
        """SIGKILL the driver's process group, then any process left from its Ray cluster."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while (pids := self._stragglers()) and time.monotonic() < deadline:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.5)
        assert not self._stragglers(), "Ray processes of the killed driver survived"
        shutil.rmtree(self.ray_tmp, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # two driver start-ups and three Train runs on 2 cores
def test_search_resumes_after_driver_crash(tiny_dataset, tmp_path):
    num_samples = 3
    cfg = _cfg(tiny_dataset.lake.uri, {"train.lr": {"low": 0.01, "high": 0.05, "log": True}})
    # Two trials at a time: the crash lands with one or two finished and one not started.
    search = {"num_samples": num_samples, "searcher": "random", "max_concurrent_trials": 2}
    cfg = cfg.model_copy(
        update={
            "tune": cfg.tune.model_copy(update=search),
            "cluster": cfg.cluster.model_copy(update={"num_cpus": 4, "progress_bars": False}),
        }
    )
    config = tmp_path / "tune.yaml"
    config.write_text(config_to_yaml(cfg))
    args = ["--config", str(config), f"lake={cfg.lake}"]
    experiment = tune.experiment(cfg, tiny_dataset).path()

    # 1. Run the search and SIGKILL its driver once a finished trial is in the synced state.
    first = _Driver(args, tmp_path / "first.log")
    try:
        deadline = time.monotonic() + 600
        while not any(s == TERMINATED for s in _trial_states(experiment).values()):
            assert first.proc.poll() is None, f"driver exited early:\n{first.log_tail()}"
            assert time.monotonic() < deadline, f"no finished trial in 600 s:\n{first.log_tail()}"
            time.sleep(1.0)
    finally:
        first.kill()
    before = _trial_states(experiment)
    finished = {t for t, s in before.items() if s == TERMINATED}
    assert 1 <= len(finished) < num_samples, before  # the crash interrupted the search
    results_before = _results(experiment, finished)
    assert set(results_before) == finished

    # 2. The same command with tune.resume=true completes the search and registers the best.
    second = _Driver([*args, "tune.resume=true"], tmp_path / "second.log")
    try:
        assert second.proc.wait(timeout=900) == 0, second.log_tail()
    finally:
        second.kill()
    output = second.log_path.read_text()
    assert f"resuming the search at {experiment}" in output

    after = _trial_states(experiment)
    assert len(after) == num_samples and set(after.values()) == {TERMINATED}, after
    assert finished <= set(after)  # the same trials, not a new search
    # Finished trials were not rerun: their logged reports are byte for byte those before.
    assert _results(experiment, finished) == results_before

    record = get_record(Lake(cfg.lake), "tiny-mf", "staging")
    assert f"registered tiny-mf version {record.version}" in output
    search = record.lineage["tune"]
    assert {t["trial_id"] for t in search["trials"]} == set(after)
    assert record.metrics["tune_trials"] == num_samples
    assert record.metrics["tune_errored_trials"] == 0


def test_null_drops_a_default_dimension():
    space = tune.build_search_space({"model.name": ["edlae"], "train.lr": None, "model.l2": None})
    assert "train.lr" not in space and "model.l2" not in space and "model.loss" in space

    def cpus(base: str, config: dict) -> float:
        return float(tune.trial_resources(base, config).required_resources["CPU"])

    assert cpus("mf", {"model.name": "edlae"}) == 1.0
    assert cpus("edlae", {"train.lr": 0.1}) == 1.0
    assert cpus("edlae", {"model.name": "mf"}) < 0.1


@pytest.mark.slow
def test_closed_form_trials_fit_in_the_trial_and_win_on_validation(ray_cluster, tiny_dataset):
    """EDLAE trials: one fit and one report each; the best is refit and registered."""
    lake = Lake(tiny_dataset.lake.uri)
    space = {k: None for k in tune.DEFAULT_SEARCH_SPACE} | {
        "model.name": ["edlae"],
        "model.edlae_lambda": {"grid": [1.0, 1000.0]},
        "model.recency_tau": 5.0,
    }
    cfg = _cfg(lake.uri, {}, num_samples=1)
    cfg = cfg.model_copy(update={"tune": cfg.tune.model_copy(update={"search_space": space})})
    record = tune.run(cfg, tiny_dataset, searcher="random")
    trials = record.lineage["tune"]["trials"]
    assert len(trials) == 2 and all(t["status"] == "done" and t["epochs_run"] == 1 for t in trials)
    lambdas = {t["params"]["model.edlae_lambda"]: t["best_valid_ndcg"] for t in trials}
    best = trials[0]
    assert best["best_valid_ndcg"] == max(lambdas.values())
    assert record.config["model"]["name"] == "edlae"
    assert record.config["model"]["edlae_lambda"] == best["params"]["model.edlae_lambda"]
    assert record.config["train"]["refit"] is True
    assert aliases(lake, "tiny-edlae")["staging"] == record.version
