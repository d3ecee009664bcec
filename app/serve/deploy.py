"""Building the Serve application graph and running it from a Serve config file.

``build_app`` is the builder that Serve imports by dotted path (``import_path:
app.serve.deploy:build_app`` in ``serve_configs/*.yaml``); ``run`` is what ``python -m
jobs.serve`` and the pipeline call with a resolved ``ServeRun`` (``app.serve.args``), applying
its deployment options exactly as ``serve run <file>`` would.
"""

# No ``from __future__ import annotations`` here: Serve validates ``args`` against the builder's
# annotation only when it is a class, not a string.

import json
import time
import urllib.request
from typing import Any

from ray.serve import Application

from app import cluster
from app.serve.args import ServeAppArgs, ServeRun
from app.serve.http import admin_token_sha256
from app.serve.ingress import Ingress
from app.serve.ranker import Ranker
from app.serve.retriever import Retriever, ScoringOptions
from app.serve.store import load_catalogue
from app.store import Lake, get_record, resolve


def build_application(
    args: ServeAppArgs | dict[str, Any], deployments: dict[str, dict[str, Any]] | None = None
) -> Application:
    """The ScaleRec application graph, with optional per-deployment option overrides.

    Args:
        args: Application arguments.
        deployments: ``{"Retriever": {"autoscaling_config": ...}, ...}`` as in a Serve config's
            ``deployments:`` list (``jobs.serve`` passes the YAML's).
    """
    if not isinstance(args, ServeAppArgs):
        args = ServeAppArgs.model_validate(args)
    lake = Lake(args.lake)
    version = resolve(lake, args.name, args.model)
    opts = deployments or {}
    ingress_args = (
        args.model_dump(mode="json"),
        version,
        admin_token_sha256(args.admin_token_env),
    )
    if args.colocate_scoring:  # one deployment: the ingress scores and ranks itself
        return Ingress.options(**opts.get("Ingress", {})).bind(*ingress_args)
    retriever = Retriever.options(**opts.get("Retriever", {})).bind(
        args.lake,
        args.name,
        version,
        args.max_batch_size,
        args.batch_wait_timeout_s,
        ScoringOptions.of(args),
    )
    ranker = Ranker.options(**opts.get("Ranker", {})).bind(
        lake, args.name, args.max_per_genre, list(args.blocked_items)
    )
    return Ingress.options(**opts.get("Ingress", {})).bind(*ingress_args, retriever, ranker)


def build_app(args: ServeAppArgs) -> Application:
    """Serve's typed application builder (``import_path: app.serve.deploy:build_app``)."""
    return build_application(args)


def sample_request(url: str, user_id: str, k: int = 5, timeout_s: float = 60.0) -> dict[str, Any]:
    """``GET /recommend/<user_id>`` once the app answers /healthz (waits up to ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=5) as r:
                if r.status == 200:
                    break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    with urllib.request.urlopen(f"{url}/recommend/{user_id}?k={k}", timeout=30) as r:
        answer: dict[str, Any] = json.loads(r.read())
    return answer


def start(run_cfg: ServeRun) -> str:
    """Start Serve as the config says (HTTP, proxies, controller environment), deploy the app.

    Returns the application's URL; it answers once its replicas are up.
    """
    from ray import serve

    serve.start(
        http_options=run_cfg.http_options,
        controller_options=run_cfg.controller_options or None,
        proxy_location=run_cfg.proxy_location,
    )
    app = build_application(run_cfg.args, run_cfg.deployments)
    serve.run(app, name=run_cfg.name, route_prefix=run_cfg.route_prefix, blocking=False)
    return run_cfg.url


def run(run_cfg: ServeRun, exit_after_sample: bool = False) -> dict[str, Any]:
    """Start Serve on the connected cluster, deploy the app, print a sample and keep serving."""
    from ray import serve

    try:
        start(run_cfg)
        lake = Lake(run_cfg.args.lake)
        ds = get_record(lake, run_cfg.args.name, run_cfg.args.model).lineage["dataset"]
        user = next(iter(load_catalogue(lake, ds["name"], ds["version"]).user_index))
        url = run_cfg.url
        answer = sample_request(url, user)
        print(f"GET {url}/recommend/{user}?k=5")
        print(json.dumps(answer, indent=2))
        if not exit_after_sample:
            print(f"serving on {url} (docs: {url}/docs); Ctrl-C stops")
            cluster.own_signals()
            while True:
                time.sleep(3600)
    finally:
        # also on Ctrl-C / SIGTERM (KeyboardInterrupt), which then reaches the job's run_job;
        # bounded, because a SIGTERM to the process group may have stopped the controller
        cluster.bounded(serve.shutdown, timeout_s=10.0, what="serve shutdown")
    return answer
