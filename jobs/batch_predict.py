"""Batch-predict the top K for every user with a registered model (Ray Data actor pool).

python -m jobs.batch_predict --config jobs/configs/ml-latest-small.yaml model=production
ray job submit --working-dir . -- python -m jobs.batch_predict --config jobs/configs/synthetic.yaml
"""

from __future__ import annotations

from app import cluster, predict
from app.config import config_from_cli


def main(argv: list[str] | None = None) -> str:
    """Run the batch prediction stage; the last line printed is the predictions folder."""
    cfg = config_from_cli(__doc__ or "", argv)
    cluster.connect(cfg.cluster)
    path = predict.run(cfg)
    print(path)
    return path


if __name__ == "__main__":
    cluster.run_job(main)
