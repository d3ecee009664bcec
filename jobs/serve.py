"""Serve the registry's model over HTTP with Ray Serve (FastAPI ingress, /docs for the API).

python -m jobs.serve --config serve_configs/local.yaml [model=staging cache_size=0 ...]
python -m jobs.serve --config serve_configs/local.yaml --exit-after-sample   # scripts / CI
"""

from __future__ import annotations

import argparse
import logging
import sys

from app import cluster
from app.config import ClusterArgs, ConfigError
from app.serve import load_serve_config, run


def main(argv: list[str] | None = None) -> dict:
    """Deploy the app, print one sample answer, then serve until Ctrl-C (or exit)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--config", required=True, help="Serve config, e.g. serve_configs/local.yaml"
    )
    parser.add_argument("--exit-after-sample", action="store_true", help="stop after the sample")
    parser.add_argument("overrides", nargs="*", help="app args overrides, e.g. model=staging")
    ns = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        cfg = load_serve_config(ns.config, ns.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    logging.getLogger("scalerec").info("serve args: %s", cfg.args.model_dump_json())
    cluster.connect(ClusterArgs(progress_bars=False))
    return run(cfg, exit_after_sample=ns.exit_after_sample)


if __name__ == "__main__":
    cluster.run_job(main)
