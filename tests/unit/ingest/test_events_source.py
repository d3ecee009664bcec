"""The events source without Ray: previous version + logged events -> raw Parquet rows.

``_stage`` runs the pipeline's own per-row steps in process (``parquet_table`` normalises each
file, ``dedupe_and_split`` dedupes and splits, ``build_manifest`` checks the accounting), so the
counts here are those a Ray ingest of the same files reports.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from app.config import DataArgs, EventsArgs
from app.events import open_store
from app.ingest import SourceError, resolve_source
from app.ingest.events_source import (
    PREVIOUS_EVENT,
    RAW_SCHEMA,
    event_rows,
    folder_name,
    id_array,
    previous_rows,
    write_shards,
)
from app.ingest.idmaps import id_table, item_genres
from app.ingest.manifest import build_manifest
from app.ingest.readers import parquet_table, reader_spec
from app.ingest.sources import RawSource, fingerprint
from app.ingest.split import DUPLICATE, QUARANTINED, STATUS, dedupe_and_split
from app.ingest.validate import FILE, ITEM, REASON, USER, W
from app.store import GENRES, ITEM_ID, ITEM_IDX, SPLITS, Lake, events_cursor, write_dataset

NAME = "toy"
T0 = 1_700_000_000


def _event(eid: str, user: Any, item: Any, ts: Any = T0 + 100, kind: str = "view") -> dict:
    return {
        "event_id": eid,
        "user_id": user,
        "item_id": item,
        "event": kind,
        "timestamp": ts,
        "received_at": T0 + 200,
    }


def _previous(lake: Lake, version: str = "v1", **manifest: Any) -> None:
    """Users u1, u2 and items 10, 20, 30 (with genres); 4 interactions, weights 1..4."""
    rows = {
        "user_idx": [0, 0, 1, 1],
        "item_idx": [0, 1, 1, 2],
        "timestamp": [T0, T0 + 1, T0 + 2, T0 + 3],
        "weight": [1.0, 2.0, 3.5, 4.0],
    }
    splits = {
        "train": {k: v[:2] for k, v in rows.items()},
        "valid": {k: v[2:3] for k, v in rows.items()},
        "test": {k: v[3:] for k, v in rows.items()},
    }
    genres = [["Drama"], [], ["Crime", "Drama"]]
    write_dataset(lake, NAME, version, splits, ["u1", "u2"], ["10", "20", "30"], genres, **manifest)


def _stage(src: RawSource, data: DataArgs) -> tuple[pa.Table, dict[str, Any]]:
    """The pipeline's row steps and manifest over ``src``: (staged rows, manifest)."""
    spec = reader_spec(src, data)
    if src.event_weights is not None:
        spec["event_weights"] = dict(src.event_weights)
    rows_read, normal = {}, []
    for path in src.paths:
        table = pq.read_table(path)
        rows_read[path] = table.num_rows
        normal.append(parquet_table(table, path, spec))
    staged = dedupe_and_split(pa.concat_tables(normal), data.test_fraction, data.valid_fraction)
    by_file: dict[str, dict[str, int]] = {}
    for r in staged.group_by([FILE, STATUS]).aggregate([([], "count_all")]).to_pylist():
        by_file.setdefault(r[FILE], {})[r[STATUS]] = r["count_all"]
    bad = staged.filter(pc.equal(staged.column(STATUS), QUARANTINED))
    reasons = {
        r[REASON]: r["count_all"]
        for r in bad.group_by([REASON]).aggregate([([], "count_all")]).to_pylist()
    }
    good = staged.filter(pc.is_in(staged.column(STATUS), pa.array(SPLITS)))
    users = id_table(pc.unique(good.column(USER)).to_pylist(), "user_idx", "user_id")
    items = item_genres(src, id_table(pc.unique(good.column(ITEM)).to_pylist(), ITEM_IDX, ITEM_ID))
    prints = fingerprint(src.paths)
    manifest = build_manifest(
        data, src, "v2", prints, rows_read, by_file, reasons, users, items, None, []
    )
    return staged, {"manifest": manifest, "items": items}


def _weights(staged: pa.Table) -> dict[tuple[str, str], float]:
    """Weight of each ingested (user, item) pair; fails when a pair is ingested twice."""
    good = staged.filter(pc.is_in(staged.column(STATUS), pa.array(SPLITS)))
    cols = (good.column(USER).to_pylist(), good.column(ITEM).to_pylist())
    pairs = list(zip(*cols, strict=True))
    assert len(set(pairs)) == len(pairs)
    return dict(zip(pairs, good.column(W).to_pylist(), strict=True))


@pytest.fixture
def lake(tmp_path: Path) -> Lake:
    return Lake(str(tmp_path / "lake"))


def _append(lake: Lake, events: list[dict]) -> None:
    store = open_store(lake, NAME, EventsArgs())
    try:
        store.append(events)
    finally:
        store.close()


def _resolve(lake: Lake, **data: Any) -> RawSource:
    return resolve_source(
        DataArgs(name=NAME, source="events", **data), lake.full_uri("raw"), lake=lake
    )


def test_events_source_needs_no_path() -> None:
    assert DataArgs(source="events").path == ""


def test_event_rows_keep_every_event_as_text() -> None:
    events = [
        _event("a", "u1", "10"),
        _event("b", "", "20"),  # blank user
        _event("c", "u1", None),  # no item
        _event("d", 7, 30.0, ts="soon"),  # numbers as ids, a bad timestamp
        _event("e", "u2", "10", ts=float("nan")),
        _event("f", "u2", "10", ts=T0 + 0.5),
        _event("g", "u2", "10", ts=None),
    ]
    t = event_rows(events)
    assert t.schema == RAW_SCHEMA and t.num_rows == len(events)
    assert t.column("user_id").to_pylist() == ["u1", "", "u1", "7", "u2", "u2", "u2"]
    assert t.column("item_id").to_pylist() == ["10", "20", None, "30", "10", "10", "10"]
    ts = t.column("timestamp").to_pylist()
    assert ts == [str(T0 + 100)] * 3 + ["soon", "nan", f"{T0}.5", None]
    assert t.column("weight").to_pylist() == [1.0] * 7
    assert t.column("event").to_pylist() == ["view"] * 7
    assert event_rows([]).num_rows == 0


def test_previous_rows_map_indices_back_to_external_ids() -> None:
    users = pa.table({"user_idx": pa.array([1, 0], pa.int32()), "user_id": ["b", "a"]})
    user_ids = id_array(users, "user_idx", "user_id")
    assert user_ids.to_pylist() == ["a", "b"]
    batch = pa.table(
        {
            "user_idx": pa.array([1, 0], pa.int32()),
            "item_idx": pa.array([0, 0], pa.int32()),
            "timestamp": pa.array([5, 6], pa.int64()),
            "weight": pa.array([0.1, 2.0], pa.float32()),
        }
    )
    t = previous_rows(batch, user_ids, pa.array(["i0"]))
    assert t.to_pydict() == {
        "user_id": ["b", "a"],
        "item_id": ["i0", "i0"],
        "timestamp": ["5", "6"],
        "weight": [pc.cast(pa.array([0.1], pa.float32()), pa.float64())[0].as_py(), 2.0],
        "event": [PREVIOUS_EVENT] * 2,
    }


def test_write_shards_caps_rows_per_file(tmp_path: Path) -> None:
    t = event_rows([_event(str(i), "u", str(i)) for i in range(5)])
    names = write_shards([t.slice(0, 2), t.slice(2)], str(tmp_path), "events", None, 2)
    assert names == ["events-00000.parquet", "events-00001.parquet", "events-00002.parquet"]
    back = pa.concat_tables([pq.read_table(tmp_path / n) for n in names])
    assert back.equals(t)
    assert write_shards([event_rows([])], str(tmp_path), "none", None) == []


def test_missing_previous_version_names_the_dataset_and_the_lake(lake: Lake) -> None:
    with pytest.raises(SourceError) as err:
        _resolve(lake)
    msg = str(err.value)
    assert repr(NAME) in msg and lake.uri in msg
    assert "ingest the dataset once from its raw source first" in msg
    with pytest.raises(SourceError, match="lake"):
        resolve_source(DataArgs(name=NAME, source="events"), "unused")


def test_folder_name_depends_only_on_version_and_cursors() -> None:
    end = {"backend": "embedded", "files": {"a.log": 10}}
    assert folder_name("v1", None, end) == folder_name("v1", None, dict(end))
    assert folder_name("v1", None, end).startswith("v1-")
    assert folder_name("v1", None, end) != folder_name("v1", None, {**end, "files": {"a.log": 11}})
    assert folder_name("v1", None, end) != folder_name("v2", None, end)


def test_previous_version_plus_events_every_row_accounted_once(lake: Lake) -> None:
    _previous(lake)
    events = [
        _event("e1", "u1", "30"),  # new pair
        _event("e2", "u3", "40", ts=T0 + 5.9),  # new user and item; time floored
        _event("e3", "u1", "10"),  # repeats a previous pair: collapses as a duplicate
        _event("e4", "", "20"),  # quarantined: blank user
        _event("e5", "u2", "20", ts="later"),  # quarantined: bad timestamp
        _event("e1", "u1", "30"),  # a retry: the store logs it once
    ]
    _append(lake, events)
    src = _resolve(lake)
    assert src.format == "parquet" and src.events is not None
    assert (src.events.previous_version, src.events.start_cursor) == ("v1", None)
    assert src.events.n_events == 5 and src.events.end_cursor["files"]
    assert len(src.events.event_files) == 1
    staged, out = _stage(src, DataArgs(name=NAME, source="events"))
    m = out["manifest"]
    assert m["rows_read"] == 4 + 5
    assert m["rows_read"] == m["rows_ingested"] + m["rows_quarantined"] + m["duplicates_collapsed"]
    assert (m["rows_ingested"], m["rows_quarantined"], m["duplicates_collapsed"]) == (6, 2, 1)
    assert (m["events_read"], m["events_ingested"]) == (5, 2)
    assert (m["events_quarantined"], m["events_duplicates"]) == (2, 1)
    assert m["events_cursor"] == src.events.end_cursor
    assert m["events_previous_version"] == "v1"
    assert m["quarantine"]["reasons"] == {
        "missing user id": 1,
        "missing or unparsable timestamp": 1,
    }
    # every pair once, previous weights kept, events weigh 1
    assert _weights(staged) == {
        ("u1", "10"): 1.0,
        ("u1", "20"): 2.0,
        ("u2", "20"): 3.5,
        ("u2", "30"): 4.0,
        ("u1", "30"): 1.0,
        ("u3", "40"): 1.0,
    }
    dup = staged.filter(pc.equal(staged.column(STATUS), DUPLICATE))
    assert dup.column(FILE).to_pylist() == list(src.events.event_files)
    items = out["items"]
    ids, lists = items.column(ITEM_ID).to_pylist(), items.column(GENRES).to_pylist()
    want = {"10": ["Drama"], "20": [], "30": ["Crime", "Drama"], "40": []}
    assert dict(zip(ids, lists, strict=True)) == want


def test_rerun_reuses_the_files_and_nothing_new_reads_nothing(lake: Lake) -> None:
    _previous(lake)
    _append(lake, [_event("e1", "u1", "30")])
    first = _resolve(lake)
    stamps = {p: os.stat(p).st_mtime_ns for p in first.paths}
    again = _resolve(lake)
    assert again == first
    assert fingerprint(again.paths) == fingerprint(first.paths)
    assert {p: os.stat(p).st_mtime_ns for p in again.paths} == stamps
    # A version holding those events (as the pipeline publishes it): nothing new after it.
    assert first.events is not None
    _previous(
        lake, "v2", created_at="2999-01-01T00:00:00+00:00", events_cursor=first.events.end_cursor
    )
    assert events_cursor(lake, NAME, "v2") == first.events.end_cursor
    assert events_cursor(lake, NAME, "v1") is None
    idle = _resolve(lake)
    assert idle.paths == [] and idle.events is not None
    assert (idle.events.previous_version, idle.events.n_events) == ("v2", 0)
    # New events after it: only those are read, into a new folder.
    _append(lake, [_event("e2", "u2", "10"), _event("e1", "u1", "30")])
    later = _resolve(lake)
    assert later.events is not None and later.events.n_events == 1
    assert later.events.start_cursor == first.events.end_cursor
    assert os.path.dirname(later.paths[0]) != os.path.dirname(first.paths[0])
    rows = pq.read_table(later.events.event_files[0])
    assert rows.column("user_id").to_pylist() == ["u2"]


def test_event_weights_weigh_events_and_keep_previous_weights(lake: Lake) -> None:
    _previous(lake)
    _append(
        lake,
        [
            _event("e1", "u3", "10", kind="purchase"),
            _event("e2", "u3", "20", kind="view"),
            _event("e3", "u3", "30", kind="click"),  # not weighted: quarantined
        ],
    )
    data = DataArgs(name=NAME, source="events", event_weights={"view": 1.0, "purchase": 5.0})
    src = resolve_source(data, lake.full_uri("raw"), lake=lake)
    assert src.columns.event == "event" and src.event_weights is not None
    assert src.event_weights[PREVIOUS_EVENT] == 1.0
    staged, out = _stage(src, data)
    assert _weights(staged) == {
        ("u1", "10"): 1.0,
        ("u1", "20"): 2.0,
        ("u2", "20"): 3.5,
        ("u2", "30"): 4.0,
        ("u3", "10"): 5.0,
        ("u3", "20"): 1.0,
    }
    assert out["manifest"]["quarantine"]["reasons"] == {"unknown event value": 1}
    assert out["manifest"]["events_quarantined"] == 1
