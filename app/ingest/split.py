"""Dedupe and temporal split: per user, first event per item, then train / valid / test by time.

``dedupe_and_split`` runs on a block that holds every row of its users (the pipeline
hash-partitions by user first) and gives each row a status: ``quarantined`` (a bad row passed
through), ``duplicate`` (a later event of a (user, item) pair) or its split. Within a user, rows
are ordered by timestamp, then by ``item_order_key`` (at equal times the higher item id counts as
later), so the split does not depend on the input order.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from app.ingest.validate import ITEM, NORMAL_SCHEMA, REASON, TS, USER

STATUS = "status"
QUARANTINED = "quarantined"
DUPLICATE = "duplicate"
STAGED_SCHEMA = NORMAL_SCHEMA.append(pa.field(STATUS, pa.string()))
"""Normalised rows with their status: ``quarantined``, ``duplicate``, ``train|valid|test``."""

# Digit-only ids are left-padded to this width so that text order is numeric order.
_ID_PAD = 20


def item_order_key(items: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """Sort key for raw item ids: digit-only ids compare numerically, others as text after."""
    digits = pc.fill_null(pc.utf8_is_digit(items), False)
    padded = pc.utf8_lpad(items, _ID_PAD, "0")
    return pc.if_else(
        digits,
        pc.binary_join_element_wise("0", padded, ""),
        pc.binary_join_element_wise("1", items, ""),
    )


def _ceil_frac(n: np.ndarray, frac: float) -> np.ndarray:
    """``ceil(n * frac)`` in exact integer arithmetic (no float error at whole products)."""
    f = Fraction(frac).limit_denominator(10**6)
    return (n * f.numerator + f.denominator - 1) // f.denominator


def dedupe_and_split(batch: pa.Table, test_fraction: float, valid_fraction: float) -> pa.Table:
    """Per user: keep each (user, item) at its first event, then split by time (docs/design.md).

    The batch holds every row of its users (hash-partitioned by user). Bad rows pass through
    with status ``quarantined``; repeats get ``duplicate``; the rest ``train|valid|test``.
    """
    good_mask = pc.is_null(batch.column(REASON))
    good = batch.filter(good_mask)
    bad = batch.filter(pc.invert(good_mask))
    bad = bad.append_column(STATUS, pa.array([QUARANTINED] * bad.num_rows, pa.string()))
    if good.num_rows == 0:
        return bad.cast(STAGED_SCHEMA)
    users = pc.dictionary_encode(good.column(USER)).combine_chunks()
    ucode = users.indices.to_numpy()
    ikey = item_order_key(good.column(ITEM))
    icode = pc.dictionary_encode(ikey).combine_chunks()
    # Rank item keys so that integer order == key order (ties in time go to the lower item).
    key_rank = np.argsort(np.argsort(np.asarray(icode.dictionary.to_pylist(), dtype=object)))
    irank = key_rank[icode.indices.to_numpy()]
    ts = good.column(TS).to_numpy()
    order = np.lexsort((irank, ts, ucode))
    u, i = ucode[order], irank[order]
    # Sorted by (user, ts, item): the first row of each (user, item) is its first event.
    pair = u.astype(np.int64) * (int(irank.max()) + 1) + i
    _, first = np.unique(pair, return_index=True)
    keep = np.zeros(len(order), dtype=bool)
    keep[first] = True
    status = np.full(len(order), DUPLICATE, dtype=object)
    ku = u[keep]
    starts = np.flatnonzero(np.r_[True, ku[1:] != ku[:-1]])
    counts = np.diff(np.r_[starts, len(ku)])
    n = np.repeat(counts, counts)
    rank = np.arange(len(ku)) - np.repeat(starts, counts)
    from_end = n - 1 - rank
    n_test = _ceil_frac(n, test_fraction)
    n_valid = _ceil_frac(n - n_test, valid_fraction)
    split = np.where(
        from_end < n_test, "test", np.where(from_end < n_test + n_valid, "valid", "train")
    )
    status[np.flatnonzero(keep)] = split
    out = good.take(pa.array(order)).append_column(STATUS, pa.array(status, pa.string()))
    return pa.concat_tables([out.cast(STAGED_SCHEMA), bad.cast(STAGED_SCHEMA)])
