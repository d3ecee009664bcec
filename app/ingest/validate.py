"""Validation: raw columns -> normalised rows, each bad row with a quarantine reason.

Every reader hands its raw columns to ``normalise``: Arrow binary from the text readers (CSV,
JSON lines), typed columns from Parquet. A row is good when its user and item ids are usable
text, its timestamp is a time from 1970 to 2262-04-11 (the end of datetime64[ns]), its weight or
rating a finite non-negative number that fits a float32 and its event type (when weighted by
event) is known; otherwise ``reason`` says what is wrong with it and ``raw`` keeps its values
as JSON for the quarantine. ``spec`` is a plain dict (it crosses Ray boundaries) built by
``app.ingest.readers.reader_spec``.

Ids are canonicalised by ``app.ingest.ids``; the column conversions are in
``app.ingest.values``.

Every check is vectorised (Arrow compute, numpy); per-row Python runs only for rows already
known bad (their ``raw`` JSON) or for the few values of a column that one vectorised pass could
not decide.
"""

from __future__ import annotations

import codecs
import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from app.ingest.errors import IngestError
from app.ingest.ids import canonical_ids
from app.ingest.values import (
    as_mask,
    as_numbers,
    as_text,
    decode_utf8,
    is_temporal,
    is_text,
    unwrap,
)

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

MAX_TS_S = (2**63 - 1) // 10**9
"""Latest timestamp kept, in Unix seconds: 2262-04-11T23:47:16Z, the end of datetime64[ns]."""
RAW_VALUE_CHARS = 500
"""Characters of each value that ``raw`` keeps for a bad row."""
FLOAT32_MAX = float(np.finfo(np.float32).max)
"""Largest weight kept: weights are stored as float32."""

TS_MISSING = "missing or unparsable timestamp"
TS_RANGE = "timestamp out of range (1970-01-01 to 2262-04-11)"


def weight_reasons(col: str) -> dict[str, str]:
    """The quarantine reasons of a weight or rating column ``col``, by check."""
    return {
        "missing": f"missing {col}",
        "non_numeric": f"non-numeric {col}",
        "non_finite": f"non-finite {col}",
        "negative": f"negative {col}",
        "range": f"{col} out of range (float32)",
    }


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


def _timestamps(col: pa.ChunkedArray, unit: str) -> tuple[np.ndarray, list[tuple[np.ndarray, str]]]:
    """Event times as Unix seconds (int64) and the failed checks ``(mask, reason)``.

    Numbers are seconds or milliseconds by ``unit`` (typed Parquet timestamps are times already,
    whatever the unit); ``iso`` parses ISO-8601 text. A time before 1970 or after ``MAX_TS_S``
    (beyond datetime64[ns]), or a number that is infinite or overflows int64, is out of range.
    """
    n = len(col)
    col = unwrap(col)
    if unit == "iso" and not is_temporal(col.type):
        import pandas as pd

        text, _, _ = as_text(col)
        parsed = pd.to_datetime(
            pd.Series(pc.utf8_trim_whitespace(text).to_numpy(zero_copy_only=False), dtype=object),
            errors="coerce",
            utc=True,
            format="ISO8601",
        )
        missing = parsed.isna().to_numpy().copy()
        out = np.zeros(n, dtype=np.int64)
        if (~missing).any():
            # In the parsed unit (pandas may hold s, ms, us or ns): dates outside the nanosecond
            # range, such as year 1000, stay valid values here and are not an overflow.
            per_second = {"s": 1, "ms": 10**3, "us": 10**6, "ns": 10**9}[parsed.dt.unit]
            out[~missing] = np.asarray(parsed[~missing].array.asi8) // per_second
        out_of_range = ~missing & ((out < 0) | (out > MAX_TS_S))
        out[missing | out_of_range] = 0
        return out, [(missing, TS_MISSING), (out_of_range, TS_RANGE)]
    values, failed, missing = as_numbers(col)
    if unit == "ms" and not is_temporal(col.type):
        values = values / 1000.0
    missing = failed | missing | np.isnan(values)
    with np.errstate(invalid="ignore"):
        # NaN compares False both ways: only missing values are NaN here.
        out_of_range = ~missing & ~((values >= 0) & (values < MAX_TS_S + 1))
    secs = np.where(missing | out_of_range, 0.0, values)
    return np.floor(secs).astype(np.int64), [(missing, TS_MISSING), (out_of_range, TS_RANGE)]


def _encoding_label(encoding: str) -> str:
    try:
        name = codecs.lookup(encoding).name
    except LookupError:
        return encoding
    return "UTF-8" if name in ("utf-8", "utf-8-sig") else encoding


def normalise(
    table: pa.Table,
    path: str,
    offset: int,
    src: dict[str, Any],
    *,
    rows: np.ndarray | None = None,
    reasons: np.ndarray | None = None,
) -> pa.Table:
    """Validate raw columns into the normalised schema, with a reason per bad row.

    Args:
        table: The wanted raw columns of ``path``: binary from the text readers, or typed.
        path: The raw file the rows come from.
        offset: Row number of the first row in the file; -1 when unknown (Parquet blocks).
        src: The reader spec.
        rows: Row number of every row, instead of counting up from ``offset``.
        reasons: A reason already known for some rows (None for the others), e.g. a JSON id
            that is an object; it comes before any other check.

    The first failed check names a row's reason.
    """
    n = table.num_rows
    reason = np.full(n, None, dtype=object)
    bad = np.zeros(n, dtype=bool)

    def flag(mask: np.ndarray, why: str) -> None:
        new = mask & ~bad
        if new.any():
            reason[new] = why
            bad[new] = True

    if reasons is not None:
        pre = np.asarray([r is not None for r in reasons], dtype=bool)
        reason[pre] = np.asarray(reasons, dtype=object)[pre]
        bad |= pre

    enc = _encoding_label(src.get("encoding", "utf-8"))
    raw_cols = {c: table.column(c) for c in wanted_columns(src)}
    for c, col in raw_cols.items():
        if pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type):
            raw_cols[c], bad_text = decode_utf8(col)
            flag(bad_text, f"column {c}: not valid {enc}")

    ids = {}
    for key, label in ((src["user"], "user"), (src["item"], "item")):
        ids[label], checks = canonical_ids(raw_cols[key], label)
        for mask, why in checks:
            flag(mask, why)

    ts, checks = _timestamps(raw_cols[src["timestamp"]], src["timestamp_unit"])
    for mask, why in checks:
        flag(mask, why)

    weight = np.ones(n, dtype=np.float64)
    wcol = src["weight"] or src["rating"]
    if wcol:
        w_why = weight_reasons(wcol)
        w, bad_w, missing_w = as_numbers(raw_cols[wcol])
        flag(bad_w, w_why["non_numeric"])
        flag(missing_w, w_why["missing"])
        flag(~np.isfinite(w), w_why["non_finite"])
        with np.errstate(invalid="ignore"):
            flag(w < 0, w_why["negative"])
            flag(w > FLOAT32_MAX, w_why["range"])
        weight = np.where(np.isfinite(w), w, 0.0)
    if src["event"] and src["event_weights"]:
        events, _, _ = as_text(raw_cols[src["event"]])
        names = list(src["event_weights"])
        at = pc.index_in(pc.utf8_trim_whitespace(events), value_set=pa.array(names, pa.string()))
        known = as_mask(pc.is_valid(at))
        flag(~known, f"unknown {src['event']} value")
        per_event = np.asarray([float(src["event_weights"][k]) for k in names] + [0.0])
        weight = weight * per_event[np.asarray(pc.fill_null(at, len(names)).to_numpy())]
    flag(
        np.abs(weight) > FLOAT32_MAX,
        weight_reasons(wcol)["range"] if wcol else "weight out of range",
    )
    weight[bad] = 0.0
    w32 = weight.astype(np.float32)

    ok = ~bad
    raw: pa.Array = pa.nulls(n, pa.string())
    reason_arr: pa.Array = pa.nulls(n, pa.string())
    if bad.any():
        bad_idx = np.flatnonzero(bad)
        take = pa.array(bad_idx)
        # Each value cut to RAW_VALUE_CHARS, so that a huge value does not bloat the quarantine.
        sub = {
            c: as_text(col.take(take))[0].to_pylist()
            if not is_text(col.type)
            else pc.utf8_slice_codeunits(col.take(take), 0, RAW_VALUE_CHARS).to_pylist()
            for c, col in raw_cols.items()
        }
        texts = np.full(n, None, dtype=object)
        texts[bad_idx] = [json.dumps({c: sub[c][j] for c in sub}) for j in range(len(bad_idx))]
        raw = pa.array(texts, pa.string())
        reason_arr = pa.array(reason, pa.string())
    if rows is None:
        rows = np.arange(offset, offset + n, dtype=np.int64) if offset >= 0 else np.full(n, -1)
    ok_arr = pa.array(ok)
    null = pa.scalar(None, pa.string())
    return pa.table(
        {
            FILE: pa.repeat(pa.scalar(path, pa.string()), n),
            ROW: pa.array(np.asarray(rows, dtype=np.int64), pa.int64()),
            USER: pc.if_else(ok_arr, ids["user"], null),
            ITEM: pc.if_else(ok_arr, ids["item"], null),
            TS: pa.array(ts, pa.int64()),
            W: pa.array(w32, pa.float32()),
            REASON: reason_arr,
            RAW: raw,
        },
        schema=NORMAL_SCHEMA,
    )
