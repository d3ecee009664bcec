"""Shared helpers of the ingest unit tests: the MovieLens-style reader spec."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pytest

from app.ingest.readers import csv_batches

SPEC: dict[str, Any] = {
    "user": "userId",
    "item": "movieId",
    "timestamp": "timestamp",
    "rating": "rating",
    "weight": None,
    "event": None,
    "event_weights": {},
    "timestamp_unit": "s",
    "delimiter": ",",
    "encoding": "utf-8",
}


@pytest.fixture
def spec() -> dict[str, Any]:
    """The reader spec of a MovieLens-style ``ratings.csv``."""
    return dict(SPEC)


@pytest.fixture
def read_csv():
    """Read a CSV file with ``SPEC`` (plus overrides) into one normalised table, or None."""

    def read(path, **spec):
        tables = list(csv_batches(str(path), {**SPEC, **spec}))
        return pa.concat_tables(tables) if tables else None

    return read
