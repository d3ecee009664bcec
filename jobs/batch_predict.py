"""Batch-predict the top K for every user with a registered model (Ray Data actor pool).

python -m jobs.batch_predict --config jobs/configs/ml-latest-small.yaml model=production
ray job submit --working-dir . -- python -m jobs.batch_predict --config jobs/configs/synthetic.yaml
"""

from __future__ import annotations

from app import cluster, predict
from app.cli import config_from_cli
from app.store import Lake, registry_name


def main(argv: list[str] | None = None) -> str:
    """Run the batch prediction stage; the last line printed is the predictions folder."""
    cfg = config_from_cli(__doc__ or "", argv)
    cluster.connect(cfg.cluster)
    name = registry_name(cfg.data.name, cfg.model.name)
    path = predict.run(Lake(cfg.lake), name, cfg.model.version, k=cfg.serve.default_k)
    print(path)
    return path


if __name__ == "__main__":
    cluster.run_job(main)
