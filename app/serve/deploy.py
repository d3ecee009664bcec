"""Running the serving stage from a Serve config file (what ``python -m jobs.serve`` calls).

The config is a regular Serve config (``serve_configs/*.yaml``, validated by
``ServeDeploySchema``); its first application's ``args`` become a ``ServeAppArgs`` (dotted
overrides such as ``model=staging`` or ``cache_size=0`` apply to them) and its ``deployments``
become per-deployment options, exactly as ``serve run <file>`` would apply them.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from app import cluster
from app.config import ConfigError, parse_overrides
from app.serve.args import ServeAppArgs

log = logging.getLogger("scalerec.serve")


@dataclass
class ServeRun:
    """A Serve config file, resolved: app args, deployment options and HTTP options."""

    name: str
    route_prefix: str
    args: ServeAppArgs
    deployments: dict[str, dict[str, Any]]
    http_options: dict[str, Any]


def load_serve_config(path: str | Path, overrides: list[str] | None = None) -> ServeRun:
    """Read and validate a Serve config file; apply ``key=value`` overrides to its ``args``.

    Raises:
        ConfigError: naming the file and the problem.
    """
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"serve config not found: {p} (see serve_configs/)")
    try:
        schema = ServeDeploySchema.model_validate(yaml.safe_load(p.read_text()))
    except (yaml.YAMLError, ValidationError) as exc:
        raise ConfigError(f"{p}: not a valid Serve config: {exc}") from exc
    if not schema.applications:
        raise ConfigError(f"{p}: no applications")
    app = schema.applications[0]
    args = dict(app.args or {})
    http = schema.http_options.model_dump(exclude_unset=True)
    for key, value in parse_overrides(overrides or []):
        key = key.removeprefix("args.")
        args[key] = value
        if key in ("host", "port"):  # where to listen: the override wins over http_options
            http[key] = value
    try:
        app_args = ServeAppArgs.model_validate(args)
    except ValidationError as exc:
        raise ConfigError(f"{p}: invalid args: {exc}") from exc
    deployments = {
        d.name: {k: v for k, v in d.model_dump(exclude_unset=True).items() if k != "name"}
        for d in app.deployments
    }
    return ServeRun(app.name, app.route_prefix or "/", app_args, deployments, http)


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


def run(run_cfg: ServeRun, exit_after_sample: bool = False) -> dict[str, Any]:
    """Start Serve on the connected cluster, deploy the app, print a sample and keep serving."""
    from ray import serve

    from app.lake import Lake
    from app.registry import get_record
    from app.serve.app import build_application
    from app.serve.store import load_catalogue

    host = run_cfg.http_options.get("host", run_cfg.args.host)
    port = int(run_cfg.http_options.get("port", run_cfg.args.port))
    serve.start(http_options={**run_cfg.http_options, "host": host, "port": port})
    try:
        app = build_application(run_cfg.args, run_cfg.deployments)
        serve.run(app, name=run_cfg.name, route_prefix=run_cfg.route_prefix, blocking=False)
        lake = Lake(run_cfg.args.lake)
        ds = get_record(lake, run_cfg.args.name, run_cfg.args.model).lineage["dataset"]
        user = next(iter(load_catalogue(lake, ds["name"], ds["version"]).user_index))
        url = f"http://{host}:{port}{run_cfg.route_prefix.rstrip('/')}"
        answer = sample_request(url, user)
        print(f"GET {url}/recommend/{user}?k=5")
        print(json.dumps(answer, indent=2))
        if not exit_after_sample:
            print(f"serving on {url} (docs: {url}/docs); Ctrl-C stops")
            cluster.own_signals()
            while True:
                time.sleep(3600)
    finally:
        # also on Ctrl-C / SIGTERM (KeyboardInterrupt), which then reaches the job's run_job
        serve.shutdown()
    return answer
