"""The ingest passes without Ray: bucket hashing, the split core, and ``run`` with its tasks run
in this process (``_map_tasks`` replaced), including a task retried after writing its files."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from app import ingest
from app.config import load_config
from app.ingest import pipeline
from app.ingest.buckets import TASK, bucket_of
from app.ingest.split import DUPLICATE_CODE, split_codes
from app.store import Lake

HEADER = "userId,movieId,rating,timestamp\n"
_MASK = (1 << 64) - 1


def _reference_bucket(text: str, n: int) -> int:
    """``bucket_of`` in plain Python: FNV-1a over the length and the last 32 bytes, reversed."""
    data = text.encode()
    h = (0xCBF29CE484222325 ^ len(data)) * 0x100000001B3 & _MASK
    for b in reversed(data[-32:]):
        h = (h ^ b) * 0x100000001B3 & _MASK
    for mult in (0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53):
        h ^= h >> 33
        h = h * mult & _MASK
    h ^= h >> 33
    return h % n


def test_bucket_of_is_plain_arithmetic_on_the_bytes():
    ids = ["1", "42", "user-0001", "ü", "", "x" * 100, "x" * 99 + "y"]
    got = bucket_of(pa.array(ids), 7).tolist()
    assert got == [_reference_bucket(i, 7) for i in ids]
    # Slices and chunked arrays see the same ids.
    arr = pa.array(["pad", *ids])
    assert bucket_of(arr.slice(1), 7).tolist() == got
    assert bucket_of(pa.chunked_array([ids[:3], ids[3:]]), 7).tolist() == got
    assert bucket_of(pa.array(ids, pa.large_string()), 7).tolist() == got
    assert bucket_of(pa.array([], pa.string()), 7).tolist() == []
    spread = np.bincount(bucket_of(pa.array([str(i) for i in range(20_000)]), 8))
    assert spread.min() > 2_000  # about 2,500 each


def _reference_split(user, item, ts, tf, vf):
    """Per user: first event per item in (ts, item, input) order, then the last ceil(...)."""
    status = {}
    for u in set(user):
        rows = sorted((ts[k], item[k], k) for k in range(len(user)) if user[k] == u)
        seen, kept = set(), []
        for _, i, k in rows:
            if i in seen:
                status[k] = DUPLICATE_CODE
            else:
                seen.add(i)
                kept.append(k)
        n = len(kept)
        n_test = math.ceil(round(n * tf, 9))
        n_valid = math.ceil(round((n - n_test) * vf, 9))
        for rank, k in enumerate(kept):
            from_end = n - 1 - rank
            status[k] = 2 if from_end < n_test else 1 if from_end < n_test + n_valid else 0
    return status


@pytest.mark.parametrize("wide", [False, True])
def test_split_codes_matches_a_reference(wide):
    rng = np.random.default_rng(1)
    n = 3_000
    user = rng.integers(0, 80, n)
    item = rng.integers(0, 30, n)
    # Wide times do not fit the packed sort key: the lexsort path must agree.
    ts = rng.integers(0, 2**62 if wide else 50, n)
    order, status = split_codes(user, item, ts, 0.2, 0.1)
    assert sorted(order.tolist()) == list(range(n))
    got = dict(zip(order.tolist(), status.tolist(), strict=True))
    assert got == _reference_split(user.tolist(), item.tolist(), ts.tolist(), 0.2, 0.1)
    keys = list(zip(user[order], ts[order], item[order], strict=True))
    assert keys == sorted(keys)


def _in_process(monkeypatch, retry: bool = False, cpus: int = 2) -> list[str]:
    """Run the passes' tasks here; with ``retry`` each task runs twice and its first result is
    lost, as when Ray retries a task whose worker died after it wrote its files."""
    calls: list[str] = []

    def run_tasks(fn, tasks, ctx, prof):
        for task in tasks:
            batch = pa.table({TASK: [json.dumps(task)]})
            if retry:
                fn(batch, ctx)
            calls.append(fn.__name__)
            yield pipeline.raise_reported(fn(batch, ctx))

    monkeypatch.setattr(pipeline, "_map_tasks", run_tasks)
    monkeypatch.setattr(pipeline, "_cluster_cpus", lambda: cpus)
    return calls


def _write_inputs(folder: Path) -> None:
    folder.mkdir()
    rows_a = [f"{u},{i},4,{1000 + u * 10 + i}" for u in range(12) for i in range(6)]
    (folder / "a.csv").write_text(HEADER + "\n".join(rows_a) + "\n")
    # (3, 1, ts 1031) repeats a.csv's row exactly: the later file's copy is the duplicate.
    (folder / "b.csv").write_text(HEADER + "3,1,5,1031\n3,1,4,1\n9,1,-2,100\n20,2,4,never\n")


def _ingest(tmp_path: Path, raw: Path):
    cfg = load_config(
        None,
        [
            f"lake={tmp_path / 'lake'}",
            "data.name=toy",
            "data.source=files",
            f"data.path={raw}",
            "data.columns.rating=rating",
        ],
    )
    return ingest.run(cfg.data, Lake(cfg.lake))


def _published(ds) -> Counter:
    users = ds.users().column("user_id").to_pylist()
    items = ds.items().column("item_id").to_pylist()
    out: Counter = Counter()
    for split in ("train", "valid", "test"):
        t = ds.read_table(split).to_pydict()
        out.update(
            (split, users[u], items[i], ts)
            for u, i, ts in zip(t["user_idx"], t["item_idx"], t["timestamp"], strict=True)
        )
    return out


def test_run_in_process_accounts_for_every_row(monkeypatch, tmp_path):
    calls = _in_process(monkeypatch)
    raw = tmp_path / "raw"
    _write_inputs(raw)
    ds = _ingest(tmp_path, raw)
    m = ds.manifest
    files = {Path(f["path"]).name: f for f in m["files"]}
    assert files["a.csv"] == {
        "path": str(raw / "a.csv"),
        "rows_read": 72,
        "rows_ingested": 71,
        "rows_quarantined": 0,
        "duplicates_collapsed": 1,  # (3, 1) at 1031: b.csv's event at ts 1 is earlier
    }
    b = files["b.csv"]
    assert (b["rows_read"], b["rows_ingested"], b["rows_quarantined"]) == (4, 1, 2)
    assert b["duplicates_collapsed"] == 1  # the exact repeat of a.csv's row
    assert (m["n_users"], m["n_items"]) == (12, 6)
    assert ds.users().column("user_id").to_pylist() == [str(u) for u in range(12)]
    assert m["ingest"]["buckets"] == 2 and calls.count("read_unit") == 2
    assert sum(_published(ds).values()) == m["rows_ingested"] == 72
    q = pq.read_table(m["quarantine"]["path"])
    assert sorted(q.column("reason").to_pylist()) == [
        "missing or unparsable timestamp",
        "negative rating",
    ]
    assert not (tmp_path / "lake" / "tmp" / f"ingest-toy-{ds.version}").exists()


def test_a_retried_task_neither_double_counts_nor_publishes_twice(monkeypatch, tmp_path):
    raw = tmp_path / "raw"
    _write_inputs(raw)
    _in_process(monkeypatch)
    once = _ingest(tmp_path / "once", raw)
    _in_process(monkeypatch, retry=True, cpus=3)
    twice = _ingest(tmp_path / "twice", raw)
    keys = ("rows_read", "rows_ingested", "rows_quarantined", "duplicates_collapsed", "splits")
    assert {k: twice.manifest[k] for k in keys} == {k: once.manifest[k] for k in keys}
    assert _published(twice) == _published(once)
    listed = twice.manifest["split_files"]
    on_disk = {
        f"{s}/{p.name}" for s in listed for p in Path(twice.lake.path(twice.rel, s)).iterdir()
    }
    assert on_disk > {f for files in listed.values() for f in files}  # the lost attempts' files


def test_an_input_problem_in_a_task_is_an_ingest_error(monkeypatch, tmp_path):
    _in_process(monkeypatch)
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "r.jsonl").write_text('{"a": 1}\n')
    cfg = load_config(
        None, [f"lake={tmp_path}", "data.source=files", f"data.path={raw}", "data.format=jsonl"]
    )
    with pytest.raises(ingest.IngestError):
        ingest.run(cfg.data, Lake(cfg.lake))
