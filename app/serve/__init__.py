"""Serving stage: a Ray Serve application over the model registry.

Run with ``python -m jobs.serve --config serve_configs/local.yaml`` or
``serve run serve_configs/local.yaml`` (``import_path: app.serve.deploy:build_app``). Importing
this package never starts Ray or Serve.

Modules: ``args`` (settings and their precedence), ``deploy`` (builder, run), ``ingress`` (HTTP
routes), ``http`` (request/response models, ASGI guard), ``admin`` (admin token),
``answers`` (cache keys, cached answers), ``scoring`` (what to score, where), ``retriever`` and
``ranker`` (the scoring deployments), ``store`` (catalogue, event log, serving pointer),
``cache``, ``coalesce``, ``ann``, ``metrics``.
"""

from app.serve.answers import TTLCache
from app.serve.args import (
    ServeAppArgs,
    ServeRun,
    load_serve_config,
    pipeline_serve_config,
    resolve_settings,
)
from app.serve.deploy import build_app, build_application, run
from app.serve.ingress import Ingress, api
from app.serve.ranker import Ranker, rerank
from app.serve.retriever import Candidates, Query, Retriever, top_k_dot
from app.serve.store import Catalogue, EventLog, ServingPointer, load_catalogue

__all__ = [
    "Candidates",
    "Catalogue",
    "EventLog",
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
