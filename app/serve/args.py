"""Settings of the Serve application and the one order in which their sources apply.

``ServeAppArgs`` is the ``args:`` block of ``serve_configs/*.yaml``: it extends
``app.config.ServeArgs`` (the ``serve`` section of a pipeline config) with what only the serving
stage needs (where the lake is, which registry name to serve, ranking and input limits), so one
pydantic model is the typed source for ``serve run``, ``serve deploy``, ``jobs.serve``, the
pipeline and the tests. ``ServeRun`` is a whole Serve config file, resolved by
``resolve_settings``: the only place that decides which source wins.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, model_validator

from app.config import AppConfig, ConfigError, OutputPath, ServeArgs, parse_overrides
from app.serve.auth import AuthArgs
from app.serve.haproxy import with_launcher
from app.store import Lake, registry_name

LISTEN_KEYS = ("host", "port")
"""Settings that say where Serve listens: they also live in a Serve config's ``http_options``."""

PIPELINE_KEYS = ("host", "port", "cache_size")
"""Settings of a pipeline config's ``serve`` section that override the Serve config it deploys."""


class ServeAppArgs(ServeArgs):
    """Arguments of ``app.serve:build_app``: lake + registry name + ``ServeArgs`` + limits."""

    lake: OutputPath = Field("./lake", validate_default=True)
    """Lake root holding ``models/<name>/`` and receiving ``events/``."""
    name: str = "synthetic-mf"
    """Registry name of the served model (``<dataset>-<family>``, see ``registry_name``)."""
    max_per_genre: int = Field(0, ge=0)
    """Ranker: at most this many items of one genre per answer (0 = no diversity rule)."""
    blocked_items: list[str] = Field(default_factory=list)
    """Ranker: external item ids that are never recommended (out of stock, withdrawn ...)."""
    max_body_bytes: int = Field(256 * 1024, ge=1024)
    """Largest request body accepted; larger bodies get 413."""
    max_events: int = Field(1000, ge=1)
    """Most events in one ``POST /events`` batch."""
    max_context_items: int = Field(500, ge=0)
    """Most context or exclusion items in one ``POST /recommend``."""
    colocate_scoring: bool = False
    """Score (and rank) inside each ingress replica instead of calling the ``Retriever`` and
    ``Ranker`` deployments: no handle hop per batch, the item table loaded once per ingress
    replica. Suits one machine (compare with ``python -m bench.serve``); keep the deployment
    graph where retrieval must scale apart from HTTP handling or the table is large."""
    cache_max_bytes: int = Field(64 * 1024**2, ge=0)
    """Estimated bytes of the answers in each ingress replica's cache, on top of ``cache_size``
    (``app.serve.answers.TTLCache``; about 7 KB per answer of 10 items; 0 disables it)."""
    warm_cache: bool = False
    """Fill the answer cache at start and on reload from ``<lake>/predictions/<served version>/``
    (``python -m jobs.batch_predict``), when they exist and no ranker rule is set."""
    pointer_poll_s: float = Field(1.0, gt=0.0)
    """How often replicas re-read the serving pointer / event log on a remote (S3) lake."""
    auth: AuthArgs = Field(default_factory=AuthArgs)
    """API keys and rate limits of user-scoped routes (docs/api-keys.md)."""

    @property
    def key_file(self) -> str | None:
        """``auth.key_file``, else ``<lake>/api_keys.yaml`` on a local lake (None on S3)."""
        if self.auth.key_file is not None:
            return self.auth.key_file
        lake = Lake(self.lake)
        return lake.path("api_keys.yaml") if lake.is_local else None

    @model_validator(mode="after")
    def _k_bounds(self) -> ServeAppArgs:
        if self.default_k > self.max_k:
            raise ValueError(f"default_k ({self.default_k}) must be <= max_k ({self.max_k})")
        return self

    @property
    def ranker_active(self) -> bool:
        """Whether the Ranker changes anything (else the ingress skips that hop)."""
        return self.max_per_genre > 0 or bool(self.blocked_items)

    @classmethod
    def from_config(cls, cfg: AppConfig, **extra: object) -> ServeAppArgs:
        """Serve args of a resolved ``AppConfig``: its lake, registry name and ``serve`` section."""
        base = cfg.serve.model_dump()
        if cfg.model.version:
            base["model"] = cfg.model.version
        name = registry_name(cfg.data.name, cfg.model.name)
        return cls.model_validate({**base, "lake": cfg.lake, "name": name, **extra})


@dataclass
class ServeRun:
    """A Serve config file, resolved: app args, deployment options and HTTP options."""

    name: str
    route_prefix: str
    args: ServeAppArgs
    deployments: dict[str, dict[str, Any]]
    http_options: dict[str, Any]
    """Serve's HTTP options, ``host`` and ``port`` always set (see ``resolve_settings``)."""
    proxy_location: str = "EveryNode"
    controller_options: dict[str, Any] = field(default_factory=dict)
    """Serve's controller options (the fast path's environment), launcher path resolved."""

    @property
    def url(self) -> str:
        """Where the application answers, e.g. ``http://127.0.0.1:8000``."""
        host, port = self.http_options["host"], self.http_options["port"]
        return f"http://{host}:{port}{self.route_prefix.rstrip('/')}"


def resolve_settings(
    args: Mapping[str, Any],
    http_options: Mapping[str, Any],
    overrides: Iterable[tuple[str, Any]] = (),
) -> tuple[ServeAppArgs, dict[str, Any]]:
    """App args and HTTP options of a Serve config: the one precedence of serve settings.

    Highest first:

    1. ``overrides``: ``jobs.serve``'s ``key=value`` arguments, or what a pipeline run sets
       (``pipeline_serve_config``);
    2. for where to listen (``LISTEN_KEYS``), the Serve config's ``http_options``;
    3. the Serve config's ``args``;
    4. ``ServeAppArgs``'s defaults.

    Args:
        args: The application's ``args`` block.
        http_options: The config's ``http_options`` as written (unset keys absent).
        overrides: ``(key, value)`` pairs; an ``args.`` prefix of a key is optional.

    Returns:
        The validated app args and the HTTP options, with ``host`` and ``port`` set.

    Raises:
        ValidationError: When the merged args are invalid.
    """
    merged = dict(args)
    http = dict(http_options)
    for key, value in overrides:
        key = key.removeprefix("args.")
        merged[key] = value
        if key in LISTEN_KEYS:
            http[key] = value
    app_args = ServeAppArgs.model_validate(merged)
    http.setdefault("host", app_args.host)
    http["port"] = int(http.get("port", app_args.port))
    return app_args, http


def load_serve_config(
    path: str | Path,
    overrides: list[str] | None = None,
    values: Mapping[str, Any] | None = None,
) -> ServeRun:
    """Read and validate a Serve config file; apply overrides to its ``args``.

    Args:
        path: The Serve config (``serve_configs/*.yaml``).
        overrides: ``key=value`` strings (values read as YAML scalars).
        values: Typed overrides, applied after ``overrides``.

    Raises:
        ConfigError: naming the file and the problem.
    """
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
    pairs = [*parse_overrides(overrides or []), *(values or {}).items()]
    try:
        app_args, http = resolve_settings(
            app.args or {}, schema.http_options.model_dump(exclude_unset=True), pairs
        )
    except ValidationError as exc:
        raise ConfigError(f"{p}: invalid args: {exc}") from exc
    deployments = {
        d.name: {k: v for k, v in d.model_dump(exclude_unset=True).items() if k != "name"}
        for d in app.deployments
    }
    options = schema.controller_options
    controller = options.model_dump(exclude_unset=True) if options is not None else {}
    env = (controller.get("runtime_env") or {}).get("env_vars")
    if env:
        controller["runtime_env"]["env_vars"] = with_launcher(env)
    proxy = getattr(schema.proxy_location, "value", schema.proxy_location) or "EveryNode"
    return ServeRun(
        app.name, app.route_prefix or "/", app_args, deployments, http, str(proxy), controller
    )


def pipeline_serve_config(serve: ServeArgs, lake: Lake | str, name: str, version: str) -> ServeRun:
    """The Serve config a pipeline run deploys (``serve.config``), with what the run decides.

    The run's lake, the registry name and version it trained, and the ``PIPELINE_KEYS`` of
    its ``serve`` section override the file (``resolve_settings``).

    Args:
        serve: The pipeline config's ``serve`` section.
        lake: The run's lake.
        name: Registry name of the trained model.
        version: The version to serve.
    """
    uri = lake.uri if isinstance(lake, Lake) else lake
    values: dict[str, Any] = {"lake": uri, "name": name, "model": version}
    values.update({key: getattr(serve, key) for key in PIPELINE_KEYS})
    return load_serve_config(serve.config, values=values)
