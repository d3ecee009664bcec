"""Ingest raw interactions into a versioned lake dataset.

python -m jobs.ingest --config jobs/configs/ml-latest-small.yaml lake=./lake
ray job submit --working-dir . -- python -m jobs.ingest --config jobs/configs/synthetic.yaml
"""

from __future__ import annotations

import json

from app import cluster, ingest
from app.cli import config_from_cli
from app.store import MANIFEST, Lake


def main(argv: list[str] | None = None) -> str:
    """Run the ingest stage and print the manifest; the last line is the manifest path."""
    cfg = config_from_cli(__doc__ or "", argv)
    cluster.connect(cfg.cluster)
    ds = ingest.run(cfg.data, Lake(cfg.lake), seed=cfg.seed, events=cfg.serve.events)
    print(json.dumps(ds.manifest, indent=2, sort_keys=True))
    print(ingest.summary_table(ds.manifest))
    manifest_path = ds.lake.full_uri(ds.rel, MANIFEST)
    print(manifest_path)
    return manifest_path


if __name__ == "__main__":
    cluster.run_job(main)
