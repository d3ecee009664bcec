"""Serving stage: a Ray Serve application over the model registry (``app.serve:build_app``).

Run with ``python -m jobs.serve --config serve_configs/local.yaml`` or
``serve run serve_configs/local.yaml``. Importing this package never starts Ray or Serve.
"""

from app.serve.app import Ingress, api, build_app, build_application
from app.serve.args import ServeAppArgs
from app.serve.cache import TTLCache
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
    "ServingPointer",
    "TTLCache",
    "api",
    "build_app",
    "build_application",
    "load_catalogue",
    "rerank",
    "top_k_dot",
]
