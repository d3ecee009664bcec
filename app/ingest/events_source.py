"""The events source: the newest dataset version + the live events logged since it, as raw files.

``python -m jobs.ingest --config <cfg> data.source=events`` closes the loop between serving and
ingest: ``POST /events`` appends user actions to the online store (``app.events``, settings at
``serve.events``), and an events ingest publishes a new version of ``data.name`` that holds the
previous version's interactions plus those events, validated, deduplicated and split like any
raw source. ``resolve_events`` (called by ``resolve_source``) does, in the driver:

1. Previous version: the newest published version of ``data.name`` (``Lake.versions``, by
   ``created_at``) and its ``events_cursor`` (None when it came from a raw source: the whole log
   is new to it). Holds its manifest only.
2. Read the log: ``OnlineStore.read_since(cursor)`` gives every event after the cursor once and
   the end cursor. Holds those events (a list of dicts) in memory. No event: ``RawSource`` with
   no files, and the pipeline returns the previous version unchanged (a rerun is idempotent).
3. Materialise, once per (previous version, end cursor), under
   ``<cache_dir>/events-<name>/<previous version>-<cursor hash>/`` (complete once ``_SUCCESS``
   exists; a rerun reuses it, so the files and hence the new version id are the same):
   ``previous-<split>-NNNNN.parquet`` streams the previous version's splits one Parquet batch at a
   time, mapped back to external ids (holds both id maps and one batch), ``events-NNNNN.parquet``
   the events, ``items.csv`` the previous version's item genres (so genres survive). At most
   ``ROWS_PER_FILE`` rows per file, so Ray Data reads them in parallel.

Every column is written as text (weights as float64), so that blank ids, bad timestamps or
unknown event types reach the pipeline's own validation and quarantine: nothing is filtered
here, and the manifest's ``rows_read == rows_ingested + rows_quarantined + duplicates_collapsed``
covers the events too (the ``events-*`` files' entries). Weights: a previous row keeps its
stored weight. With ``data.event_weights`` set, an event weighs ``event_weights[event]`` and an
event of another type is quarantined (previous rows carry the ``PREVIOUS_EVENT`` marker,
weighted 1); without it every event is a weight-1 interaction. The new manifest records
``events_cursor`` (where the next events ingest, and replicas serving the version, start),
``events_read`` and ``events_previous_version``.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from app.config import ColumnMap, DataArgs, EventsArgs
from app.ingest.errors import SourceError
from app.ingest.sources import RawSource
from app.store import (
    GENRES,
    ITEM_ID,
    ITEM_IDX,
    SPLITS,
    TIMESTAMP,
    USER_ID,
    USER_IDX,
    WEIGHT,
    DatasetVersion,
    Lake,
    content_id,
    datasets_root,
    load_dataset,
)

PREVIOUS_EVENT = "(previous version)"
"""Event type of the rows taken from the previous version (weighted 1: their weight is final)."""
ROWS_PER_FILE = 1_000_000
"""Most rows per materialised Parquet file."""
EVENTS_COLUMNS = ColumnMap(
    user="user_id", item="item_id", timestamp="timestamp", weight="weight", event="event"
)
"""Columns of the materialised files (``event`` is read only when ``data.event_weights`` is set)."""
RAW_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("item_id", pa.string()),
        ("timestamp", pa.string()),
        ("weight", pa.float64()),
        ("event", pa.string()),
    ]
)
"""Schema of every materialised interaction file."""
ITEMS_FILE = "items.csv"
EVENT_FILES_PREFIX = "events-"
_SUCCESS = "_SUCCESS"
# Changes the materialised folder names when what is written changes.
_FORMAT_VERSION = 1


@dataclass(frozen=True)
class EventsRead:
    """What an events ingest read from the log, recorded in the new version's manifest."""

    previous_version: str
    """The dataset version the events are added to."""
    start_cursor: dict[str, Any] | None
    """The previous version's ``events_cursor`` (None: the log from its start)."""
    end_cursor: dict[str, Any]
    """The cursor after the last event read: the new version's ``events_cursor``."""
    n_events: int
    """Events read (each one row of the ``events-*`` files)."""
    event_files: tuple[str, ...] = ()
    """The materialised files that hold the events."""


def previous_version(lake: Lake, name: str) -> DatasetVersion:
    """The newest published version of ``name``, which an events ingest adds the events to.

    Raises:
        SourceError: when ``name`` has no published version in ``lake``.
    """
    versions = lake.versions(datasets_root(name))
    if not versions:
        raise SourceError(
            f"data.source=events adds the live events to the newest version of dataset "
            f"data.name={name!r}, but lake {lake.uri} has no version of it: ingest the dataset "
            "once from its raw source first (data.source=files, movielens or synthetic, with "
            "the same data.name)"
        )
    return load_dataset(lake, name, versions[-1])


def folder_name(previous: str, start: dict[str, Any] | None, end: dict[str, Any]) -> str:
    """Name of the materialised folder: the previous version id + a hash of the cursors."""
    return f"{previous}-{content_id({'v': _FORMAT_VERSION, 'start': start, 'end': end})}"


def _text(value: Any) -> str | None:
    """A logged value as the text a CSV would hold (whole floats as integers, None as null)."""
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, float):
        return repr(value)  # shortest round trip; nan / inf stay visible and fail validation
    return str(value)


def event_rows(events: list[dict[str, Any]]) -> pa.Table:
    """One ``RAW_SCHEMA`` row per logged event, in log order; nothing is checked or dropped."""
    n = len(events)
    return pa.table(
        {
            "user_id": pa.array([_text(e.get("user_id")) for e in events], pa.string()),
            "item_id": pa.array([_text(e.get("item_id")) for e in events], pa.string()),
            "timestamp": pa.array([_text(e.get("timestamp")) for e in events], pa.string()),
            "weight": pa.array(np.ones(n), pa.float64()),
            "event": pa.array([_text(e.get("event")) for e in events], pa.string()),
        },
        schema=RAW_SCHEMA,
    )


def id_array(table: pa.Table, idx_col: str, id_col: str) -> pa.Array:
    """External ids of an id map, at their index (``ids[idx]``)."""
    order = pc.sort_indices(table.column(idx_col))
    return table.column(id_col).take(order).combine_chunks()


def previous_rows(batch: pa.Table, user_ids: pa.Array, item_ids: pa.Array) -> pa.Table:
    """A batch of a version's interactions as ``RAW_SCHEMA`` rows with external ids."""
    return pa.table(
        {
            "user_id": user_ids.take(batch.column(USER_IDX)),
            "item_id": item_ids.take(batch.column(ITEM_IDX)),
            "timestamp": pc.cast(batch.column(TIMESTAMP), pa.string()),
            # float32 -> float64 -> text -> float32 gives back the same weight
            "weight": pc.cast(batch.column(WEIGHT), pa.float64()),
            "event": pa.repeat(pa.scalar(PREVIOUS_EVENT, pa.string()), batch.num_rows),
        },
        schema=RAW_SCHEMA,
    )


def items_table(items: pa.Table) -> pa.Table | None:
    """The item features file (``item_id``, ``|``-joined ``genres``); None without any genre."""
    if GENRES not in items.column_names:
        return None
    genres = ["|".join(g or []) for g in items.column(GENRES).to_pylist()]
    if not any(genres):
        return None
    return pa.table({"item_id": items.column(ITEM_ID), "genres": pa.array(genres, pa.string())})


def _previous_batches(previous: DatasetVersion, split: str) -> Iterator[pa.Table]:
    users = id_array(previous.users(), USER_IDX, USER_ID)
    items = id_array(previous.items(), ITEM_IDX, ITEM_ID)
    ds = previous.arrow_dataset(split)  # the listed files only
    for batch in ds.to_batches():
        if batch.num_rows:
            yield previous_rows(pa.Table.from_batches([batch]), users, items)


def write_shards(
    tables: Iterable[pa.Table],
    folder: str,
    prefix: str,
    filesystem: Any,
    rows_per_file: int = ROWS_PER_FILE,
) -> list[str]:
    """Write the tables as ``<prefix>-NNNNN.parquet`` files of at most ``rows_per_file`` rows.

    Returns:
        The file names written (none for no rows).
    """
    names: list[str] = []
    writer = None
    in_file = 0
    try:
        for table in tables:
            start = 0
            while start < table.num_rows:
                if writer is None:
                    names.append(f"{prefix}-{len(names):05d}.parquet")
                    path = posixpath.join(folder, names[-1])
                    writer = pq.ParquetWriter(path, RAW_SCHEMA, filesystem=filesystem)
                    in_file = 0
                take = min(table.num_rows - start, rows_per_file - in_file)
                writer.write_table(table.slice(start, take))
                start += take
                in_file += take
                if in_file == rows_per_file:
                    writer.close()
                    writer = None
    finally:
        if writer is not None:
            writer.close()
    return names


def _write_folder(previous: DatasetVersion, events: list[dict[str, Any]], out: Lake) -> None:
    """Write every materialised file into ``out`` (``_SUCCESS`` is the caller's)."""
    fs = out.arrow_fs
    out.fs.makedirs(out.root, exist_ok=True)
    for split in SPLITS:
        write_shards(_previous_batches(previous, split), out.root, f"previous-{split}", fs)
    write_shards([event_rows(events)], out.root, EVENT_FILES_PREFIX.rstrip("-"), fs)
    items = items_table(previous.items())
    if items is not None:
        with out.fs.open(out.path(ITEMS_FILE), "wb") as f:
            pacsv.write_csv(items, f)


def materialise(
    previous: DatasetVersion, events: list[dict[str, Any]], read: EventsRead, cache_dir: str
) -> str:
    """Write (once) the raw files of an events ingest and return their folder.

    Local folders are written under a temporary name and renamed (concurrent runs: the first
    rename wins); on object stores the files are written in place, ``_SUCCESS`` last.
    """
    name = folder_name(read.previous_version, read.start_cursor, read.end_cursor)
    final = Lake(cache_dir.rstrip("/") + f"/events-{previous.name}/{name}")
    if final.exists(_SUCCESS):
        return final.uri
    if not final.is_local:
        final.remove("")
        _write_folder(previous, events, final)
        final.write_bytes(_SUCCESS, b"")
        return final.uri
    parent = os.path.dirname(final.root)
    os.makedirs(parent, exist_ok=True)
    staging = Lake(os.path.join(parent, f".{name}-{uuid.uuid4().hex[:8]}"))
    try:
        _write_folder(previous, events, staging)
        staging.write_bytes(_SUCCESS, b"")
        if os.path.isdir(final.root) and not final.exists(_SUCCESS):
            shutil.rmtree(final.root)  # a crashed earlier attempt
        try:
            os.replace(staging.root, final.root)
        except OSError:
            if not final.exists(_SUCCESS):
                raise  # otherwise a concurrent run finished first: use its files
    finally:
        shutil.rmtree(staging.root, ignore_errors=True)
    return final.uri


def read_events(
    lake: Lake, name: str, args: EventsArgs, cursor: dict[str, Any] | None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The events of ``name``'s log after ``cursor``, and the end cursor."""
    from app.events import open_store  # the store's backends load only for this source

    store = open_store(lake, name, args)
    try:
        return store.read_since(cursor)
    finally:
        store.close()


def resolve_events(data: DataArgs, lake: Lake, args: EventsArgs, cache_dir: str) -> RawSource:
    """The raw source of an events ingest: previous version + events since its cursor.

    Args:
        data: The ``data`` section (``name``, ``event_weights``; no path).
        lake: The lake holding the dataset's versions and (embedded backend) its event log.
        args: The online store settings (``serve.events``).
        cache_dir: Where the raw files are materialised (the ingest's ``<lake>/raw``).

    Returns:
        A Parquet ``RawSource`` whose ``events`` says what was read; with no new event it has no
        files (the pipeline then returns the previous version).

    Raises:
        SourceError: when ``data.name`` has no version yet.
    """
    previous = previous_version(lake, data.name)
    start = previous.events_cursor
    events, end = read_events(lake, data.name, args, start)
    read = EventsRead(previous.version, start, dict(end), len(events))
    weighted = bool(data.event_weights)
    columns = EVENTS_COLUMNS if weighted else EVENTS_COLUMNS.model_copy(update={"event": None})
    n_previous = sum(previous.manifest.get("splits", {}).values())
    where = (
        f"{data.name}/{previous.version} ({n_previous} interactions) + {len(events)} "
        f"event(s) from the {args.backend} online store"
    )
    if not events:
        return RawSource([], "parquet", columns, events=read, description=where)
    folder = Lake(materialise(previous, events, read, cache_dir))
    names = [n for n in folder.listdir("") if n.endswith(".parquet")]
    paths = [folder.full_uri(n) for n in names]
    mine = tuple(p for p, n in zip(paths, names, strict=True) if n.startswith(EVENT_FILES_PREFIX))
    read = replace(read, event_files=mine)
    return RawSource(
        paths,
        "parquet",
        columns,
        timestamp_unit="s",
        item_features=folder.full_uri(ITEMS_FILE) if folder.exists(ITEMS_FILE) else None,
        item_features_id_column="item_id",
        genres_column="genres",
        event_weights={**data.event_weights, PREVIOUS_EVENT: 1.0} if weighted else None,
        events=read,
        description=f"{where} at {folder.uri}",
    )
