"""Ingest: raw interaction sources -> a validated, deduplicated, split and indexed dataset version.

``run(data, lake)`` is the stage (``python -m jobs.ingest``); ``resolve_source`` finds the raw
files (files, MovieLens, synthetic, or a version + its live events: ``app.ingest.events_source``);
``summary_table`` prints a manifest's row accounting. The pipeline's passes are described in
``app.ingest.pipeline``.
"""

from app.ingest.errors import IngestError, SourceError
from app.ingest.manifest import summary_table
from app.ingest.pipeline import IngestProfile, run
from app.ingest.sources import RawSource, resolve_source
from app.ingest.split import dedupe_and_split, item_order_key
from app.ingest.synthetic import SYNTHETIC_COLUMNS, generate_synthetic
from app.ingest.values import as_binary

__all__ = [
    "SYNTHETIC_COLUMNS",
    "IngestError",
    "IngestProfile",
    "RawSource",
    "SourceError",
    "as_binary",
    "dedupe_and_split",
    "generate_synthetic",
    "item_order_key",
    "resolve_source",
    "run",
    "summary_table",
]
