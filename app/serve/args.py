"""Typed arguments of the Serve application (the ``args:`` block of ``serve_configs/*.yaml``).

``ServeAppArgs`` extends ``app.config.ServeArgs`` with what only the serving stage needs (where
the lake is, which registry name to serve, ranking and input limits), so one pydantic model is
the single typed source for ``serve run``, ``serve deploy``, ``jobs.serve`` and the tests.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from app.config import AppConfig, OutputPath, ServeArgs
from app.registry import registry_name

RUNTIME: dict[str, Any] = {"max_body_bytes": 256 * 1024, "metrics": None}
"""Settings of the ingress replica in this process, read by its ASGI guard (body limit, metrics)."""


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
    replica. Fastest on one machine (see bench/serve.py); keep the deployment graph where
    retrieval must scale apart from HTTP handling or the table is large."""
    warm_cache: bool = False
    """Fill the answer cache at start and on reload from ``<lake>/predictions/<served version>/``
    (``python -m jobs.batch_predict``), when they exist and no ranker rule is set."""
    pointer_poll_s: float = Field(1.0, gt=0.0)
    """How often replicas re-read the serving pointer / event log on a remote (S3) lake."""

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
        return cls.model_validate({**base, "lake": cfg.lake, "name": registry_name(cfg), **extra})
