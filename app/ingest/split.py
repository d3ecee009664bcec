"""Dedupe and temporal split: per user, first event per item, then train / valid / test by time.

``split_codes`` is the vectorised core: rows given as integer user codes, item ranks and
timestamps (any number of users, each with all of its rows) get a status code per row. Within a
user, rows are ordered by timestamp, then by item rank (``item_order_key`` order: at equal times
the higher item id counts as later), then by their input order, so the split does not depend on
how the rows were batched and a repeated (user, item, timestamp) keeps its earliest input row.

``dedupe_and_split`` applies it to normalised rows with string ids (the form the readers give):
bad rows pass through with status ``quarantined``, repeats get ``duplicate``, the rest
``train|valid|test``.
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
STATUS_NAMES = ("train", "valid", "test", DUPLICATE)
"""Status of each code ``split_codes`` gives: 0 train, 1 valid, 2 test, 3 duplicate."""
DUPLICATE_CODE = 3

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


def id_order(ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Indices that sort ids by ``item_order_key``, ties (``"7"``, ``"007"``) by their text."""
    keyed = pa.table({"key": item_order_key(ids), "id": ids})
    order = pc.sort_indices(keyed, sort_keys=[("key", "ascending"), ("id", "ascending")])
    return order.to_numpy()


def order_ranks(ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Rank (0..n-1) of each id in ``id_order``."""
    rank = np.empty(len(ids), dtype=np.int64)
    rank[id_order(ids)] = np.arange(len(ids), dtype=np.int64)
    return rank


def _ceil_frac(n: np.ndarray, frac: float) -> np.ndarray:
    """``ceil(n * frac)`` in exact integer arithmetic (no float error at whole products)."""
    f = Fraction(frac).limit_denominator(10**6)
    return (n * f.numerator + f.denominator - 1) // f.denominator


def _sort_order(user: np.ndarray, item: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """Stable permutation sorting rows by (user, ts, item).

    One ``argsort`` of a packed 63-bit key when the three fit (they do for typical id and time
    ranges), else a three-key ``lexsort``; both keep equal rows in input order.
    """
    if len(user) == 0:
        return np.zeros(0, dtype=np.int64)
    t = ts - ts.min()
    bu, bt, bi = (int(x.max()).bit_length() for x in (user, t, item))
    if bu + bt + bi <= 63:
        key = (user.astype(np.int64) << (bt + bi)) | (t << bi) | item.astype(np.int64)
        return np.argsort(key, kind="stable")
    return np.lexsort((item, ts, user))


def split_codes(
    user: np.ndarray,
    item: np.ndarray,
    ts: np.ndarray,
    test_fraction: float,
    valid_fraction: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Dedupe and split rows given as codes; the protocol of docs/design.md.

    Args:
        user: Non-negative integer user codes (equal code, same user); every row of a user.
        item: Non-negative item ranks in ``item_order_key`` order.
        ts: Timestamps (int64).
        test_fraction: Per user, the last ``ceil(test_fraction * n)`` interactions are test.
        valid_fraction: Of the rest, the last ``ceil(valid_fraction * m)`` are validation.

    Returns:
        ``(order, status)``: ``order`` sorts the rows by (user, ts, item, input order) and
        ``status[k]`` (int8, ``STATUS_NAMES``) is the status of row ``order[k]``.
    """
    order = _sort_order(user, item, ts)
    u, i = user[order].astype(np.int64), item[order].astype(np.int64)
    status = np.full(len(order), DUPLICATE_CODE, dtype=np.int8)
    if not len(order):
        return order, status
    # Sorted by (user, ts, item): the first row of each (user, item) is its first event.
    _, first = np.unique(u * (int(i.max()) + 1) + i, return_index=True)
    keep = np.zeros(len(order), dtype=bool)
    keep[first] = True
    ku = u[keep]
    starts = np.flatnonzero(np.r_[True, ku[1:] != ku[:-1]])
    counts = np.diff(np.r_[starts, len(ku)])
    n = np.repeat(counts, counts)
    from_end = n - 1 - (np.arange(len(ku)) - np.repeat(starts, counts))
    n_test = _ceil_frac(n, test_fraction)
    n_valid = _ceil_frac(n - n_test, valid_fraction)
    status[keep] = np.where(from_end < n_test, 2, np.where(from_end < n_test + n_valid, 1, 0))
    return order, status


def dedupe_and_split(batch: pa.Table, test_fraction: float, valid_fraction: float) -> pa.Table:
    """Per user: keep each (user, item) at its first event, then split by time (docs/design.md).

    The batch holds every row of its users. Bad rows pass through with status ``quarantined``;
    repeats get ``duplicate``; the rest ``train|valid|test``. Good rows come first, sorted by
    (user, ts, item).
    """
    good_mask = pc.is_null(batch.column(REASON))
    good = batch.filter(good_mask)
    bad = batch.filter(pc.invert(good_mask))
    bad = bad.append_column(STATUS, pa.array([QUARANTINED] * bad.num_rows, pa.string()))
    if good.num_rows == 0:
        return bad.cast(STAGED_SCHEMA)
    users = pc.dictionary_encode(good.column(USER)).combine_chunks()
    items = pc.dictionary_encode(good.column(ITEM)).combine_chunks()
    irank = order_ranks(items.dictionary)[items.indices.to_numpy()]
    ts = good.column(TS).to_numpy()
    order, codes = split_codes(users.indices.to_numpy(), irank, ts, test_fraction, valid_fraction)
    status = pa.array(STATUS_NAMES, pa.string()).take(pa.array(codes))
    out = good.take(pa.array(order)).append_column(STATUS, status)
    return pa.concat_tables([out.cast(STAGED_SCHEMA), bad.cast(STAGED_SCHEMA)])
