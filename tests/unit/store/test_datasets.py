"""Tests for app.store.datasets: write/load round trip, bad input, item genres, pickling."""

from __future__ import annotations

import io
import pickle
import posixpath

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp

from app.store import (
    GENRES,
    INTERACTION_SCHEMA,
    ITEM_ID,
    ITEM_IDX,
    TIMESTAMP,
    USER_ID,
    USER_IDX,
    WEIGHT,
    DatasetVersion,
    Lake,
    list_datasets,
    load_dataset,
    write_dataset,
)


def test_write_dataset_round_trips_through_load_dataset(tmp_lake: Lake) -> None:
    train = {USER_IDX: [0, 0, 1, 2], ITEM_IDX: [1, 3, 0, 2], TIMESTAMP: [10, 20, 30, 40]}
    valid = pa.table({USER_IDX: [1], ITEM_IDX: [2], WEIGHT: [2.5]})
    test = sp.csr_matrix(([1.0, 1.0], ([0, 2], [0, 3])), shape=(3, 4))
    written = write_dataset(
        tmp_lake,
        "toy",
        "v1",
        {"train": train, "valid": valid, "test": test},
        user_ids=["alice", "bob", "carol"],
        item_ids=["a", "b", "c", "d"],
        genres=[["x"], [], ["x", "y"], ["y"]],
        source={"kind": "unit-test"},
    )

    ds = load_dataset(tmp_lake.uri, "toy")
    assert list_datasets(tmp_lake, "toy") == ["v1"] and ds.version == written.version == "v1"
    assert (ds.n_users, ds.n_items) == (3, 4)
    m = ds.manifest
    assert m["splits"] == {"train": 4, "valid": 1, "test": 2} and m["n_interactions"] == 7
    assert m["source"] == {"kind": "unit-test"} and m["name"] == "toy" and m["created_at"]
    assert ds.users().to_pydict() == {USER_IDX: [0, 1, 2], USER_ID: ["alice", "bob", "carol"]}
    items = ds.items().to_pydict()
    assert items[ITEM_IDX] == [0, 1, 2, 3] and items[ITEM_ID] == ["a", "b", "c", "d"]
    assert items["genres"] == [["x"], [], ["x", "y"], ["y"]]
    assert ds.item_genres() == [["x"], [], ["x", "y"], ["y"]]

    t = ds.read_table("train")
    assert t.schema == INTERACTION_SCHEMA
    assert t.column(TIMESTAMP).to_pylist() == [10, 20, 30, 40]
    assert t.column(WEIGHT).to_pylist() == [1.0] * 4  # default weight
    v = ds.read_table("valid").to_pydict()
    assert v == {USER_IDX: [1], ITEM_IDX: [2], TIMESTAMP: [0], WEIGHT: [2.5]}
    assert (ds.csr("test") != test).nnz == 0
    expected = np.zeros((3, 4), np.float32)
    expected[[0, 0, 1, 2, 1], [1, 3, 0, 2, 2]] = 1.0
    np.testing.assert_array_equal(ds.csr("train", "valid").toarray(), expected)


def test_write_dataset_missing_split_is_empty_and_bad_input_publishes_nothing(tmp_lake: Lake):
    ds = write_dataset(
        tmp_lake, "toy", "v1", {"train": {USER_IDX: [0], ITEM_IDX: [0]}}, ["u"], ["i"]
    )
    assert ds.manifest["splits"] == {"train": 1, "valid": 0, "test": 0}
    assert ds.read_table("valid").num_rows == 0 and ds.items().column("genres").to_pylist() == [[]]

    with pytest.raises(ValueError, match="item_idx outside"):
        write_dataset(
            tmp_lake, "toy", "v2", {"train": {USER_IDX: [0], ITEM_IDX: [1]}}, ["u"], ["i"]
        )
    with pytest.raises(ValueError, match="unknown split"):
        write_dataset(tmp_lake, "toy", "v2", {"training": {USER_IDX: [], ITEM_IDX: []}}, [], [])
    assert list_datasets(tmp_lake, "toy") == ["v1"]


def test_write_dataset_again_keeps_the_published_version(tmp_lake: Lake) -> None:
    first = write_dataset(
        tmp_lake, "toy", "v1", {"train": {USER_IDX: [0], ITEM_IDX: [0]}}, ["u"], ["i"]
    )
    again = write_dataset(tmp_lake, "toy", "v1", {}, ["u", "w"], ["i"])
    assert again.manifest == first.manifest and again.n_users == 1


def _rewrite_items(lake: Lake, ds: DatasetVersion, items: pa.Table) -> DatasetVersion:
    buf = io.BytesIO()
    pq.write_table(items, buf)
    lake.write_bytes(posixpath.join(ds.rel, "items.parquet"), buf.getvalue())
    return load_dataset(lake, ds.name, ds.version)


def test_item_genres_follow_item_idx_not_row_order(tmp_lake: Lake) -> None:
    ds = write_dataset(tmp_lake, "toy", "v1", {}, ["u"], ["a", "b"], genres=[["x"], ["y"]])
    assert ds.item_genres() == [["x"], ["y"]]
    shuffled = pa.table({ITEM_IDX: [1, 0], ITEM_ID: ["b", "a"], GENRES: [["y"], None]})
    assert _rewrite_items(tmp_lake, ds, shuffled).item_genres() == [[], ["y"]]
    bare = pa.table({ITEM_IDX: [0, 1], ITEM_ID: ["a", "b"]})
    assert _rewrite_items(tmp_lake, ds, bare).item_genres() is None


def test_dataset_version_pickles_without_its_tables(tiny_dataset: DatasetVersion) -> None:
    tiny_dataset.csr("train")
    tiny_dataset.items()
    blob = pickle.dumps(tiny_dataset)
    copy = pickle.loads(blob)
    assert len(blob) < 4096  # lake URI + name + version + manifest only
    assert (copy.lake, copy.name, copy.version) == (
        tiny_dataset.lake,
        tiny_dataset.name,
        tiny_dataset.version,
    )
    assert copy.manifest == tiny_dataset.manifest
    assert (copy.csr("train") != tiny_dataset.csr("train")).nnz == 0
