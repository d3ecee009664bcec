"""Raw Arrow columns as text, numbers or seconds, and typed values as the text readers' binary.

The conversions ``normalise`` (``app.ingest.validate``) and id canonicalisation
(``app.ingest.ids``) build on: any raw column (binary from the text readers, typed from Parquet)
as text (``as_text``), float64 numbers (``as_numbers``) or a UTF-8 decoding with a mask of bad
values (``decode_utf8``); and, for the readers, JSON values (``json_binary``) or typed Parquet
columns (``as_binary``) as the binary text a CSV reader would give. All vectorised: per-value
Python runs only for the few values one vectorised pass could not decide.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# Number text as Arrow's string -> float64 cast accepts it.
_NUMBER_RE = r"^[+-]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|(?i:nan|inf|infinity))$"
# Floats hold every integer up to this magnitude exactly; a larger float is no exact id.
_EXACT_FLOAT = 2**53


def exact_integers(values: np.ndarray) -> np.ndarray:
    """Which floats are integers that a float64 holds exactly (``|x| <= 2**53``)."""
    with np.errstate(invalid="ignore"):
        return np.isfinite(values) & (np.floor(values) == values) & (np.abs(values) <= _EXACT_FLOAT)


def replace_at(s: pa.ChunkedArray, at: np.ndarray, values: pa.Array) -> pa.ChunkedArray:
    """``s`` with the values at positions ``at`` (ascending) replaced by ``values``."""
    where = np.zeros(len(s), dtype=bool)
    where[at] = True
    return pa.chunked_array(
        [pc.replace_with_mask(s.combine_chunks(), pa.array(where), _one_chunk(values))]
    )


def _one_chunk(arr: pa.Array | pa.ChunkedArray) -> pa.Array:
    return arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr


def as_mask(arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
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


def decode_utf8(col: pa.ChunkedArray) -> tuple[pa.ChunkedArray, np.ndarray]:
    """Binary → string; returns the strings and a mask of values that are not valid UTF-8."""
    try:
        return pc.cast(col, pa.string()), np.zeros(len(col), dtype=bool)
    except pa.ArrowInvalid:
        arr = col.combine_chunks()
        bad = np.zeros(len(arr), dtype=bool)
        _bisect_bad(arr, _casts(pa.string()), bad, 0)
        clean = pc.if_else(pa.array(bad), pa.scalar(None, arr.type), arr)
        return pa.chunked_array([pc.cast(clean, pa.string())]), bad


def is_text(t: pa.DataType) -> bool:
    """Whether ``t`` is a string or binary type."""
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


def is_temporal(t: pa.DataType) -> bool:
    """Whether ``t`` is a timestamp or date type."""
    return pa.types.is_timestamp(t) or pa.types.is_date(t)


def unwrap(col: pa.ChunkedArray) -> pa.ChunkedArray:
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
    null = as_mask(pc.is_null(count))
    ints = np.asarray(pc.fill_null(count, 0).to_numpy(zero_copy_only=False), dtype=np.int64)
    return ints // per, null


def as_text(col: pa.ChunkedArray) -> tuple[pa.ChunkedArray, np.ndarray, np.ndarray]:
    """Any raw column as text: the strings, a not-valid-text mask and a not-a-scalar mask.

    Binary must be UTF-8; numbers give the text a CSV would hold (a whole float gives the integer
    text: ``1.0`` -> ``1``); timestamps give Unix seconds. Booleans, lists, structs and maps
    are not scalars the ingest understands: their rows are flagged and their values kept as JSON.
    """
    col = unwrap(col)
    n = len(col)
    none = np.zeros(n, dtype=bool)
    t = col.type
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        text, bad = decode_utf8(col)
        return text, bad, none
    if is_text(t):
        return pc.cast(col, pa.string()), none, none
    if is_temporal(t):
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


def _parse_numbers(text: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Number text as float64: values (NaN where not a number), unparsable and missing masks."""
    s = pc.utf8_trim_whitespace(text)
    present = as_mask(pc.greater(pc.utf8_length(s), 0))
    s = pc.if_else(pa.array(present), s, pa.scalar(None, pa.string()))
    n = len(s)
    failed = np.zeros(n, dtype=bool)
    try:
        parsed = pc.cast(s, pa.float64())
    except pa.ArrowInvalid:
        # Null what does not look like a number, then cast again (vectorised, no per-row loop).
        arr = s.combine_chunks()
        failed = present & ~as_mask(pc.match_substring_regex(arr, _NUMBER_RE))
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


def as_numbers(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Any raw column as float64: values (NaN where not a number), unparsable and missing masks.

    A missing value is a null or empty text; a written ``nan`` is a number (not finite).
    """
    col = unwrap(col)
    t = col.type
    n = len(col)
    if _is_number(t):
        # unsafe: an integer beyond 2**53 may round, which no range check minds
        values = np.asarray(
            pc.cast(col, pa.float64(), safe=False).to_numpy(zero_copy_only=False),
            dtype=np.float64,
        )
        return values, np.zeros(n, dtype=bool), as_mask(pc.is_null(col))
    if is_temporal(t):
        secs, null = _seconds(col)
        values = secs.astype(np.float64)
        values[null] = np.nan
        return values, np.zeros(n, dtype=bool), null
    text, bad_text, not_scalar = as_text(col)
    values, failed, missing = _parse_numbers(text)
    failed |= not_scalar
    missing &= ~bad_text  # invalid text is flagged by its own reason
    return values, failed, missing


def json_binary(values: tuple[Any, ...]) -> tuple[pa.Array, np.ndarray]:
    """JSON values (str or None on the fast path) as a binary column, and a not-a-scalar mask.

    Booleans, arrays and objects become their JSON text; text that is not valid Unicode stays
    bytes that are not UTF-8, so that validation quarantines it.
    """
    flagged = np.zeros(len(values), dtype=bool)
    try:
        return pc.cast(pa.array(values, pa.string()), pa.binary()), flagged
    except (pa.ArrowInvalid, pa.ArrowTypeError, UnicodeEncodeError):
        pass
    out: list[bytes | None] = []
    for i, v in enumerate(values):
        if v is None:
            out.append(None)
            continue
        if not isinstance(v, str):
            flagged[i] = True
            v = json.dumps(v)
        out.append(v.encode("utf-8", "surrogatepass"))
    return pa.array(out, pa.binary()), flagged


def as_binary(col: pa.ChunkedArray) -> pa.ChunkedArray:
    """Typed Parquet values as the binary text a CSV reader would give, for ``normalise``.

    Whole floats give the same text as integers (``1.0`` -> ``1``), timestamps become Unix
    seconds, dictionary columns their values, and values Arrow cannot cast become JSON.
    """
    if pa.types.is_timestamp(col.type):
        # whole seconds, as the CSV path floors them (unsafe: fractions are dropped, not errors)
        col = pc.cast(pc.cast(col, pa.timestamp("s"), safe=False), pa.int64())
    if pa.types.is_floating(col.type):
        # 1.0 and 1 must give the same id / value text.
        ints = pc.cast(col, pa.int64(), safe=False)
        col = pc.if_else(
            pc.equal(pc.cast(ints, col.type, safe=False), col),
            pc.cast(ints, pa.string()),
            pc.cast(col, pa.string()),
        )
    if pa.types.is_dictionary(col.type):
        col = pc.cast(col, col.type.value_type)
    if pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
        # Arrow has no int → binary cast; going via string stays vectorised (no per-value Python).
        col = pc.cast(col, pa.string())
    try:
        return pc.cast(col, pa.binary())
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid):
        pass
    try:
        return pc.cast(pc.cast(col, pa.string()), pa.binary())
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid):
        return pa.chunked_array(
            [
                pa.array(
                    [
                        None if v is None else json.dumps(v, default=str).encode()
                        for v in col.to_pylist()
                    ],
                    pa.binary(),
                )
            ]
        )
