"""The manifest's row accounting and its summary table, without Ray."""

import pyarrow as pa
import pytest

from app.config import DataArgs
from app.ingest import IngestError, RawSource, summary_table
from app.ingest.manifest import build_manifest
from app.ingest.movielens import MOVIELENS_COLUMNS

DATA = DataArgs(name="toy", path="/raw")
SRC = RawSource(
    paths=["a.csv", "b.csv"], format="csv", columns=MOVIELENS_COLUMNS, description="toy"
)
PRINTS = [{"path": "a.csv", "size": 10}, {"path": "b.csv", "size": 20}]
BY_FILE = {
    "a.csv": {"train": 3, "test": 1, "quarantined": 1},
    "b.csv": {"duplicate": 2, "valid": 1},
}
USERS = pa.table({"user_idx": pa.array([0, 1], pa.int32()), "user_id": ["1", "2"]})
ITEMS = pa.table(
    {
        "item_idx": pa.array([0, 1, 2], pa.int32()),
        "item_id": ["1", "2", "3"],
        "genres": [["Drama"], [], ["Crime", "Drama"]],
    }
)


def _manifest(rows_read, by_file=BY_FILE):
    return build_manifest(
        DATA, SRC, "v1", PRINTS, rows_read, by_file, {"bad": 1}, USERS, ITEMS, "/q/v1", ["w"]
    )


def test_manifest_accounts_for_every_row():
    m = _manifest({"a.csv": 5, "b.csv": 3})
    assert (m["rows_read"], m["rows_ingested"], m["rows_quarantined"]) == (8, 5, 1)
    assert m["duplicates_collapsed"] == 2
    assert m["splits"] == {"train": 3, "valid": 1, "test": 1}
    assert (m["n_users"], m["n_items"], m["items_with_genres"]) == (2, 3, 2)
    assert m["quarantine"] == {"reasons": {"bad": 1}, "path": "/q/v1", "files": []}
    assert "split_files" not in m
    assert m["warnings"] == ["w"]
    assert m["density"] == round(5 / 6, 6)
    assert [f["rows_read"] for f in m["files"]] == [5, 3]


def test_manifest_lists_the_split_and_quarantine_files():
    parts = {"train": ["train/part-a-b00000-x.parquet"], "valid": ["valid/e.parquet"], "test": []}
    m = build_manifest(
        DATA,
        SRC,
        "v1",
        PRINTS,
        {"a.csv": 5, "b.csv": 3},
        BY_FILE,
        {"bad": 1},
        USERS,
        ITEMS,
        "/q/v1",
        [],
        split_files=parts,
        quarantine_files=["u00000-t.parquet"],
        ingest={"buckets": 2},
    )
    assert m["split_files"] == parts
    assert m["quarantine"]["files"] == ["u00000-t.parquet"]
    assert m["ingest"] == {"buckets": 2}
    assert m["pipeline_version"] == 2


def test_rows_that_do_not_add_up_refuse_to_publish():
    with pytest.raises(IngestError, match="a.csv: read 6 rows but accounted for 5"):
        _manifest({"a.csv": 6, "b.csv": 3})
    with pytest.raises(IngestError, match="unknown files"):
        _manifest({"a.csv": 5, "b.csv": 3}, {**BY_FILE, "c.csv": {"train": 1}})


def test_summary_table_lists_files_total_and_reasons():
    text = summary_table(_manifest({"a.csv": 5, "b.csv": 3}))
    lines = text.splitlines()
    assert lines[0] == "dataset toy version v1"
    assert lines[3].split() == ["a.csv", "5", "4", "1", "0"]
    assert lines[5].split() == ["TOTAL", "8", "5", "1", "2"]
    assert "train 3  valid 1  test 1" in text
    assert lines[-1].split() == ["quarantined", "1", "bad"]
