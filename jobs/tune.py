"""Search hyperparameters with Ray Tune (trials are Ray Train runs), refit the best and register it.

Examples::

    python -m jobs.tune --config jobs/configs/synthetic.yaml tune.num_samples=8
    ray job submit --working-dir . -- python -m jobs.tune --config jobs/configs/ml-latest-small.yaml

The last line printed is the registered model version (promoted to ``staging``).
"""

from __future__ import annotations

from app import cluster, train, tune
from app.cli import config_from_cli
from app.store import Lake


def main(argv: list[str] | None = None) -> str:
    """Run the tuning stage; returns the registered model version."""
    cfg = config_from_cli(__doc__ or "", argv)
    cluster.connect(cfg.cluster)
    ds = train.dataset_for(Lake(cfg.lake), cfg.data, seed=cfg.seed)
    record = tune.run(cfg, ds)
    search = record.lineage["tune"]
    print(tune.format_trials(search["trials"]))
    print(f"search wall time {search['wall_s']:.1f} s; best trial {search['best_trial']}")
    print(f"registered {record.name} version {record.version} at {record.path}")
    print(record.version)
    return str(record.version)


if __name__ == "__main__":
    cluster.run_job(main)
