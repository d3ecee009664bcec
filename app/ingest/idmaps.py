"""Id maps of a dataset version: raw user / item ids -> dense indices, items with their genres.

Indices follow the ids sorted numeric-first (``item_order_key``: ``"9"`` before ``"10"``, digit
ids before others), so the same ids always get the same indices whatever the input order.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from app.ingest.sources import RawSource
from app.ingest.split import item_order_key
from app.store import GENRES, ITEM_ID, filesystem_for


def id_table(ids: list[str], idx_col: str, id_col: str) -> pa.Table:
    """Id map: index 0..n-1 over the ids sorted numeric-first (``item_order_key``)."""
    arr = pa.array(ids, pa.string())
    order = pc.sort_indices(item_order_key(arr))
    sorted_ids = arr.take(order)
    return pa.table({idx_col: pa.array(np.arange(len(ids), dtype=np.int32)), id_col: sorted_ids})


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
