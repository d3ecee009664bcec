"""Building the Serve application graph and running it from a Serve config file.

``build_app`` is the builder that Serve imports by dotted path (``import_path:
app.serve.deploy:build_app`` in ``serve_configs/*.yaml``); ``run`` is what ``python -m
jobs.serve`` and the pipeline call with a resolved ``ServeRun`` (``app.serve.args``), applying
its deployment options exactly as ``serve run <file>`` would.
"""

# No ``from __future__ import annotations`` here: Serve validates ``args`` against the builder's
# annotation only when it is a class, not a string.

import json
import os
import time
import urllib.request
from pathlib import Path
from typing import Any

from ray.serve import Application

from app import cluster
from app.serve.args import ServeAppArgs, ServeRun
from app.serve.auth import ApiKey, KeyFileError, add_key, hash_key, load_keys, read_key_file
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
    ensure_demo_key(args)  # `serve run local.yaml` on a fresh lake answers with the saved key
    keys = {"keys": api_keys(args)}  # hashes only, read here: replicas need no key file
    if args.colocate_scoring:  # one deployment: the ingress scores and ranks itself
        return Ingress.options(**opts.get("Ingress", {})).bind(*ingress_args, **keys)
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
    return Ingress.options(**opts.get("Ingress", {})).bind(*ingress_args, retriever, ranker, **keys)


def api_keys(args: ServeAppArgs) -> list[ApiKey]:
    """The keys the app accepts: ``$<auth.keys_env>``, then the key file (``args.key_file``).

    Raises:
        KeyFileError: When auth is required and there is no key, or a key source is invalid.
    """
    if not args.auth.required:
        return []
    path = args.key_file
    explicit = args.auth.key_file is not None  # a named file must exist; the default may not
    ring = load_keys(
        path if explicit or (path and Path(path).is_file()) else None, args.auth.keys_env
    )
    if not ring.by_hash:
        where = f"${args.auth.keys_env}" + (f" or {path}" if path else "")
        raise KeyFileError(
            f"auth.required is true but {where} holds no API key: create one with "
            f"`python -m jobs.keys add --file {path or 'keys.yaml'} --client me "
            "--scope recommend:read --scope events:write` (docs/api-keys.md), "
            "or set args.auth.required=false for a local demo"
        )
    return list(ring.by_hash.values())


DEMO_SCOPES = ("events:write", "history:read", "recommend:read")
"""What the demo key may do: everything but ``/admin`` (the admin token guards that)."""


def ensure_demo_key(args: ServeAppArgs) -> str | None:
    """The demo API key of a local app, created on first use; else None.

    None when auth is off, on a remote lake, or where the config names its own key file (a
    demo key never joins keys someone manages).

    The key's hash goes to the key file as any key's; the key itself, which a demo must be
    able to print again, to ``demo_api_key`` beside it (mode 0600). Its rate suits a load
    test on one machine. Production keys come from ``python -m jobs.keys add`` instead.
    """
    path = args.key_file
    if not args.auth.required or args.auth.key_file is not None or path is None:
        return None
    saved = Path(path).with_name("demo_api_key")
    known = {k.sha256 for k in read_key_file(path)}
    if saved.is_file() and hash_key(key := saved.read_text().strip()) in known:
        return key
    key = add_key(path, "demo", DEMO_SCOPES, rate_per_s=100_000.0, burst=10_000)
    fd = os.open(saved, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key


def build_app(args: ServeAppArgs) -> Application:
    """Serve's typed application builder (``import_path: app.serve.deploy:build_app``)."""
    return build_application(args)


def sample_request(
    url: str,
    user_id: str,
    k: int = 5,
    timeout_s: float = 60.0,
    api_key: str | None = None,
    path: str | None = None,
) -> dict[str, Any]:
    """``GET /recommend/<user_id>`` (or ``path``) once the app answers /healthz.

    Waits up to ``timeout_s``; sends ``api_key`` as a bearer token.
    """
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
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    request = urllib.request.Request(url + (path or f"/recommend/{user_id}?k={k}"), headers=headers)
    with urllib.request.urlopen(request, timeout=30) as r:
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
        key = ensure_demo_key(run_cfg.args)
        start(run_cfg)
        lake = Lake(run_cfg.args.lake)
        ds = get_record(lake, run_cfg.args.name, run_cfg.args.model).lineage["dataset"]
        user = next(iter(load_catalogue(lake, ds["name"], ds["version"]).user_index))
        url = run_cfg.url
        if key is None and run_cfg.args.auth.required:  # keys someone manages: none to show
            answer = sample_request(url, user, api_key=None, path="/healthz")
            print(f"GET {url}/healthz (the other routes take an API key: docs/api-keys.md)")
        else:
            answer = sample_request(url, user, api_key=key)
            auth = f" -H 'Authorization: Bearer {key}'" if key else ""
            print(f"curl{auth} '{url}/recommend/{user}?k=5'")
        print(json.dumps(answer, indent=2))
        if key:
            saved = Path(str(run_cfg.args.key_file)).with_name("demo_api_key")
            print(f"demo API key (saved in {saved}): {key}")
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
