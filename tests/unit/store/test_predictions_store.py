"""Tests for app.store.predictions: publishing, reading and the immutability of predictions."""

from __future__ import annotations

import os
import posixpath

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from app.store import (
    PREDICTION_SCHEMA,
    Lake,
    LakeError,
    load_predictions,
    predictions_rel,
    read_predictions,
    write_predictions,
)

TABLE = pa.table(
    {"user_id": ["u0", "u1"], "items": [["a", "b"], ["c"]], "scores": [[0.9, 0.5], [0.7]]},
    schema=PREDICTION_SCHEMA,
)


def _writer(lake: Lake, calls: list[str], table: pa.Table = TABLE):
    def write(stage: str) -> None:
        calls.append(stage)
        half = table.num_rows // 2
        for i, part in enumerate((table.slice(0, half), table.slice(half))):
            pq.write_table(
                part, posixpath.join(stage, f"part-{i}.parquet"), filesystem=lake.arrow_fs
            )

    return write


def _manifest(k: int = 2) -> dict:
    return {"model": "tiny-mf", "model_version": "v1", "k": k}


def test_write_then_read_and_load(tmp_lake: Lake) -> None:
    calls: list[str] = []
    manifest = write_predictions(tmp_lake, "v1", _writer(tmp_lake, calls), _manifest(), n_users=2)
    assert len(calls) == 1
    assert manifest["users"] == 2 and manifest["k"] == 2 and manifest["created_at"]
    assert manifest["columns"] == ["user_id", "items", "scores"]
    assert tmp_lake.is_published(predictions_rel("v1"))
    assert read_predictions(tmp_lake, "latest").equals(TABLE)
    loaded = load_predictions(tmp_lake.uri, "v")  # a unique prefix
    assert {u: items for u, (items, _) in loaded.items()} == {"u0": ["a", "b"], "u1": ["c"]}
    assert loaded["u0"][1] == pytest.approx([0.9, 0.5]) and loaded["u1"][1] == pytest.approx([0.7])


def test_same_k_again_is_a_no_op_other_k_is_refused(tmp_lake: Lake) -> None:
    first = write_predictions(tmp_lake, "v1", _writer(tmp_lake, []), _manifest(), n_users=2)
    calls: list[str] = []
    again = write_predictions(tmp_lake, "v1", _writer(tmp_lake, calls), _manifest(), n_users=2)
    assert calls == [] and again == first
    with pytest.raises(LakeError, match="holds k=2 predictions"):
        write_predictions(tmp_lake, "v1", _writer(tmp_lake, calls), _manifest(k=5), n_users=2)
    assert calls == []


def test_wrong_row_count_publishes_nothing(tmp_lake: Lake) -> None:
    with pytest.raises(LakeError, match="wrote 2 rows for 3 users"):
        write_predictions(tmp_lake, "v1", _writer(tmp_lake, []), _manifest(), n_users=3)
    assert not tmp_lake.is_published(predictions_rel("v1"))
    assert os.listdir(tmp_lake.path("predictions")) == []
    with pytest.raises(LakeError, match="no published versions"):
        read_predictions(tmp_lake)
