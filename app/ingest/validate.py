"""Validation: raw (binary) columns -> normalised rows, each bad row with a quarantine reason.

Every reader hands its raw columns, as Arrow binary, to ``normalise``. A row is good when its user
and item ids are present, its timestamp parses (and is not negative), its weight or rating is a
non-negative number and its event type (when weighted by event) is known; otherwise ``reason``
says what is wrong with it and ``raw`` keeps its decoded values as JSON for the quarantine.
``spec`` is a plain dict (it crosses Ray boundaries) built by ``app.ingest.readers.reader_spec``.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from app.ingest.errors import IngestError

# Columns of the normalised rows between pipeline steps.
FILE = "file"
ROW = "row"
USER = "user"
ITEM = "item"
TS = "ts"
W = "w"
REASON = "reason"
RAW = "raw"

NORMAL_SCHEMA = pa.schema(
    [
        (FILE, pa.string()),
        (ROW, pa.int64()),
        (USER, pa.string()),
        (ITEM, pa.string()),
        (TS, pa.int64()),
        (W, pa.float32()),
        (REASON, pa.string()),
        (RAW, pa.string()),
    ]
)
"""Normalised rows: ``reason`` is null on a good row; a bad row has null ids, a reason and raw."""
QUARANTINE_SCHEMA = pa.schema(
    [(FILE, pa.string()), (ROW, pa.int64()), (REASON, pa.string()), (RAW, pa.string())]
)
"""What the quarantine keeps of a bad row."""


def wanted_columns(src: dict[str, Any]) -> list[str]:
    """The raw columns a source needs: user, item, timestamp and the optional ones, once each."""
    cols = [src["user"], src["item"], src["timestamp"]]
    cols += [c for c in (src["weight"], src["rating"], src["event"]) if c]
    return list(dict.fromkeys(cols))


def check_columns(path: str, found: list[str], src: dict[str, Any]) -> None:
    """Fail unless ``found`` holds every wanted column; guess the delimiter when it does not.

    Raises:
        IngestError: naming the missing columns and the likely fix.
    """
    missing = [c for c in wanted_columns(src) if c not in found]
    if not missing:
        return
    hint = "check data.columns (the raw column names)"
    header = " ".join(found)
    for d in (";", "\t", "|", ","):
        if d != src["delimiter"] and d in header:
            hint = f"the header contains {d!r}: set data.delimiter={d!r}"
            break
    raise IngestError(
        f"{path}: missing column(s) {', '.join(missing)}; found {found or 'none'}; {hint}"
    )


def bad_rows(path: str, bad: list[tuple[int, str, str]]) -> pa.Table:
    """Normalised rows for lines a reader could not parse: ``(row number, reason, raw text)``."""
    n = len(bad)
    return pa.table(
        {
            FILE: pa.array([path] * n, pa.string()),
            ROW: pa.array([b[0] for b in bad], pa.int64()),
            USER: pa.nulls(n, pa.string()),
            ITEM: pa.nulls(n, pa.string()),
            TS: pa.nulls(n, pa.int64()),
            W: pa.nulls(n, pa.float32()),
            REASON: pa.array([b[1] for b in bad], pa.string()),
            RAW: pa.array([b[2] for b in bad], pa.string()),
        },
        schema=NORMAL_SCHEMA,
    )


def _decode(col: pa.ChunkedArray) -> tuple[pa.ChunkedArray, np.ndarray]:
    """Binary → string; returns the strings and a mask of values that are not valid UTF-8."""
    try:
        return pc.cast(col, pa.string()), np.zeros(len(col), dtype=bool)
    except pa.ArrowInvalid:
        values = col.to_pylist()
        bad = np.zeros(len(values), dtype=bool)
        text: list[str | None] = []
        for i, v in enumerate(values):
            if v is None:
                text.append(None)
                continue
            try:
                text.append(v.decode("utf-8"))
            except UnicodeDecodeError:
                bad[i] = True
                text.append(None)
        return pa.chunked_array([pa.array(text, pa.string())]), bad


def _numbers(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """Parse numeric text; returns float64 values (NaN where missing) and a parse-failure mask."""
    stripped = pc.utf8_trim_whitespace(col)
    present = pc.fill_null(pc.greater(pc.utf8_length(stripped), 0), False)
    values = np.full(len(col), np.nan)
    failed = np.zeros(len(col), dtype=bool)
    try:
        parsed = pc.cast(stripped, pa.float64())
        values = parsed.to_numpy(zero_copy_only=False).astype(np.float64)
    except pa.ArrowInvalid:
        for i, v in enumerate(stripped.to_pylist()):
            if not v:
                continue
            try:
                values[i] = float(v)
            except ValueError:
                failed[i] = True
    present_np = present.to_numpy(zero_copy_only=False)
    values[~present_np] = np.nan
    failed |= present_np & ~np.isfinite(values) & ~failed
    return values, failed


def _timestamps(col: pa.ChunkedArray, unit: str) -> tuple[np.ndarray, np.ndarray]:
    """Event times as Unix seconds (int64) and a mask of missing/unparsable values."""
    if unit == "iso":
        import pandas as pd

        parsed = pd.to_datetime(
            pd.Series(col.to_pylist(), dtype="object"), errors="coerce", utc=True, format="ISO8601"
        )
        bad = parsed.isna().to_numpy().copy()
        out = np.zeros(len(col), dtype=np.int64)
        if (~bad).any():
            # In the parsed unit (pandas may hold s, ms, us or ns): dates outside the nanosecond
            # range, such as year 1000, stay valid values here and are not an overflow.
            per_second = {"s": 1, "ms": 10**3, "us": 10**6, "ns": 10**9}[parsed.dt.unit]
            out[~bad] = np.asarray(parsed[~bad].array.asi8) // per_second
        bad |= out < 0  # before 1970, as for numeric timestamps
        return out, bad
    values, failed = _numbers(col)
    bad = failed | np.isnan(values) | (values < 0)
    values = np.where(bad, 0, values)
    if unit == "ms":
        values = values / 1000.0
    return np.floor(values).astype(np.int64), bad


def normalise(table: pa.Table, path: str, offset: int, src: dict[str, Any]) -> pa.Table:
    """Validate raw (binary) columns into the normalised schema, with a reason per bad row.

    Args:
        table: The wanted raw columns of ``path``, as Arrow binary.
        path: The raw file the rows come from.
        offset: Row number of the first row in the file; -1 when unknown (Parquet blocks).
        src: The reader spec.

    The first failed check names a row's reason.
    """
    n = table.num_rows
    reasons = np.full(n, None, dtype=object)

    def flag(mask: np.ndarray, reason: str) -> None:
        reasons[mask & (reasons == None)] = reason  # noqa: E711  (numpy elementwise)

    decoded: dict[str, pa.ChunkedArray] = {}
    for c in wanted_columns(src):
        decoded[c], bad_utf8 = _decode(table.column(c))
        flag(bad_utf8, f"column {c}: not valid UTF-8")

    ids = {}
    for key, label in ((src["user"], "user"), (src["item"], "item")):
        s = pc.utf8_trim_whitespace(decoded[key])
        missing = pc.fill_null(pc.equal(pc.utf8_length(s), 0), True).to_numpy(zero_copy_only=False)
        flag(missing, f"missing {label} id")
        ids[label] = s

    ts, bad_ts = _timestamps(decoded[src["timestamp"]], src["timestamp_unit"])
    flag(bad_ts, "missing or unparsable timestamp")

    weight = np.ones(n, dtype=np.float64)
    wcol = src["weight"] or src["rating"]
    if wcol:
        w, bad_w = _numbers(decoded[wcol])
        flag(bad_w, f"non-numeric {wcol}")
        flag(np.isnan(w) & ~bad_w, f"missing {wcol}")
        flag(w < 0, f"negative {wcol}")
        weight = np.where(np.isnan(w), 0.0, w)
    if src["event"] and src["event_weights"]:
        events = decoded[src["event"]].to_numpy(zero_copy_only=False)
        known = np.array([e in src["event_weights"] for e in events], dtype=bool)
        flag(~known, f"unknown {src['event']} value")
        weight = weight * np.array([src["event_weights"].get(e, 0.0) for e in events])

    ok = np.equal(reasons, None).astype(bool) if n else np.zeros(0, dtype=bool)
    raw = np.full(n, None, dtype=object)
    if (~ok).any():
        bad_idx = np.flatnonzero(~ok)
        sub = {c: decoded[c].take(pa.array(bad_idx)).to_pylist() for c in decoded}
        raw[bad_idx] = [json.dumps({c: sub[c][j] for c in sub}) for j in range(len(bad_idx))]
    ok_arr = pa.array(ok)
    rows = np.arange(offset, offset + n, dtype=np.int64) if offset >= 0 else np.full(n, -1)
    return pa.table(
        {
            FILE: pa.array(np.full(n, path, dtype=object), pa.string()),
            ROW: pa.array(rows, pa.int64()),
            USER: pc.if_else(ok_arr, ids["user"], pa.scalar(None, pa.string())),
            ITEM: pc.if_else(ok_arr, ids["item"], pa.scalar(None, pa.string())),
            TS: pa.array(ts, pa.int64()),
            W: pa.array(weight, pa.float32()),
            REASON: pa.array(reasons, pa.string()),
            RAW: pa.array(raw, pa.string()),
        },
        schema=NORMAL_SCHEMA,
    )
