"""Validation: raw columns -> normalised rows, each bad row with a quarantine reason.

Every reader hands its raw columns to ``normalise``: Arrow binary from the text readers (CSV,
JSON lines), typed columns from Parquet. A row is good when its user and item ids are usable
text, its timestamp is a time from 1970 to 2262-04-11 (the end of datetime64[ns]), its weight or
rating a finite non-negative number that fits a float32 and its event type (when weighted by
event) is known; otherwise ``reason`` says what is wrong with it and ``raw`` keeps its values
as JSON for the quarantine. ``spec`` is a plain dict (it crosses Ray boundaries) built by
``app.ingest.readers.reader_spec``.

Ids are canonicalised the same way whatever the format (docs/ingest-validation.md): surrounding
whitespace is stripped; the text of an integer, with or without a zero fraction or a ``+``, is
its digits, exact at any size (``1``, ``1.0``, ``"1.0"``, ``+1`` and a Parquet ``1.0`` all give
``"1"``); another number (``1e3``, ``1.5``, ``nan``) is the integer it is when a float64 holds
it exactly, else quarantined; any other text is kept as given. An empty id, one holding a
control character, or one longer than ``MAX_ID_BYTES`` is quarantined.

Every check is vectorised (Arrow compute, numpy); per-row Python runs only for rows already
known bad (their ``raw`` JSON) or for the few values of a column that one vectorised pass could
not decide.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Callable
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

MAX_ID_BYTES = 1024
"""Longest id (UTF-8 bytes, after stripping) that is not quarantined."""
MAX_TS_S = (2**63 - 1) // 10**9
"""Latest timestamp kept, in Unix seconds: 2262-04-11T23:47:16Z, the end of datetime64[ns]."""
RAW_VALUE_CHARS = 500
"""Characters of each value that ``raw`` keeps for a bad row."""
FLOAT32_MAX = float(np.finfo(np.float32).max)
"""Largest weight kept: weights are stored as float32."""

TS_MISSING = "missing or unparsable timestamp"
TS_RANGE = "timestamp out of range (1970-01-01 to 2262-04-11)"


def id_reasons(label: str) -> dict[str, str]:
    """The quarantine reasons of one id column (``label`` is ``user`` or ``item``), by check."""
    return {
        "missing": f"missing {label} id",
        "not_scalar": f"{label} id is not a string or number",
        "control": f"{label} id contains a control character",
        "long": f"{label} id longer than {MAX_ID_BYTES} bytes",
        "non_integer": f"{label} id is a non-integer number",
    }


def weight_reasons(col: str) -> dict[str, str]:
    """The quarantine reasons of a weight or rating column ``col``, by check."""
    return {
        "missing": f"missing {col}",
        "non_numeric": f"non-numeric {col}",
        "non_finite": f"non-finite {col}",
        "negative": f"negative {col}",
        "range": f"{col} out of range (float32)",
    }


# Number text as Arrow's string -> float64 cast accepts it.
_NUMBER_RE = r"^[+-]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|(?i:nan|inf|infinity))$"
# Numbers as an id may be written: the words only as writers spell them ("Nan" is a name).
_ID_NUMBER_RE = (
    r"^[+-]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
    r"|nan|NaN|NAN|inf|Inf|INF|infinity|Infinity|INFINITY)$"
)
# Integral decimals: an optional sign, digits, optionally a point and zeros only.
_INTEGRAL_RE = r"^[+-]?[0-9]+(?:\.0*)?$"
# Floats hold every integer up to this magnitude exactly; a larger float is no exact id.
_EXACT_FLOAT = 2**53
# First characters a number can start with (see _NUMBER_RE).
_NUMBER_STARTS = pa.array(list("0123456789+-.nNiI"))
# Control characters (C0, DEL, C1), invisible format characters (zero-width space, BOM, ...)
# and the Unicode line and paragraph separators.
_CONTROL_RE = r"[\p{Cc}\p{Cf}\p{Zl}\p{Zp}]"


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


def _exact_integers(values: np.ndarray) -> np.ndarray:
    """Which floats are integers that a float64 holds exactly (``|x| <= 2**53``)."""
    with np.errstate(invalid="ignore"):
        return np.isfinite(values) & (np.floor(values) == values) & (np.abs(values) <= _EXACT_FLOAT)


def _replace(s: pa.ChunkedArray, at: np.ndarray, values: pa.Array) -> pa.ChunkedArray:
    """``s`` with the values at positions ``at`` (ascending) replaced by ``values``."""
    where = np.zeros(len(s), dtype=bool)
    where[at] = True
    return pa.chunked_array(
        [pc.replace_with_mask(s.combine_chunks(), pa.array(where), _one_chunk(values))]
    )


def _one_chunk(arr: pa.Array | pa.ChunkedArray) -> pa.Array:
    return arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr


def _np(arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A boolean Arrow array as numpy, nulls as False."""
    return np.asarray(pc.fill_null(arr, False).to_numpy(zero_copy_only=False), dtype=bool)


def _bisect_bad(arr: pa.Array, ok: Callable[[pa.Array], bool], bad: np.ndarray, at: int) -> None:
    """Mark in ``bad`` the values of ``arr`` that fail ``ok``: vectorised on halves, Python on few.

    Costs a few vectorised passes per bad value instead of a Python loop over the whole column.
    """
    if ok(arr):
        return
    if len(arr) <= 16:
        for i in range(len(arr)):
            if not ok(arr.slice(i, 1)):
                bad[at + i] = True
        return
    half = len(arr) // 2
    _bisect_bad(arr.slice(0, half), ok, bad, at)
    _bisect_bad(arr.slice(half), ok, bad, at + half)


def _casts(to: pa.DataType) -> Callable[[pa.Array], bool]:
    def ok(arr: pa.Array) -> bool:
        try:
            pc.cast(arr, to)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            return False
        return True

    return ok


def _decode(col: pa.ChunkedArray) -> tuple[pa.ChunkedArray, np.ndarray]:
    """Binary → string; returns the strings and a mask of values that are not valid UTF-8."""
    try:
        return pc.cast(col, pa.string()), np.zeros(len(col), dtype=bool)
    except pa.ArrowInvalid:
        arr = col.combine_chunks()
        bad = np.zeros(len(arr), dtype=bool)
        _bisect_bad(arr, _casts(pa.string()), bad, 0)
        clean = pc.if_else(pa.array(bad), pa.scalar(None, arr.type), arr)
        return pa.chunked_array([pc.cast(clean, pa.string())]), bad


def _is_text(t: pa.DataType) -> bool:
    return (
        pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or pa.types.is_binary(t)
        or pa.types.is_large_binary(t)
        or getattr(pa.types, "is_string_view", lambda _: False)(t)
        or getattr(pa.types, "is_binary_view", lambda _: False)(t)
    )


def _is_number(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)


def _is_temporal(t: pa.DataType) -> bool:
    return pa.types.is_timestamp(t) or pa.types.is_date(t)


def _unwrap(col: pa.ChunkedArray) -> pa.ChunkedArray:
    """Dictionary columns as their values, null-type columns as null strings."""
    if pa.types.is_dictionary(col.type):
        col = pc.cast(col, col.type.value_type)
    if pa.types.is_null(col.type):
        col = pa.chunked_array([pa.nulls(len(col), pa.string())])
    return col


def _seconds(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """Timestamps or dates as whole Unix seconds (int64, fractions floored) and a null mask."""
    t = col.type
    if pa.types.is_date32(t):
        per, count = 1, pc.multiply(pc.cast(pc.cast(col, pa.int32()), pa.int64()), 86400)
    elif pa.types.is_date64(t):
        per, count = 10**3, pc.cast(col, pa.int64())
    else:
        per = {"s": 1, "ms": 10**3, "us": 10**6, "ns": 10**9}[t.unit]
        count = pc.cast(col, pa.int64())
    null = _np(pc.is_null(count))
    ints = np.asarray(pc.fill_null(count, 0).to_numpy(zero_copy_only=False), dtype=np.int64)
    return ints // per, null


def _text(col: pa.ChunkedArray) -> tuple[pa.ChunkedArray, np.ndarray, np.ndarray]:
    """Any raw column as text: the strings, a not-valid-text mask and a not-a-scalar mask.

    Binary must be UTF-8; numbers give the text a CSV would hold (a whole float gives the integer
    text: ``1.0`` -> ``1``); timestamps give Unix seconds. Booleans, lists, structs and maps
    are not scalars the ingest understands: their rows are flagged and their values kept as JSON.
    """
    col = _unwrap(col)
    n = len(col)
    none = np.zeros(n, dtype=bool)
    t = col.type
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        text, bad = _decode(col)
        return text, bad, none
    if _is_text(t):
        return pc.cast(col, pa.string()), none, none
    if _is_temporal(t):
        secs, null = _seconds(col)
        text = pc.cast(pa.array(secs, pa.int64(), mask=null), pa.string())
        return pa.chunked_array([text]), none, none
    if pa.types.is_floating(t):
        # An exact integer (up to 2**53) gives its digits, as an integer column would.
        ints = pc.cast(col, pa.int64(), safe=False)
        whole = pc.and_(
            pc.and_(pc.is_finite(col), pc.equal(pc.cast(ints, t, safe=False), col)),
            pc.less_equal(pc.abs(col), float(_EXACT_FLOAT)),
        )
        return pc.if_else(whole, pc.cast(ints, pa.string()), pc.cast(col, pa.string())), none, none
    if _is_number(t):
        return pc.cast(col, pa.string()), none, none
    values = col.to_pylist()
    text = [None if v is None else json.dumps(v, default=str) for v in values]
    flagged = np.array([v is not None for v in values], dtype=bool)
    return pa.chunked_array([pa.array(text, pa.string())]), none, flagged


def _canonical_ids(
    col: pa.ChunkedArray, label: str
) -> tuple[pa.ChunkedArray, list[tuple[np.ndarray, str]]]:
    """Canonical id text and the failed checks ``(mask, reason)``, in reason order."""
    reasons = id_reasons(label)
    t = _unwrap(col).type
    if pa.types.is_integer(t):
        # Integers are canonical text already: only nulls can fail.
        text = pc.cast(_unwrap(col), pa.string())
        return text, [(_np(pc.is_null(text)), reasons["missing"])]
    text, _, not_scalar = _text(col)
    s = pc.utf8_trim_whitespace(text)
    missing = _np(pc.equal(pc.utf8_length(s), 0)) | _np(pc.is_null(s))
    checks = [(missing, reasons["missing"]), (not_scalar, reasons["not_scalar"])]
    n = len(s)
    control = np.zeros(n, dtype=bool)
    non_integer = np.zeros(n, dtype=bool)
    # Digit-only ids (the common case) need no further check.
    rest = ~missing & ~not_scalar & ~_np(pc.utf8_is_digit(s))
    if rest.any():
        idx = np.flatnonzero(rest)
        sub = s.take(pa.array(idx))
        # Printable ASCII cannot hold a control character; only the others pay for a regex.
        odd = ~_np(pc.and_(pc.string_is_ascii(sub), pc.ascii_is_printable(sub)))
        if odd.any():
            odd_idx = np.flatnonzero(odd)
            found = _np(pc.match_substring_regex(sub.take(pa.array(odd_idx)), _CONTROL_RE))
            control[idx[odd_idx[found]]] = True
        maybe = _np(pc.is_in(pc.utf8_slice_codeunits(sub, 0, 1), value_set=_NUMBER_STARTS))
        if maybe.any():
            num_idx = np.flatnonzero(maybe)
            cand = sub.take(pa.array(num_idx))
            number = _np(pc.match_substring_regex(cand, _ID_NUMBER_RE))
            integral = number & _np(pc.match_substring_regex(cand, _INTEGRAL_RE))
            if integral.any():
                # Exact text of an integer: its digits, whatever its size.
                whole = cand.filter(pa.array(integral))
                whole = pc.replace_substring_regex(whole, r"^\+|\.0*$", "")
                whole = pc.replace_substring_regex(whole, r"^-(0+)$", r"\1")  # -0 is 0
                s = _replace(s, idx[num_idx[integral]], whole)
            other = number & ~integral
            if other.any():
                # A fraction, an exponent, nan or inf: a float, an id only when it is exact.
                floats = pc.cast(cand.filter(pa.array(other)), pa.float64())
                values = np.asarray(floats.to_numpy(zero_copy_only=False), dtype=np.float64)
                exact = _exact_integers(values)
                at = idx[num_idx[other]]
                non_integer[at[~exact]] = True
                if exact.any():
                    text = pc.cast(pa.array(values[exact].astype(np.int64)), pa.string())
                    s = _replace(s, at[exact], text)
    too_long = _np(pc.greater(pc.binary_length(s), MAX_ID_BYTES))
    checks += [
        (control, reasons["control"]),
        (too_long, reasons["long"]),
        (non_integer, reasons["non_integer"]),
    ]
    return s, checks


def _parse_numbers(text: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Number text as float64: values (NaN where not a number), unparsable and missing masks."""
    s = pc.utf8_trim_whitespace(text)
    present = _np(pc.greater(pc.utf8_length(s), 0))
    s = pc.if_else(pa.array(present), s, pa.scalar(None, pa.string()))
    n = len(s)
    failed = np.zeros(n, dtype=bool)
    try:
        parsed = pc.cast(s, pa.float64())
    except pa.ArrowInvalid:
        # Null what does not look like a number, then cast again (vectorised, no per-row loop).
        arr = s.combine_chunks()
        failed = present & ~_np(pc.match_substring_regex(arr, _NUMBER_RE))
        arr = pc.if_else(pa.array(failed), pa.scalar(None, pa.string()), arr)
        try:
            parsed = pc.cast(arr, pa.float64())
        except pa.ArrowInvalid:
            more = np.zeros(n, dtype=bool)
            _bisect_bad(arr, _casts(pa.float64()), more, 0)
            failed |= more
            parsed = pc.cast(
                pc.if_else(pa.array(more), pa.scalar(None, pa.string()), arr), pa.float64()
            )
    values = np.asarray(parsed.to_numpy(zero_copy_only=False), dtype=np.float64)
    return values, failed, ~present


def _numbers(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Any raw column as float64: values (NaN where not a number), unparsable and missing masks.

    A missing value is a null or empty text; a written ``nan`` is a number (not finite).
    """
    col = _unwrap(col)
    t = col.type
    n = len(col)
    if _is_number(t):
        # unsafe: an integer beyond 2**53 may round, which no range check minds
        values = np.asarray(
            pc.cast(col, pa.float64(), safe=False).to_numpy(zero_copy_only=False),
            dtype=np.float64,
        )
        return values, np.zeros(n, dtype=bool), _np(pc.is_null(col))
    if _is_temporal(t):
        secs, null = _seconds(col)
        values = secs.astype(np.float64)
        values[null] = np.nan
        return values, np.zeros(n, dtype=bool), null
    text, bad_text, not_scalar = _text(col)
    values, failed, missing = _parse_numbers(text)
    failed |= not_scalar
    missing &= ~bad_text  # invalid text is flagged by its own reason
    return values, failed, missing


def _timestamps(col: pa.ChunkedArray, unit: str) -> tuple[np.ndarray, list[tuple[np.ndarray, str]]]:
    """Event times as Unix seconds (int64) and the failed checks ``(mask, reason)``.

    Numbers are seconds or milliseconds by ``unit`` (typed Parquet timestamps are times already,
    whatever the unit); ``iso`` parses ISO-8601 text. A time before 1970 or after ``MAX_TS_S``
    (beyond datetime64[ns]), or a number that is infinite or overflows int64, is out of range.
    """
    n = len(col)
    col = _unwrap(col)
    if unit == "iso" and not _is_temporal(col.type):
        import pandas as pd

        text, _, _ = _text(col)
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
    values, failed, missing = _numbers(col)
    if unit == "ms" and not _is_temporal(col.type):
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
            raw_cols[c], bad_text = _decode(col)
            flag(bad_text, f"column {c}: not valid {enc}")

    ids = {}
    for key, label in ((src["user"], "user"), (src["item"], "item")):
        ids[label], checks = _canonical_ids(raw_cols[key], label)
        for mask, why in checks:
            flag(mask, why)

    ts, checks = _timestamps(raw_cols[src["timestamp"]], src["timestamp_unit"])
    for mask, why in checks:
        flag(mask, why)

    weight = np.ones(n, dtype=np.float64)
    wcol = src["weight"] or src["rating"]
    if wcol:
        w_why = weight_reasons(wcol)
        w, bad_w, missing_w = _numbers(raw_cols[wcol])
        flag(bad_w, w_why["non_numeric"])
        flag(missing_w, w_why["missing"])
        flag(~np.isfinite(w), w_why["non_finite"])
        with np.errstate(invalid="ignore"):
            flag(w < 0, w_why["negative"])
            flag(w > FLOAT32_MAX, w_why["range"])
        weight = np.where(np.isfinite(w), w, 0.0)
    if src["event"] and src["event_weights"]:
        events, _, _ = _text(raw_cols[src["event"]])
        names = list(src["event_weights"])
        at = pc.index_in(pc.utf8_trim_whitespace(events), value_set=pa.array(names, pa.string()))
        known = _np(pc.is_valid(at))
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
            c: _text(col.take(take))[0].to_pylist()
            if not _is_text(col.type)
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
