"""Pass 2 of the ingest pipeline: dedupe, split and encode the rows of one user bucket.

``split_bucket`` reads the files of one bucket (every row of its users, written by pass 1's
``app.ingest.buckets.read_unit``), maps ids to indices with the id maps, dedupes and splits
(``split_codes``) and writes one Parquet file per split into the version's staging folder; it
returns the files and the counts per input file. The design is described in
``app.ingest.pipeline``.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from app.ingest.buckets import (
    BUCKET_SCHEMA,
    BUCKETS,
    ERROR,
    FILE_IDX,
    TASK,
    USERS,
    attempt_tag,
    one_list,
)
from app.ingest.split import split_codes
from app.ingest.validate import ITEM, TS, USER, W
from app.store import (
    INTERACTION_SCHEMA,
    ITEM_IDX,
    SPLITS,
    TIMESTAMP,
    USER_ID,
    USER_IDX,
    WEIGHT,
)

SPLIT_STATS_SCHEMA = pa.schema(
    [
        ("bucket", pa.int64()),
        ("parts", pa.list_(pa.string())),
        ("counts", pa.string()),
        (ERROR, pa.string()),
    ]
)
"""What a pass-2 task returns (one row): split files, ``{file index: [train, valid, test,
duplicate]}`` as JSON."""


@dataclass(frozen=True)
class SplitContext:
    """What every pass-2 task needs; pickled once with the map function."""

    fs: pafs.FileSystem
    attempt: str
    """Scheme-less folder of this ingest attempt (bucket files, user maps)."""
    stage: str
    """Scheme-less staging folder of the version (split files go to ``<split>/``)."""
    attempt_id: str
    items: pa.Array
    """Item ids in index order (the item id map)."""
    n_files: int
    test_fraction: float
    valid_fraction: float


def split_bucket(batch: pa.Table, ctx: SplitContext) -> pa.Table:
    """Pass-2 task: dedupe, split and encode every row of one bucket's users.

    The task (JSON in the ``task`` column) is ``{"bucket", "files"}``. Rows come in unit order,
    hence in (input file, row) order, so a repeated (user, item, time) keeps its first input row.
    """
    task = json.loads(batch.column(TASK)[0].as_py())
    bucket = int(task["bucket"])
    rows = _read_bucket(task["files"], ctx)
    users = pq.read_table(
        posixpath.join(ctx.attempt, USERS, f"b{bucket:05d}.parquet"), filesystem=ctx.fs
    )
    # Positions in the bucket's user map, which is sorted by user index: same order as indices.
    local = pc.index_in(rows.column(USER), value_set=users.column(USER_ID).combine_chunks())
    item = pc.index_in(rows.column(ITEM), value_set=ctx.items)
    if local.null_count or item.null_count:
        raise RuntimeError(f"internal: bucket {bucket} has ids missing from the id maps")
    local_np = local.to_numpy()
    item_np = item.to_numpy()
    ts = rows.column(TS).to_numpy()
    order, status = split_codes(local_np, item_np, ts, ctx.test_fraction, ctx.valid_fraction)
    counts = _status_counts(rows.column(FILE_IDX).to_numpy()[order], status, ctx.n_files)
    user_idx = users.column(USER_IDX).to_numpy()[local_np]
    weight = rows.column(W).to_numpy()
    tag = attempt_tag()
    parts = []
    for code, split in enumerate(SPLITS):
        pick = order[status == code]
        if not len(pick):
            continue
        part = pa.table(
            {
                USER_IDX: pa.array(user_idx[pick], pa.int32()),
                ITEM_IDX: pa.array(item_np[pick].astype(np.int32), pa.int32()),
                TIMESTAMP: pa.array(ts[pick], pa.int64()),
                WEIGHT: pa.array(weight[pick], pa.float32()),
            },
            schema=INTERACTION_SCHEMA,
        )
        rel = f"{split}/part-{ctx.attempt_id}-b{bucket:05d}-{tag}.parquet"
        pq.write_table(part, posixpath.join(ctx.stage, rel), filesystem=ctx.fs)
        parts.append(rel)
    return pa.table(
        {
            "bucket": [bucket],
            "parts": one_list(parts),
            "counts": [json.dumps(counts)],
            ERROR: pa.nulls(1, pa.string()),
        },
        schema=SPLIT_STATS_SCHEMA,
    )


def _read_bucket(files: list[str], ctx: SplitContext) -> pa.Table:
    """A bucket's rows, file after file in name order (``b<bucket>-u<unit>-...``: unit order)."""
    tables = []
    for name in sorted(files):
        with ctx.fs.open_input_file(posixpath.join(ctx.attempt, BUCKETS, name)) as f:
            tables.append(pa.ipc.open_file(f).read_all())
    return pa.concat_tables(tables) if tables else BUCKET_SCHEMA.empty_table()


def _status_counts(file_idx: np.ndarray, status: np.ndarray, n_files: int) -> dict[str, list[int]]:
    """Rows per input file (by index) and status code, for the files that have any."""
    n = len(SPLITS) + 1
    grid = np.bincount(file_idx.astype(np.int64) * n + status, minlength=n_files * n)
    grid = grid.reshape(n_files, n)
    return {str(f): grid[f].tolist() for f in np.flatnonzero(grid.sum(axis=1))}
