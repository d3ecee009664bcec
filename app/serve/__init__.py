"""Serving stage: a Ray Serve application over the model registry.

Run with ``python -m jobs.serve --config serve_configs/local.yaml`` or
``serve run serve_configs/local.yaml`` (``import_path: app.serve.deploy:build_app``). Importing
this package never starts Ray or Serve.

Modules: ``args`` (settings and their precedence), ``deploy`` (builder, run), ``ingress`` (HTTP
routes), ``http`` (request/response models, ASGI guard, admin token), ``answers`` (cache,
cache keys, cached answers), ``scoring`` (what to score, where), ``retriever`` and ``ranker``
(the scoring deployments), ``store`` (catalogue, event log, serving pointer), ``haproxy``
(the fast path's HAProxy launcher), ``coalesce``, ``ann``, ``metrics``.
"""

import importlib
from typing import Any

# Exports load on first use, so that a light module of this package (the HAProxy launcher,
# started once per HAProxy reload) does not import Ray Serve and torch first.
_EXPORTS = {
    "TTLCache": "answers",
    "ServeAppArgs": "args",
    "ServeRun": "args",
    "load_serve_config": "args",
    "pipeline_serve_config": "args",
    "resolve_settings": "args",
    "build_app": "deploy",
    "build_application": "deploy",
    "run": "deploy",
    "Ingress": "ingress",
    "api": "ingress",
    "Ranker": "ranker",
    "rerank": "ranker",
    "Candidates": "retriever",
    "Query": "retriever",
    "Retriever": "retriever",
    "top_k_dot": "retriever",
    "Catalogue": "store",
    "ServingPointer": "store",
    "load_catalogue": "store",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'app.serve' has no attribute {name!r}")
    return getattr(importlib.import_module(f"app.serve.{module}"), name)


__all__ = [
    "Candidates",
    "Catalogue",
    "Ingress",
    "Query",
    "Ranker",
    "Retriever",
    "ServeAppArgs",
    "ServeRun",
    "ServingPointer",
    "TTLCache",
    "api",
    "build_app",
    "build_application",
    "load_catalogue",
    "load_serve_config",
    "pipeline_serve_config",
    "rerank",
    "resolve_settings",
    "run",
    "top_k_dot",
]
