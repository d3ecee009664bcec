"""Evaluate a registered model on its dataset's test split (full ranking, docs/design.md).

Examples::

    python -m jobs.evaluate --config jobs/configs/ml-latest-small.yaml model=production
    python -m jobs.evaluate --config jobs/configs/ml-latest-small.yaml model=20261128T1600-ab12cd34

Writes the metrics into ``<lake>/models/<name>/<version>/metrics.json`` and prints a table.
"""

from __future__ import annotations

from app import cluster, evaluate
from app.cli import config_from_cli
from app.store import Lake, registry_name


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the evaluation stage for ``model=<version|alias>`` (default: latest)."""
    cfg = config_from_cli(__doc__ or "", argv)
    cluster.connect(cfg.cluster)
    ref = cfg.model.version or "latest"
    metrics = evaluate.run(Lake(cfg.lake), registry_name(cfg.data.name, cfg.model.name), ref)
    print(evaluate.metrics_table([{"model": f"{cfg.model.name} ({ref})", **metrics}]))
    return metrics


if __name__ == "__main__":
    cluster.run_job(main)
