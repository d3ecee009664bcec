"""Id maps of a dataset version: raw user / item ids -> dense indices, items with their genres.

Indices follow the ids sorted numeric-first (``item_order_key``: ``"9"`` before ``"10"``, digit
ids before others; ids with equal keys, such as ``"7"`` and ``"007"``, by their text), so the same
ids always get the same indices whatever the input order. ``DistinctIds`` merges the distinct ids
that many tasks found into one set, without holding every task's ids at once.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from app.ingest.sources import RawSource
from app.ingest.split import id_order
from app.store import GENRES, ITEM_ID, filesystem_for

# DistinctIds collapses its pending ids once they outnumber the distinct ids so far by this many.
_MERGE_SLACK = 1 << 20


def id_table(ids: list[str] | pa.Array | pa.ChunkedArray, idx_col: str, id_col: str) -> pa.Table:
    """Id map: index 0..n-1 over the distinct ids sorted numeric-first (``item_order_key``)."""
    arr = ids if isinstance(ids, pa.Array | pa.ChunkedArray) else pa.array(ids, pa.string())
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    arr = pc.cast(arr, pa.string())
    sorted_ids = arr.take(pa.array(id_order(arr)))
    return pa.table({idx_col: pa.array(np.arange(len(arr), dtype=np.int32)), id_col: sorted_ids})


class DistinctIds:
    """The union of many sets of ids (string arrays), merged as they come.

    Pending arrays are collapsed with the result so far whenever they outnumber it (by at least
    ``_MERGE_SLACK`` ids), so memory stays within a small multiple of the distinct ids and each id
    is hashed a bounded number of times.
    """

    def __init__(self) -> None:
        self._distinct: pa.Array = pa.array([], pa.string())
        self._pending: list[pa.Array] = []
        self._n_pending = 0

    def add(self, ids: pa.Array | pa.ChunkedArray) -> None:
        """Add a set (or any array) of ids."""
        chunks = ids.chunks if isinstance(ids, pa.ChunkedArray) else [ids]
        self._pending += [pc.cast(c, pa.string()) for c in chunks]
        self._n_pending += len(ids)
        if self._n_pending > len(self._distinct) + _MERGE_SLACK:
            self._collapse()

    def _collapse(self) -> None:
        if self._pending:
            merged = pa.chunked_array([self._distinct, *self._pending], pa.string())
            self._distinct = pc.unique(merged)
            self._pending, self._n_pending = [], 0

    def result(self) -> pa.Array:
        """The distinct ids, in no particular order."""
        self._collapse()
        return self._distinct


def item_genres(src: RawSource, items: pa.Table) -> pa.Table:
    """Add the genres column from ``src.item_features`` (empty lists without it)."""
    genres: dict[str, list[str]] = {}
    if src.item_features:
        fs, p = filesystem_for(src.item_features)
        with fs.open(p, "rb") as f:
            feats = pacsv.read_csv(
                f,
                convert_options=pacsv.ConvertOptions(
                    column_types={src.item_features_id_column: pa.string()},
                    include_columns=[src.item_features_id_column, src.genres_column],
                ),
            )
        for iid, g in zip(
            feats.column(src.item_features_id_column).to_pylist(),
            feats.column(src.genres_column).to_pylist(),
            strict=True,
        ):
            if iid is not None and g and not g.startswith("("):
                genres[iid.strip()] = [x for x in g.split("|") if x]
    values = [genres.get(i, []) for i in items.column(ITEM_ID).to_pylist()]
    return items.append_column(GENRES, pa.array(values, pa.list_(pa.string())))
