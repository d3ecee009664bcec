"""Train a recommender with Ray Train on the latest dataset version and register it.

Examples::

    python -m jobs.train --config jobs/configs/ml-latest-small.yaml lake=./lake
    ray job submit --working-dir . -- python -m jobs.train --config jobs/configs/synthetic.yaml \
        train.num_workers=4 model.name=two_tower

The last line printed is the registered model version.
"""

from __future__ import annotations

from app import cluster, train
from app.cli import config_from_cli
from app.store import Lake


def main(argv: list[str] | None = None) -> str:
    """Run the training stage; returns the registered model version."""
    cfg = config_from_cli(__doc__ or "", argv)
    cluster.connect(cfg.cluster)
    ds = train.dataset_for(Lake(cfg.lake), cfg.data, seed=cfg.seed)
    record = train.run(cfg, ds)
    print(f"registered {record.name} version {record.version} at {record.path}")
    print({k: v for k, v in record.metrics.items() if k.startswith("valid_")})
    print(record.version)
    return str(record.version)


if __name__ == "__main__":
    cluster.run_job(main)
