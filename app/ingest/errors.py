"""The two errors of the ingest stage: one for the raw source, one for its content."""

from __future__ import annotations


class SourceError(ValueError):
    """Raw data cannot be found, fetched or generated; the message says what to change."""


class IngestError(ValueError):
    """Input that cannot be ingested at all (not a per-row problem); says what to fix."""
