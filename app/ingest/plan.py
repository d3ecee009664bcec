"""The ingest plan, made by the driver before any Ray work: pass-1 read units and bucket count.

Parquet files are cut into units of consecutive row groups (from their footers); CSV and
JSON-lines files are one unit each. The number of buckets B is the CPU count times
ceil(N / (CPUs x ``BUCKET_ROWS``)), so that a pass-2 bucket holds about ``BUCKET_ROWS`` rows
whatever the N input rows (N is estimated from the file sizes for text formats). The passes are
described in ``app.ingest.pipeline``.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from app.ingest.buckets import parquet_row_groups
from app.ingest.sources import RawSource
from app.store import filesystem_for

log = logging.getLogger(__name__)

# Rows of a pass-2 bucket: its task's memory (about 150 bytes a row at the peak) does not grow
# with the data, only the number of buckets does.
BUCKET_ROWS = 1_250_000
_MAX_BUCKETS = 4096
# Rows of a Parquet pass-1 unit: at least a few units per CPU, few tasks on large inputs (each
# writes one file per bucket).
_UNIT_ROWS = (100_000, 2_000_000)
# Rows per input byte for sizing text formats when the sample says nothing (empty first file).
_TEXT_BYTES_PER_ROW = 32
_SAMPLE_BYTES = 1 << 20


def make_plan(
    src: RawSource, spec: dict[str, Any], prints: list[dict[str, Any]], cpus: int
) -> tuple[list[dict[str, Any]], int]:
    """Pass-1 units and the number of buckets: ``(units, B)``."""
    if src.format == "parquet":
        groups = [
            parquet_row_groups(p, spec) if fp.get("size") else None
            for p, fp in zip(src.paths, prints, strict=True)
        ]
        rows = sum(sum(g) for g in groups if g)
        lo, hi = _UNIT_ROWS
        target = min(hi, max(lo, math.ceil(rows / (4 * cpus))))
        units = parquet_units(groups, target)
    else:
        # CSV and JSON lines are read from the start: one unit per file (empty ones too, so
        # that their rows are counted by a read task like any other).
        units = [{"file": i, "first": True} for i in range(len(src.paths))]
        rows = estimate_text_rows(src, spec, prints)
    for i, unit in enumerate(units):
        unit["unit"] = i
    per_round = cpus * BUCKET_ROWS
    n_buckets = min(_MAX_BUCKETS, cpus * max(1, math.ceil(rows / per_round)))
    log.info("plan: %d read unit(s), %d bucket(s), about %d rows", len(units), n_buckets, rows)
    return units, n_buckets


def parquet_units(groups: list[list[int] | None], target: int) -> list[dict[str, Any]]:
    """Cut each file's row groups into runs of about ``target`` rows (one row group at least).

    A file of zero bytes (warned about by ``check_headers``) gets no unit and counts 0 rows; a
    Parquet file without row groups gets one empty unit, so that its rows are counted.
    """
    units: list[dict[str, Any]] = []
    for f, sizes in enumerate(groups):
        if sizes is None:
            continue
        start, offset, run, run_rows = 0, 0, [], 0
        for g, n in enumerate(sizes):
            run.append(g)
            run_rows += n
            if run_rows >= target or g == len(sizes) - 1:
                units.append({"file": f, "row_groups": run, "offset": offset, "first": start == 0})
                start += 1
                offset += run_rows
                run, run_rows = [], 0
        if not sizes:
            units.append({"file": f, "row_groups": [], "offset": 0, "first": True})
    return units


def estimate_text_rows(src: RawSource, spec: dict[str, Any], prints: list[dict[str, Any]]) -> int:
    """Rows of text inputs from their sizes and the line length of the first file's start."""
    total = sum(int(fp.get("size") or 0) for fp in prints)
    per_row = _TEXT_BYTES_PER_ROW
    for path, fp in zip(src.paths, prints, strict=True):
        if fp.get("size"):
            fs, p = filesystem_for(path, spec.get("storage_options"))
            with fs.open(p, "rb") as f:
                head = f.read(_SAMPLE_BYTES)
            per_row = max(1, len(head) // max(1, head.count(b"\n")))
            break
    return total // per_row
