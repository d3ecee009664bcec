"""Ingest logic without Ray: reading, validation, dedupe and the temporal split."""

import math

import pyarrow as pa
import pytest

from app.data import (
    DUPLICATE,
    QUARANTINED,
    IngestError,
    _csv_batches,
    _jsonl_batches,
    dedupe_and_split,
    item_order_key,
)

SPEC = {
    "user": "userId",
    "item": "movieId",
    "timestamp": "timestamp",
    "rating": "rating",
    "weight": None,
    "event": None,
    "event_weights": {},
    "timestamp_unit": "s",
    "delimiter": ",",
    "encoding": "utf-8",
}


def _read_csv(path, **spec):
    tables = list(_csv_batches(str(path), {**SPEC, **spec}))
    return pa.concat_tables(tables) if tables else None


def test_good_csv_rows_are_normalised(tmp_path):
    p = tmp_path / "r.csv"
    p.write_text("userId,movieId,rating,timestamp\n1,10,4.5,100\n2,20.0,3,200\n")
    t = _read_csv(p)
    assert t.column("reason").null_count == 2
    assert t.column("user").to_pylist() == ["1", "2"]
    assert t.column("item").to_pylist() == ["10", "20.0"]
    assert t.column("ts").to_pylist() == [100, 200]
    assert t.column("w").to_pylist() == [4.5, 3.0]


def test_bad_rows_get_a_reason_each(tmp_path):
    p = tmp_path / "r.csv"
    p.write_text(
        "userId,movieId,rating,timestamp\n"
        "1,10,4,100\n"
        ",10,4,100\n"  # missing user
        "1,,4,100\n"  # missing item
        "1,11,4,yesterday\n"  # unparsable timestamp
        "1,12,-1,100\n"  # negative weight
        "1,13,abc,100\n"  # non-numeric rating
        "1,14,4,-5\n"  # negative timestamp
        "1,15\n"  # truncated row
    )
    t = _read_csv(p)
    reasons = [r for r in t.column("reason").to_pylist() if r]
    assert t.num_rows == 8
    assert sorted(reasons) == sorted(
        [
            "missing user id",
            "missing item id",
            "missing or unparsable timestamp",
            "negative rating",
            "non-numeric rating",
            "missing or unparsable timestamp",
            "malformed CSV row: expected 4 fields, got 2",
        ]
    )
    bad = t.filter(pa.compute.is_valid(t.column("reason")))
    assert all(r for r in bad.column("raw").to_pylist())


def test_truncated_last_line_is_quarantined(tmp_path):
    p = tmp_path / "r.csv"
    p.write_bytes(b"userId,movieId,rating,timestamp\n1,10,4,100\n2,20,3,200\n3,3")
    t = _read_csv(p)
    assert t.num_rows == 3
    assert t.column("reason").to_pylist()[-1].startswith("malformed CSV row")


def test_non_utf8_values_are_quarantined(tmp_path):
    p = tmp_path / "r.csv"
    p.write_bytes(b"userId,movieId,rating,timestamp\n1,10,4,100\n\xff\xfe,11,4,100\n")
    t = _read_csv(p)
    assert t.num_rows == 2
    assert t.column("reason").to_pylist() == [None, "column userId: not valid UTF-8"]


def test_latin1_with_declared_encoding(tmp_path):
    p = tmp_path / "r.csv"
    p.write_bytes("userId,movieId,rating,timestamp\nJosé,10,4,100\n".encode("latin-1"))
    t = _read_csv(p, encoding="latin-1")
    assert t.column("user").to_pylist() == ["José"]


def test_wrong_delimiter_says_which_to_use(tmp_path):
    p = tmp_path / "r.csv"
    p.write_text("userId;movieId;rating;timestamp\n1;10;4;100\n")
    with pytest.raises(IngestError, match=r"data.delimiter=';'"):
        _read_csv(p)


def test_missing_column_is_named(tmp_path):
    p = tmp_path / "r.csv"
    p.write_text("userId,rating,timestamp\n1,4,100\n")
    with pytest.raises(IngestError, match=r"missing column\(s\) movieId"):
        _read_csv(p)


def test_empty_file_yields_nothing(tmp_path):
    p = tmp_path / "r.csv"
    p.write_bytes(b"")
    assert _read_csv(p) is None


def test_one_row_file(tmp_path):
    p = tmp_path / "r.csv"
    p.write_text("userId,movieId,rating,timestamp\n7,70,5,1000")
    t = _read_csv(p)
    assert t.num_rows == 1 and t.column("reason").null_count == 1


def test_jsonl_bad_lines_are_quarantined(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text(
        '{"userId": 1, "movieId": 10, "rating": 4, "timestamp": 100}\n'
        "{not json\n"
        "[1, 2]\n"
        '{"userId": 2, "movieId": 20, "rating": 4}\n'
    )
    t = pa.concat_tables(list(_jsonl_batches(str(p), SPEC)))
    assert t.num_rows == 4
    reasons = sorted(r for r in t.column("reason").to_pylist() if r)
    assert reasons[0].startswith("JSON line is not an object")
    assert reasons[1].startswith("invalid JSON")
    assert reasons[2] == "missing or unparsable timestamp"


def test_iso_and_millisecond_timestamps(tmp_path):
    p = tmp_path / "r.csv"
    p.write_text("userId,movieId,rating,timestamp\n1,10,4,2020-01-01T00:00:10Z\n1,11,4,nope\n")
    t = _read_csv(p, timestamp_unit="iso")
    assert t.column("ts").to_pylist()[0] == 1577836810
    assert t.column("reason").to_pylist()[1] == "missing or unparsable timestamp"
    p.write_text("userId,movieId,rating,timestamp\n1,10,4,1577836810500\n")
    assert _read_csv(p, timestamp_unit="ms").column("ts").to_pylist() == [1577836810]


def test_item_order_key_is_numeric_for_digit_ids():
    keys = item_order_key(pa.array(["10", "9", "b", "100", "a"])).to_pylist()
    order = sorted(range(5), key=lambda i: keys[i])
    assert [["10", "9", "b", "100", "a"][i] for i in order] == ["9", "10", "100", "a", "b"]


def _rows(events):
    n = len(events)
    return pa.table(
        {
            "file": ["f"] * n,
            "row": list(range(n)),
            "user": [e[0] for e in events],
            "item": [e[1] for e in events],
            "ts": [e[2] for e in events],
            "w": pa.array([1.0] * n, pa.float32()),
            "reason": pa.array([e[3] if len(e) > 3 else None for e in events], pa.string()),
            "raw": pa.array([None] * n, pa.string()),
        }
    )


def test_duplicates_collapse_at_first_event():
    out = dedupe_and_split(
        _rows([("u", "1", 50), ("u", "1", 10), ("u", "2", 20), ("u", "1", 30)]), 0.2, 0.1
    )
    rows = out.to_pylist()
    kept = [r for r in rows if r["status"] != DUPLICATE]
    assert sorted((r["item"], r["ts"]) for r in kept) == [("1", 10), ("2", 20)]
    assert sum(r["status"] == DUPLICATE for r in rows) == 2


def test_bad_rows_pass_through_as_quarantined():
    out = dedupe_and_split(_rows([("u", "1", 1), (None, None, 0, "missing user id")]), 0.2, 0.1)
    assert sorted(out.column("status").to_pylist()) == [QUARANTINED, "test"]


@pytest.mark.parametrize("n", [1, 2, 3, 5, 9, 10, 15, 23])
def test_split_sizes_follow_the_protocol(n):
    events = [("u", str(i), 1000 + i) for i in range(n)]
    out = dedupe_and_split(_rows(events), 0.2, 0.1).to_pylist()
    n_test = math.ceil(0.2 * n - 1e-9)
    n_valid = math.ceil(0.1 * (n - n_test) - 1e-9)
    splits = ("train", "valid", "test")
    by = {s: sorted(int(r["item"]) for r in out if r["status"] == s) for s in splits}
    assert len(by["test"]) == n_test
    assert len(by["valid"]) == n_valid
    assert len(by["train"]) == n - n_test - n_valid
    # The latest interactions are test, the ones before them validation.
    assert by["test"] == list(range(n - n_test, n))
    assert by["valid"] == list(range(n - n_test - n_valid, n - n_test))


def test_time_ties_go_to_the_lower_item_id():
    # Same timestamp for all: order by numeric item id, so "10" is the latest.
    events = [("u", i, 5) for i in ["10", "9", "2", "1", "3"]]
    out = dedupe_and_split(_rows(events), 0.2, 0.1).to_pylist()
    assert [r["item"] for r in out if r["status"] == "test"] == ["10"]
    assert [r["item"] for r in out if r["status"] == "valid"] == ["9"]


def test_users_are_split_independently():
    events = [("a", str(i), i) for i in range(10)] + [("b", str(i), 100 - i) for i in range(5)]
    out = dedupe_and_split(_rows(events), 0.2, 0.1).to_pylist()
    test_b = [r["item"] for r in out if r["user"] == "b" and r["status"] == "test"]
    assert test_b == ["0"]  # b's latest event is item 0 (ts 100)
    assert sum(r["user"] == "a" and r["status"] == "test" for r in out) == 2
