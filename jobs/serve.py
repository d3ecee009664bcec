"""Serve the registry's model over HTTP with Ray Serve (FastAPI ingress, /docs for the API).

python -m jobs.serve --config serve_configs/local.yaml [model=staging cache_size=0 ...]
python -m jobs.serve --config serve_configs/local.yaml --exit-after-sample   # scripts / CI
"""

from __future__ import annotations

import logging

from app import cluster
from app.cli import exit_on_config_error, job_parser, setup_logging
from app.config import ClusterArgs
from app.serve import load_serve_config, run


def main(argv: list[str] | None = None) -> dict:
    """Deploy the app, print one sample answer, then serve until Ctrl-C (or exit)."""
    parser = job_parser(__doc__ or "", "serve_configs/local.yaml")
    parser.add_argument("--exit-after-sample", action="store_true", help="stop after the sample")
    ns = parser.parse_args(argv)
    setup_logging()
    cfg = exit_on_config_error(lambda: load_serve_config(ns.config, ns.overrides))
    logging.getLogger("scalerec").info("serve args: %s", cfg.args.model_dump_json())
    cluster.connect(ClusterArgs(progress_bars=False))
    return run(cfg, exit_after_sample=ns.exit_after_sample)


if __name__ == "__main__":
    cluster.run_job(main)
