"""The whole ScaleRec pipeline on one Ray cluster (what `make run` runs).

Run: python -m jobs.pipeline --config jobs/configs/synthetic.yaml
"""

from __future__ import annotations

from app import cluster, data
from app.config import config_from_cli


def main(argv: list[str] | None = None) -> None:
    """Ingest, then every later stage that exists, printing a summary of each."""
    cfg = config_from_cli(__doc__ or "", argv)
    cluster.connect(cfg.cluster)
    ds = data.run(cfg.data, cfg.lake, seed=cfg.seed)
    print(data.summary_table(ds.manifest))
    print(ds.lake.full_uri(ds.rel, "manifest.json"))


if __name__ == "__main__":
    main()
