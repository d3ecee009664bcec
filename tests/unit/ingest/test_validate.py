"""Validation without Ray: every bad value gets its quarantine reason, good values their type."""

import pyarrow as pa

from app.ingest.validate import bad_rows, normalise, wanted_columns


def test_bad_rows_get_a_reason_each(tmp_path, read_csv):
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
    t = read_csv(p)
    reasons = [r for r in t.column("reason").to_pylist() if r]
    assert t.num_rows == 8
    assert sorted(reasons) == sorted(
        [
            "missing user id",
            "missing item id",
            "missing or unparsable timestamp",
            "negative rating",
            "non-numeric rating",
            "timestamp out of range (1970-01-01 to 2262-04-11)",
            "malformed CSV row: expected 4 fields, got 2",
        ]
    )
    bad = t.filter(pa.compute.is_valid(t.column("reason")))
    assert all(r for r in bad.column("raw").to_pylist())


def test_non_utf8_values_are_quarantined(tmp_path, read_csv):
    p = tmp_path / "r.csv"
    p.write_bytes(b"userId,movieId,rating,timestamp\n1,10,4,100\n\xff\xfe,11,4,100\n")
    t = read_csv(p)
    assert t.num_rows == 2
    assert t.column("reason").to_pylist() == [None, "column userId: not valid UTF-8"]


def test_iso_and_millisecond_timestamps(tmp_path, read_csv):
    p = tmp_path / "r.csv"
    p.write_text("userId,movieId,rating,timestamp\n1,10,4,2020-01-01T00:00:10Z\n1,11,4,nope\n")
    t = read_csv(p, timestamp_unit="iso")
    assert t.column("ts").to_pylist()[0] == 1577836810
    assert t.column("reason").to_pylist()[1] == "missing or unparsable timestamp"
    # a bare number parses as a year (1000 AD): before 1970, so quarantined, never a crash
    p.write_text("userId,movieId,rating,timestamp\n1,10,4,1000\n1,11,4,2020-01-01T00:00:10Z\n")
    t = read_csv(p, timestamp_unit="iso")
    assert t.column("reason").to_pylist() == [
        "timestamp out of range (1970-01-01 to 2262-04-11)",
        None,
    ]
    p.write_text("userId,movieId,rating,timestamp\n1,10,4,1577836810500\n")
    assert read_csv(p, timestamp_unit="ms").column("ts").to_pylist() == [1577836810]


def _binary(**cols):
    return pa.table({k: pa.array([None if v is None else v.encode() for v in vs], pa.binary())
                     for k, vs in cols.items()})  # fmt: skip


def test_event_weights_multiply_and_unknown_events_are_quarantined(spec):
    spec = {**spec, "rating": None, "weight": "w", "event": "ev"}
    spec["event_weights"] = {"view": 1.0, "buy": 5.0}
    table = _binary(
        userId=["1", "1", "1", "1"],
        movieId=["2", "3", "4", "5"],
        timestamp=["3", "4", "5", "6"],
        w=["1", "2", "1", None],
        ev=["view", "buy", "zap", "view"],
    )
    t = normalise(table, "f", 10, spec)
    assert t.column("row").to_pylist() == [10, 11, 12, 13]
    assert t.column("w").to_pylist()[:2] == [1.0, 10.0]
    assert t.column("reason").to_pylist() == [None, None, "unknown ev value", "missing w"]
    assert t.column("user").to_pylist() == ["1", "1", None, None]


def test_wanted_columns_are_deduplicated(spec):
    assert wanted_columns({**spec, "weight": "rating"}) == [
        "userId",
        "movieId",
        "timestamp",
        "rating",
    ]


def test_bad_rows_carry_reason_and_raw_text():
    t = bad_rows("f.csv", [(3, "malformed", "1,2"), (7, "empty line", "")])
    assert t.column("row").to_pylist() == [3, 7]
    assert t.column("user").null_count == 2
    assert t.column("raw").to_pylist() == ["1,2", ""]
