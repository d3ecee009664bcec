"""Dedupe and the temporal split without Ray: first event per pair, per-user split sizes."""

import math

import pyarrow as pa
import pytest

from app.ingest import dedupe_and_split, item_order_key
from app.ingest.split import DUPLICATE, QUARANTINED


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


def test_id_order_breaks_key_ties_by_text():
    from app.ingest.idmaps import id_table

    ids = ["7", "10", "b", "007", "a", "9"]
    for shuffled in (ids, ids[::-1]):
        table = id_table(shuffled, "idx", "id")
        assert table.column("id").to_pylist() == ["007", "7", "9", "10", "a", "b"]
        assert table.column("idx").to_pylist() == list(range(6))
