"""Id canonicalisation: raw user / item id columns as canonical id text, with quarantine reasons.

Ids are canonicalised the same way whatever the format (docs/ingest-validation.md): surrounding
whitespace is stripped; the text of an integer, with or without a zero fraction or a ``+``, is
its digits, exact at any size (``1``, ``1.0``, ``"1.0"``, ``+1`` and a Parquet ``1.0`` all give
``"1"``); another number (``1e3``, ``1.5``, ``nan``) is the integer it is when a float64 holds
it exactly, else quarantined; any other text is kept as given. An empty id, one holding a
control character, or one longer than ``MAX_ID_BYTES`` is quarantined.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from app.ingest.values import as_mask, as_text, exact_integers, replace_at, unwrap

MAX_ID_BYTES = 1024
"""Longest id (UTF-8 bytes, after stripping) that is not quarantined."""


def id_reasons(label: str) -> dict[str, str]:
    """The quarantine reasons of one id column (``label`` is ``user`` or ``item``), by check."""
    return {
        "missing": f"missing {label} id",
        "not_scalar": f"{label} id is not a string or number",
        "control": f"{label} id contains a control character",
        "long": f"{label} id longer than {MAX_ID_BYTES} bytes",
        "non_integer": f"{label} id is a non-integer number",
    }


# Numbers as an id may be written: the words only as writers spell them ("Nan" is a name).
_ID_NUMBER_RE = (
    r"^[+-]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
    r"|nan|NaN|NAN|inf|Inf|INF|infinity|Infinity|INFINITY)$"
)
# Integral decimals: an optional sign, digits, optionally a point and zeros only.
_INTEGRAL_RE = r"^[+-]?[0-9]+(?:\.0*)?$"
# First characters a number can start with (see ``app.ingest.values``).
_NUMBER_STARTS = pa.array(list("0123456789+-.nNiI"))
# Control characters (C0, DEL, C1), invisible format characters (zero-width space, BOM, ...)
# and the Unicode line and paragraph separators.
_CONTROL_RE = r"[\p{Cc}\p{Cf}\p{Zl}\p{Zp}]"


def canonical_ids(
    col: pa.ChunkedArray, label: str
) -> tuple[pa.ChunkedArray, list[tuple[np.ndarray, str]]]:
    """Canonical id text and the failed checks ``(mask, reason)``, in reason order."""
    reasons = id_reasons(label)
    t = unwrap(col).type
    if pa.types.is_integer(t):
        # Integers are canonical text already: only nulls can fail.
        text = pc.cast(unwrap(col), pa.string())
        return text, [(as_mask(pc.is_null(text)), reasons["missing"])]
    text, _, not_scalar = as_text(col)
    s = pc.utf8_trim_whitespace(text)
    missing = as_mask(pc.equal(pc.utf8_length(s), 0)) | as_mask(pc.is_null(s))
    checks = [(missing, reasons["missing"]), (not_scalar, reasons["not_scalar"])]
    n = len(s)
    control = np.zeros(n, dtype=bool)
    non_integer = np.zeros(n, dtype=bool)
    # Digit-only ids (the common case) need no further check.
    rest = ~missing & ~not_scalar & ~as_mask(pc.utf8_is_digit(s))
    if rest.any():
        idx = np.flatnonzero(rest)
        sub = s.take(pa.array(idx))
        # Printable ASCII cannot hold a control character; only the others pay for a regex.
        odd = ~as_mask(pc.and_(pc.string_is_ascii(sub), pc.ascii_is_printable(sub)))
        if odd.any():
            odd_idx = np.flatnonzero(odd)
            found = as_mask(pc.match_substring_regex(sub.take(pa.array(odd_idx)), _CONTROL_RE))
            control[idx[odd_idx[found]]] = True
        maybe = as_mask(pc.is_in(pc.utf8_slice_codeunits(sub, 0, 1), value_set=_NUMBER_STARTS))
        if maybe.any():
            num_idx = np.flatnonzero(maybe)
            cand = sub.take(pa.array(num_idx))
            number = as_mask(pc.match_substring_regex(cand, _ID_NUMBER_RE))
            integral = number & as_mask(pc.match_substring_regex(cand, _INTEGRAL_RE))
            if integral.any():
                # Exact text of an integer: its digits, whatever its size.
                whole = cand.filter(pa.array(integral))
                whole = pc.replace_substring_regex(whole, r"^\+|\.0*$", "")
                whole = pc.replace_substring_regex(whole, r"^-(0+)$", r"\1")  # -0 is 0
                s = replace_at(s, idx[num_idx[integral]], whole)
            other = number & ~integral
            if other.any():
                # A fraction, an exponent, nan or inf: a float, an id only when it is exact.
                floats = pc.cast(cand.filter(pa.array(other)), pa.float64())
                values = np.asarray(floats.to_numpy(zero_copy_only=False), dtype=np.float64)
                exact = exact_integers(values)
                at = idx[num_idx[other]]
                non_integer[at[~exact]] = True
                if exact.any():
                    text = pc.cast(pa.array(values[exact].astype(np.int64)), pa.string())
                    s = replace_at(s, at[exact], text)
    too_long = as_mask(pc.greater(pc.binary_length(s), MAX_ID_BYTES))
    checks += [
        (control, reasons["control"]),
        (too_long, reasons["long"]),
        (non_integer, reasons["non_integer"]),
    ]
    return s, checks
