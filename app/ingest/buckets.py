"""Pass 1 of the ingest pipeline, read input into user buckets, and the bucket files' format.

The design and the data volumes of each pass are described in ``app.ingest.pipeline``. Both
passes run as Ray Data map tasks over one-row tables (``{"task": <JSON>}``) and return one small
row of counts and file names; the rows themselves only go through storage. This module holds
what both share (the task and result columns, the attempt's folders, ``BUCKET_SCHEMA``,
``bucket_of``) and the pass-1 task; the pass-2 task is ``app.ingest.bucket_split.split_bucket``:

- ``read_unit`` (pass 1) normalises one unit of input (a Parquet file's consecutive row
  groups, or a whole CSV / JSON-lines file) batch by batch, appends each batch's good rows to one
  Arrow IPC file per user bucket (``bucket_of``: a hash of the user id that every process
  computes alike) and its bad rows to a quarantine Parquet file, and returns its row counts, its
  distinct user and item ids and the names of the files it wrote.

Every file name carries a random tag of the task attempt and each task returns the names it
wrote: a retried task's half-written files are never read, and its counts are never added twice.
"""

from __future__ import annotations

import json
import posixpath
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from app.ingest.errors import IngestError
from app.ingest.idmaps import DistinctIds
from app.ingest.readers import count_rows, csv_batches, jsonl_batches, parquet_table
from app.ingest.validate import (
    ITEM,
    QUARANTINE_SCHEMA,
    REASON,
    ROW,
    TS,
    USER,
    W,
    wanted_columns,
)
from app.store import filesystem_for

TASK = "task"
"""Column of the one-row input tables: the task as JSON."""
ERROR = "error"
"""Column of the result rows: the message of an ``IngestError`` the task raised, else null.
(Ray Data would wrap the exception in its own type; the driver raises it again as itself.)"""
FILE_IDX = "file_idx"
BUCKETS = "buckets"
QUARANTINE = "quarantine"
USERS = "users"
"""Folders of an attempt: bucket files, quarantine files, per-bucket user id maps."""

BUCKET_SCHEMA = pa.schema(
    [
        (USER, pa.string()),
        (ITEM, pa.string()),
        (TS, pa.int64()),
        (W, pa.float32()),
        (FILE_IDX, pa.int32()),
        (ROW, pa.int64()),
    ]
)
"""A bucket file's rows: good rows only, the input file as its index in the sorted path list."""

READ_STATS_SCHEMA = pa.schema(
    [
        ("unit", pa.int64()),
        ("file", pa.int32()),
        ("rows_read", pa.int64()),
        ("good", pa.int64()),
        ("quarantined", pa.int64()),
        ("reasons", pa.string()),
        ("users", pa.list_(pa.string())),
        ("items", pa.list_(pa.string())),
        ("bucket_files", pa.list_(pa.string())),
        ("quarantine_files", pa.list_(pa.string())),
        (ERROR, pa.string()),
    ]
)
"""What a pass-1 task returns (one row): counts, quarantine reasons (JSON), ids, file names."""

# Bucket files are shuffle data read once: Arrow IPC with LZ4 costs a fraction of Parquet's
# encode and decode time and is about as small as Snappy Parquet.
_IPC_OPTIONS = pa.ipc.IpcWriteOptions(compression="lz4")
# FNV-1a over at most this many bytes from the end of each id (where ids usually differ) and its
# length: any deterministic function of the id will do, it only has to agree across processes.
_HASH_BYTES = 32
_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)


def bucket_of(ids: pa.Array | pa.ChunkedArray, n_buckets: int) -> np.ndarray:
    """Bucket (0..n_buckets-1) of each id, from a hash of its UTF-8 bytes.

    Python's ``hash`` of a string differs between processes (it is salted), so pass 1's read
    tasks and the driver would disagree; this one is plain arithmetic over the Arrow buffers.
    """
    arr = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
    if n_buckets <= 1 or len(arr) == 0:
        return np.zeros(len(arr), dtype=np.int64)
    if arr.null_count:
        arr = pc.fill_null(arr, "")
    _, offsets_buf, data_buf = arr.buffers()
    width = np.int64 if pa.types.is_large_string(arr.type) else np.int32
    window = np.frombuffer(offsets_buf, dtype=width)[arr.offset : arr.offset + len(arr) + 1]
    offsets = window.astype(np.int64)
    ends = offsets[1:]
    lengths = ends - offsets[:-1]
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0)
    if data.size == 0:
        data = np.zeros(1, dtype=np.uint8)
    h = np.full(len(arr), _FNV_OFFSET, dtype=np.uint64)
    h ^= lengths.astype(np.uint64)
    h *= _FNV_PRIME
    for j in range(min(int(lengths.max()), _HASH_BYTES)):
        # Only ids longer than j take a step: an id's hash must not depend on its neighbours.
        has = lengths > j
        mixed = (h ^ data[np.maximum(ends - 1 - j, 0)].astype(np.uint64)) * _FNV_PRIME
        h = np.where(has, mixed, h)
    # Murmur3's finaliser: FNV's low bits mix poorly, and the bucket is the hash modulo n.
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xFF51AFD7ED558CCD)
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xC4CEB9FE1A85EC53)
    h ^= h >> np.uint64(33)
    return (h % np.uint64(n_buckets)).astype(np.int64)


def _error_row(schema: pa.Schema, exc: IngestError) -> pa.Table:
    """A task's result row that only carries an input problem, for the driver to raise."""
    cols = {f.name: pa.nulls(1, f.type) for f in schema}
    cols[ERROR] = pa.array([str(exc)], pa.string())
    return pa.table(cols, schema=schema)


def one_list(values: pa.Array | list[str]) -> pa.ListArray:
    """A one-row list column holding ``values`` (strings)."""
    arr = values if isinstance(values, pa.Array) else pa.array(values, pa.string())
    return pa.ListArray.from_arrays(pa.array([0, len(arr)], pa.int32()), arr)


def attempt_tag() -> str:
    """A random tag for the files of one task attempt (a retry writes under another)."""
    return uuid.uuid4().hex[:8]


# ---------------------------------------------------------------- pass 1: read into buckets


@dataclass(frozen=True)
class ReadContext:
    """What every pass-1 task needs; pickled once with the map function."""

    spec: dict[str, Any]
    """The reader spec (``app.ingest.readers.reader_spec``)."""
    paths: tuple[str, ...]
    """Input files; a unit's ``file`` indexes them."""
    fmt: str
    """``csv``, ``jsonl`` or ``parquet``."""
    fs: pafs.FileSystem
    """The lake's pyarrow filesystem (it carries the driver's S3 credentials)."""
    attempt: str
    """Scheme-less folder of this ingest attempt."""
    n_buckets: int
    batch_rows: int = 1 << 19
    """Parquet rows normalised at a time."""
    flush_rows: int = 1 << 20
    """Good rows buffered across buckets before they are appended to the bucket files."""


class _BucketFiles:
    """One task's bucket files: rows are buffered per bucket and appended as record batches.

    Buffering up to ``flush_rows`` rows over all buckets keeps batches large when there are many
    buckets, and memory bounded by that many rows.
    """

    def __init__(self, ctx: ReadContext, prefix: str) -> None:
        self._ctx = ctx
        self._prefix = prefix
        self._buffers: dict[int, list[pa.Table]] = {}
        self._buffered = 0
        self._writers: dict[int, tuple[Any, Any]] = {}
        self.names: list[str] = []

    def add(self, rows: pa.Table, buckets: np.ndarray) -> None:
        """Route ``rows`` to their buckets, keeping their order within each bucket."""
        order = np.argsort(buckets, kind="stable")
        counts = np.bincount(buckets, minlength=self._ctx.n_buckets)
        starts = np.cumsum(counts) - counts
        ordered = rows.take(pa.array(order))
        for b in np.flatnonzero(counts):
            self._buffers.setdefault(int(b), []).append(ordered.slice(starts[b], counts[b]))
        self._buffered += rows.num_rows
        if self._buffered >= self._ctx.flush_rows:
            self.flush()

    def flush(self) -> None:
        """Append every buffered slice to its bucket's file."""
        for b, parts in self._buffers.items():
            self._writer(b).write_table(pa.concat_tables(parts).combine_chunks())
        self._buffers, self._buffered = {}, 0

    def _writer(self, bucket: int) -> Any:
        if bucket not in self._writers:
            name = f"b{bucket:05d}-{self._prefix}.arrow"
            path = posixpath.join(self._ctx.attempt, BUCKETS, name)
            sink = self._ctx.fs.open_output_stream(path)
            self._writers[bucket] = (
                pa.ipc.new_file(sink, BUCKET_SCHEMA, options=_IPC_OPTIONS),
                sink,
            )
            self.names.append(name)
        return self._writers[bucket][0]

    def close(self) -> None:
        """Flush and close every file (each file is complete only once closed)."""
        self.flush()
        for writer, sink in self._writers.values():
            writer.close()
            sink.close()


class _UnitOutput:
    """What one pass-1 task writes and counts."""

    def __init__(self, ctx: ReadContext, unit: int, file_idx: int) -> None:
        self._ctx = ctx
        self._file_idx = file_idx
        self._prefix = f"u{unit:05d}-{attempt_tag()}"
        self.buckets = _BucketFiles(ctx, self._prefix)
        self._quarantine: pq.ParquetWriter | None = None
        self.quarantine_files: list[str] = []
        self.users, self.items = DistinctIds(), DistinctIds()
        self.reasons: Counter[str] = Counter()
        self.good = 0
        self.bad = 0

    def add(self, table: pa.Table) -> None:
        """Route one normalised table: good rows to buckets, bad rows to the quarantine."""
        ok = pc.is_null(table.column(REASON))
        good = table.filter(ok)
        if good.num_rows:
            self._add_good(good)
        if good.num_rows < table.num_rows:
            self._add_bad(table.filter(pc.invert(ok)))

    def _add_good(self, good: pa.Table) -> None:
        n = good.num_rows
        user = good.column(USER).combine_chunks()
        item = good.column(ITEM)
        self.users.add(pc.unique(user))
        self.items.add(pc.unique(item))
        # The file path (a string on every row) stays here: the file travels as its index.
        rows = pa.table(
            [
                user,
                item,
                good.column(TS),
                good.column(W),
                pa.array(np.full(n, self._file_idx, dtype=np.int32)),
                good.column(ROW),
            ],
            schema=BUCKET_SCHEMA,
        )
        self.buckets.add(rows, bucket_of(user, self._ctx.n_buckets))
        self.good += n

    def _add_bad(self, bad: pa.Table) -> None:
        self.bad += bad.num_rows
        for row in bad.group_by([REASON]).aggregate([([], "count_all")]).to_pylist():
            self.reasons[row[REASON]] += row["count_all"]
        if self._quarantine is None:
            name = f"{self._prefix}.parquet"
            path = posixpath.join(self._ctx.attempt, QUARANTINE, name)
            self._quarantine = pq.ParquetWriter(path, QUARANTINE_SCHEMA, filesystem=self._ctx.fs)
            self.quarantine_files.append(name)
        self._quarantine.write_table(bad.select(QUARANTINE_SCHEMA.names).cast(QUARANTINE_SCHEMA))

    def close(self) -> None:
        """Complete every file."""
        self.buckets.close()
        if self._quarantine is not None:
            self._quarantine.close()

    def stats(self, unit: int, rows_read: int) -> pa.Table:
        """The task's one-row result."""
        return pa.table(
            {
                "unit": [unit],
                "file": pa.array([self._file_idx], pa.int32()),
                "rows_read": [rows_read],
                "good": [self.good],
                "quarantined": [self.bad],
                "reasons": [json.dumps(dict(self.reasons))],
                "users": one_list(self.users.result()),
                "items": one_list(self.items.result()),
                "bucket_files": one_list(self.buckets.names),
                "quarantine_files": one_list(self.quarantine_files),
                ERROR: pa.nulls(1, pa.string()),
            },
            schema=READ_STATS_SCHEMA,
        )


def read_unit(batch: pa.Table, ctx: ReadContext) -> pa.Table:
    """Pass-1 task: normalise one unit of input into bucket and quarantine files.

    The unit (JSON in the ``task`` column) is ``{"unit", "file", "first"}`` plus, for Parquet,
    ``"row_groups"`` and ``"offset"`` (the file row of its first row). ``rows_read`` is counted
    from the input by ``count_rows``, apart from the parser, by the file's first unit.
    """
    try:
        return _read_unit(batch, ctx)
    except IngestError as exc:
        return _error_row(READ_STATS_SCHEMA, exc)


def _read_unit(batch: pa.Table, ctx: ReadContext) -> pa.Table:
    unit = json.loads(batch.column(TASK)[0].as_py())
    path = ctx.paths[unit["file"]]
    out = _UnitOutput(ctx, unit["unit"], unit["file"])
    for table in _normalised(unit, path, ctx):
        out.add(table)
    out.close()
    rows_read = count_rows(path, ctx.spec) if unit["first"] else 0
    return out.stats(unit["unit"], rows_read)


def _normalised(unit: dict[str, Any], path: str, ctx: ReadContext) -> Iterator[pa.Table]:
    if ctx.fmt == "csv":
        yield from csv_batches(path, ctx.spec)
    elif ctx.fmt == "jsonl":
        yield from jsonl_batches(path, ctx.spec)
    else:
        yield from _parquet_batches(unit, path, ctx)


@contextmanager
def _parquet_file(path: str, spec: dict[str, Any]) -> Iterator[pq.ParquetFile]:
    fs, p = filesystem_for(path, spec.get("storage_options"))
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        yield pq.ParquetFile(p)  # Arrow's own reads: no Python file object in between
        return
    with fs.open(p, "rb") as f:
        yield pq.ParquetFile(f)


def parquet_row_groups(path: str, spec: dict[str, Any]) -> list[int]:
    """Rows of each row group of a Parquet file (its footer only)."""
    with _parquet_file(path, spec) as pf:
        md = pf.metadata
        return [md.row_group(i).num_rows for i in range(md.num_row_groups)]


def _parquet_batches(unit: dict[str, Any], path: str, ctx: ReadContext) -> Iterator[pa.Table]:
    """The unit's row groups, ``batch_rows`` at a time, normalised, with their file row numbers."""
    if not unit["row_groups"]:
        return
    offset = int(unit["offset"])
    with _parquet_file(path, ctx.spec) as pf:
        for batch in pf.iter_batches(
            batch_size=ctx.batch_rows,
            row_groups=unit["row_groups"],
            columns=wanted_columns(ctx.spec),
        ):
            table = parquet_table(pa.Table.from_batches([batch]), path, ctx.spec)
            if table.num_rows == batch.num_rows:  # one output row per input row, in order
                rows = pa.array(np.arange(offset, offset + batch.num_rows, dtype=np.int64))
                table = table.set_column(table.schema.get_field_index(ROW), ROW, rows)
            offset += batch.num_rows
            yield table
