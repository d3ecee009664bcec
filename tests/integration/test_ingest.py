"""Ray Data ingestion end to end on a real local Ray cluster (and a real S3 endpoint)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from app import ingest
from app.config import DataArgs, load_config
from app.store import Lake, load_dataset

ROOT = Path(__file__).resolve().parents[2]
ML_SMALL = ROOT.parent / "shared" / "data" / "ml-latest-small"
COUNTS = ("rows_ingested", "rows_quarantined", "duplicates_collapsed")


def _cfg(**over):
    args = [f"{k}={v}" for k, v in over.items()]
    return load_config(ROOT / "jobs/configs/ml-latest-small.yaml", args)


def _check_invariant(manifest):
    for f in manifest["files"]:
        assert f["rows_read"] == sum(f[k] for k in COUNTS), f
    assert manifest["rows_read"] == sum(manifest[k] for k in COUNTS)
    assert manifest["rows_ingested"] == sum(manifest["splits"].values())


@pytest.fixture(scope="module")
def ml_small(ray_cluster, tmp_path_factory):
    if not (ML_SMALL / "ratings.csv").exists():
        pytest.skip("ml-latest-small is not at ../shared/data")
    lake = tmp_path_factory.mktemp("lake")
    cfg = _cfg(lake=lake, **{"data.path": ML_SMALL})
    return cfg, ingest.run(cfg.data, Lake(cfg.lake))


def test_ml_latest_small_counts_and_splits(ml_small):
    cfg, ds = ml_small
    m = ds.manifest
    _check_invariant(m)
    assert m["rows_read"] == 100_836
    assert m["rows_quarantined"] == 0
    assert (m["n_users"], m["n_items"]) == (610, 9_724)
    # Independent computation of the protocol's split sizes with pandas.
    raw = pd.read_csv(ML_SMALL / "ratings.csv")
    n = raw.drop_duplicates(["userId", "movieId"]).groupby("userId").size()
    n_test = n.map(lambda x: math.ceil(x / 5))
    n_valid = (n - n_test).map(lambda x: math.ceil(x / 10))
    assert m["splits"] == {
        "test": int(n_test.sum()),
        "valid": int(n_valid.sum()),
        "train": int((n - n_test - n_valid).sum()),
    }
    assert m["duplicates_collapsed"] == len(raw) - int(n.sum())


def test_id_maps_round_trip_to_the_raw_pairs(ml_small):
    _, ds = ml_small
    users = dict(zip(*ds.users().to_pydict().values(), strict=True))
    items = {r["item_idx"]: r["item_id"] for r in ds.items().to_pylist()}
    assert sorted(users) == list(range(ds.n_users))
    t = ds.read_table("train", "valid", "test").to_pandas()
    decoded = set(zip(t.user_idx.map(users), t.item_idx.map(items), t.timestamp, strict=True))
    raw = pd.read_csv(ML_SMALL / "ratings.csv", dtype={"userId": str, "movieId": str})
    first = raw.sort_values("timestamp").drop_duplicates(["userId", "movieId"])
    assert decoded == set(zip(first.userId, first.movieId, first.timestamp, strict=True))


def test_test_events_are_each_users_latest(ml_small):
    _, ds = ml_small
    t = ds.read_table("train", "valid", "test").to_pandas()
    t["split"] = ["x"] * len(t)
    tr = ds.read_table("train").to_pandas().groupby("user_idx").timestamp.max()
    te = ds.read_table("test").to_pandas().groupby("user_idx").timestamp.min()
    both = pd.concat([tr, te], axis=1, keys=["train_max", "test_min"]).dropna()
    assert (both.train_max <= both.test_min).all()


def test_item_features_are_attached(ml_small):
    _, ds = ml_small
    items = ds.items().to_pandas()
    toy = items[items.item_id == "1"].genres.iloc[0]
    assert list(toy) == ["Adventure", "Animation", "Children", "Comedy", "Fantasy"]
    assert ds.manifest["items_with_genres"] > 9_000


def test_rerun_is_idempotent(ml_small):
    cfg, ds = ml_small
    again = ingest.run(cfg.data, Lake(cfg.lake))
    assert again.version == ds.version
    assert os.listdir(Path(cfg.lake) / "datasets" / cfg.data.name) == [ds.version]


def test_config_change_gives_a_new_version(ml_small, tmp_path):
    cfg, ds = ml_small
    cfg2 = _cfg(lake=cfg.lake, **{"data.path": ML_SMALL, "data.test_fraction": 0.25})
    other = ingest.run(cfg2.data, Lake(cfg2.lake))
    assert other.version != ds.version
    assert load_dataset(cfg.lake, cfg.data.name, "latest").version == other.version
    assert other.manifest["splits"]["test"] > ds.manifest["splits"]["test"]


HEADER = "userId,movieId,rating,timestamp\n"


def _write_bad_inputs(folder: Path) -> None:
    folder.mkdir()
    (folder / "a_good.csv").write_text(
        HEADER + "".join(f"{u},{i},4,{1000 + u * 10 + i}\n" for u in range(5) for i in range(6))
    )
    # Truncated mid-row, a repeated pair, a negative rating and a bad timestamp.
    (folder / "b_truncated.csv").write_bytes(
        (HEADER + "1,1,4,5000\n1,1,4,1\n9,1,-2,100\n9,2,4,never\n9,3,").encode()
    )
    (folder / "c_latin1.csv").write_bytes(HEADER.encode() + b"\xe9\xe8,1,4,100\n7,2,4,100\n")
    (folder / "d_empty.csv").write_bytes(b"")
    (folder / "e_one_row.csv").write_text(HEADER + "8,8,5,8000")


def test_bad_rows_are_quarantined_and_counts_add_up(ray_cluster, tmp_path):
    raw = tmp_path / "raw"
    _write_bad_inputs(raw)
    cfg = load_config(
        None,
        [
            f"lake={tmp_path / 'lake'}",
            "data.name=messy",
            "data.source=files",
            f"data.path={raw}",
            "data.columns.rating=rating",
        ],
    )
    m = ingest.run(cfg.data, Lake(cfg.lake)).manifest
    _check_invariant(m)
    files = {Path(f["path"]).name: f for f in m["files"]}
    # (1, 1) is in both files; its earliest event (ts=1, in b) is kept, the others collapse.
    assert (files["a_good.csv"]["rows_read"], files["a_good.csv"]["rows_ingested"]) == (30, 29)
    assert files["a_good.csv"]["duplicates_collapsed"] == 1
    b = files["b_truncated.csv"]
    assert (b["rows_read"], b["rows_ingested"], b["rows_quarantined"]) == (5, 1, 3)
    assert b["duplicates_collapsed"] == 1
    assert files["c_latin1.csv"]["rows_quarantined"] == 1
    assert files["d_empty.csv"]["rows_read"] == 0
    assert files["e_one_row.csv"]["rows_ingested"] == 1
    assert "d_empty.csv: empty file" in " ".join(m["warnings"])
    q = pq.read_table(m["quarantine"]["path"]).to_pandas()
    assert len(q) == m["rows_quarantined"] == 4
    assert set(q.reason) == {
        "malformed CSV row: expected 4 fields, got 3",
        "negative rating",
        "missing or unparsable timestamp",
        "column userId: not valid UTF-8",
    }
    assert m["quarantine"]["reasons"]["negative rating"] == 1
    assert json.loads(q[q.reason == "negative rating"].raw.iloc[0])["rating"] == "-2"


def test_wrong_delimiter_fails_with_a_hint(ray_cluster, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "r.csv").write_text("userId;movieId;timestamp\n1;2;3\n")
    cfg = load_config(None, [f"lake={tmp_path}", "data.source=files", f"data.path={raw}"])
    with pytest.raises(ingest.IngestError, match=r"data.delimiter=';'"):
        ingest.run(cfg.data, Lake(cfg.lake))


def test_all_rows_bad_is_a_clear_error(ray_cluster, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "r.csv").write_text("userId,movieId,timestamp\n,2,3\n1,,3\n")
    cfg = load_config(None, [f"lake={tmp_path}", "data.source=files", f"data.path={raw}"])
    with pytest.raises(ingest.IngestError, match="all rows quarantined"):
        ingest.run(cfg.data, Lake(cfg.lake))


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_jsonl_and_parquet_sources(ray_cluster, tmp_path, fmt):
    raw = tmp_path / "raw"
    raw.mkdir()
    df = pd.DataFrame(
        {"uid": [1, 1, 2, 2, 2], "iid": [5, 6, 5, 7, 7], "ts": [1, 2, 3, 4, 5], "w": [1.0] * 5}
    )
    if fmt == "jsonl":
        df.to_json(raw / "events.jsonl", orient="records", lines=True)
        with open(raw / "events.jsonl", "a") as f:
            f.write("{broken\n")
    else:
        df.to_parquet(raw / "events.parquet")
    cfg = load_config(
        None,
        [
            f"lake={tmp_path / 'lake'}",
            "data.source=files",
            f"data.path={raw}",
            f"data.format={fmt}",
            "data.columns.user=uid",
            "data.columns.item=iid",
            "data.columns.timestamp=ts",
            "data.columns.weight=w",
        ],
    )
    ds = ingest.run(cfg.data, Lake(cfg.lake))
    m = ds.manifest
    _check_invariant(m)
    assert m["rows_ingested"] == 4 and m["duplicates_collapsed"] == 1
    assert m["rows_quarantined"] == (1 if fmt == "jsonl" else 0)
    assert sorted(ds.users().column("user_id").to_pylist()) == ["1", "2"]


def test_synthetic_raw_files_go_to_an_s3_lake(s3_bucket, tmp_path, monkeypatch):
    from app.config import SyntheticArgs
    from app.ingest.synthetic import cached_synthetic

    monkeypatch.chdir(tmp_path)  # nothing may land in a local folder named "s3:"
    args = SyntheticArgs(n_users=30, n_items=20, n_interactions=200, n_files=2)
    folder, paths = cached_synthetic(args, f"s3://{s3_bucket}/lake/raw")
    assert folder.startswith(f"s3://{s3_bucket}/lake/raw/synthetic-")
    assert [p.rsplit("/", 1)[1] for p in paths] == [
        "interactions-00000-of-00002.parquet",
        "interactions-00001-of-00002.parquet",
    ]
    assert Lake(folder).exists("items.csv") and not list(tmp_path.iterdir())
    assert cached_synthetic(args, f"s3://{s3_bucket}/lake/raw") == (folder, paths)  # cached


def test_ingest_from_and_to_s3(ray_cluster, s3_bucket, tmp_path):
    import fsspec

    fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]})
    body = HEADER + "".join(f"{u},{i},3,{u * 100 + i}\n" for u in range(4) for i in range(5))
    fs.pipe_file(f"{s3_bucket}/raw/part-0.csv", body.encode())
    fs.pipe_file(f"{s3_bucket}/raw/part-1.csv", (HEADER + "9,9,-1,5\n").encode())
    lake = f"s3://{s3_bucket}/lake"
    cfg = load_config(
        None,
        [
            f"lake={lake}",
            "data.name=s3data",
            "data.source=files",
            f"data.path=s3://{s3_bucket}/raw",
            "data.columns.rating=rating",
        ],
    )
    ds = ingest.run(cfg.data, Lake(cfg.lake))
    _check_invariant(ds.manifest)
    assert ds.manifest["rows_ingested"] == 20 and ds.manifest["rows_quarantined"] == 1
    again = load_dataset(lake, "s3data")
    assert again.version == ds.version
    assert again.read_table("train", "valid", "test").num_rows == 20
    assert fs.exists(f"{s3_bucket}/lake/quarantine/s3data/{ds.version}")
    assert not fs.exists(f"{s3_bucket}/lake/tmp/ingest-s3data-{ds.version}")


def test_readers_read_only_the_listed_split_files(ray_cluster, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "r.csv").write_text(
        HEADER + "".join(f"{u},{i},4,{100 * u + i}\n" for u in range(6) for i in range(5))
    )
    cfg = load_config(None, [f"lake={tmp_path / 'lake'}", "data.source=files", f"data.path={raw}"])
    ds = ingest.run(cfg.data, Lake(cfg.lake))
    listed = ds.manifest["split_files"]
    assert sorted(listed) == ["test", "train", "valid"]
    attempt = ds.manifest["ingest"]["attempt"]
    assert all(f.startswith(f"{s}/part-{attempt}-") for s, fs in listed.items() for f in fs)
    # A file in a split's folder that the manifest does not list (a crashed attempt's) is ignored.
    stray = Path(ds.lake.path(ds.rel, "train", "part-stray.parquet"))
    pq.write_table(ds.read_table("train"), stray)
    again = load_dataset(cfg.lake, cfg.data.name, ds.version)
    assert again.read_table("train", "valid", "test").num_rows == 30
    assert again.read_ds("train", "valid", "test").count() == 30


def _write_ml100k(folder: Path) -> None:
    folder.mkdir(parents=True)
    (folder / "u.data").write_text("1\t10\t4\t881250949\n2\t20\t3\t891717742\n")
    flags = "|".join(["0"] * 18 + ["1"])
    (folder / "u.item").write_text(
        f"10|Ten (1995)|01-Jan-1995||http://x|{flags}\n20|Twenty (1995)|01-Jan-1995||http://x|{flags}\n",
        encoding="latin-1",
    )


def test_movielens_raw_files_go_to_an_s3_lake(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may land in a local folder named "s3:"
    cache = f"s3://{s3_bucket}/lake/raw"
    _write_ml100k(tmp_path / "ml" / "ml-100k")
    data = DataArgs(source="movielens", path=str(tmp_path / "ml"), variant="ml-100k")
    src = ingest.resolve_source(data, cache)
    assert [p.rsplit("/", 1)[1] for p in src.paths] == ["ratings.csv"]
    assert src.paths[0].startswith(f"{cache}/movielens-ml-100k-")
    assert src.item_features.startswith(f"{cache}/movielens-ml-100k-")
    text = Lake(src.paths[0].rsplit("/", 1)[0]).read_bytes("ratings.csv").decode()
    assert text.splitlines()[0] == "userId,movieId,rating,timestamp"
    assert ingest.resolve_source(data, cache).paths == src.paths  # uploaded once, then reused
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ml"]
    if (ML_SMALL / "ratings.csv").exists():
        small = ingest.resolve_source(
            DataArgs(source="movielens", path=str(ML_SMALL), variant="ml-latest-small"), cache
        )
        assert small.paths[0].startswith(f"{cache}/movielens-ml-latest-small-")


# The driver of the killed run: it joins the test's Ray cluster and, once the first bucket's
# split files are written (its result is back), waits to be killed mid-write.
_KILLED_DRIVER = """
import os, sys, time
import ray
from app import ingest
from app.config import load_config
from app.ingest import pipeline
from app.store import Lake

ray.init(address=os.environ["SCALEREC_TEST_RAY_ADDRESS"], log_to_driver=False)
original = pipeline._map_tasks

def stall_after_first_bucket(fn, tasks, ctx, prof):
    for stats in original(fn, tasks, ctx, prof):
        yield stats
        if fn.__name__ == "split_bucket":
            print("split files written", flush=True)
            time.sleep(600)

pipeline._map_tasks = stall_after_first_bucket
cfg = load_config(None, sys.argv[1:])
ingest.run(cfg.data, Lake(cfg.lake))
"""


def _s3_args(lake: str, raw: str) -> list[str]:
    return [
        f"lake={lake}",
        "data.name=crash",
        "data.source=files",
        f"data.path={raw}",
        "data.columns.rating=rating",
    ]


def _ingested(ds) -> Counter:
    """Every published row as (split, raw user, raw item, time), with its multiplicity."""
    users = np.asarray(ds.users().column("user_id").to_pylist(), dtype=object)
    items = np.asarray(ds.items().column("item_id").to_pylist(), dtype=object)
    rows: Counter = Counter()
    for split in ("train", "valid", "test"):
        t = ds.read_table(split)
        rows.update(
            zip(
                [split] * t.num_rows,
                users[t.column("user_idx").to_numpy()],
                items[t.column("item_idx").to_numpy()],
                t.column("timestamp").to_pylist(),
                strict=True,
            )
        )
    return rows


def _kill_when_split_files_appear(proc: subprocess.Popen, fs, prefix: str) -> list[str]:
    """Poll the version folders under ``prefix`` (bounded); SIGKILL the run once parts exist."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before it was killed")
        fs.invalidate_cache()
        parts = [p for p in fs.find(prefix) if "/part-" in p] if fs.exists(prefix) else []
        if parts:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
            return parts
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("no split file appeared in time")


def test_s3_run_killed_mid_write_and_rerun_publishes_one_run(ray_cluster, s3_bucket, tmp_path):
    import fsspec
    import ray

    fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]})
    rng = np.random.default_rng(0)
    for part in range(3):
        lines = [
            f"{u},{i},{rng.integers(1, 6)},{rng.integers(1, 10**6)}"
            for u, i in zip(rng.integers(0, 60, 800), rng.integers(0, 40, 800), strict=True)
        ]
        lines += ["7,7,-1,5", "8,,3,5"]  # quarantined
        fs.pipe_file(f"{s3_bucket}/raw/part-{part}.csv", (HEADER + "\n".join(lines)).encode())
    raw, lake = f"s3://{s3_bucket}/raw", f"s3://{s3_bucket}/lake"

    env = {**os.environ, "SCALEREC_TEST_RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    with open(tmp_path / "killed.log", "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", _KILLED_DRIVER, *_s3_args(lake, raw)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            left = _kill_when_split_files_appear(proc, fs, f"{s3_bucket}/lake/datasets/crash")
        except AssertionError as exc:
            raise AssertionError(
                f"{exc}: {(tmp_path / 'killed.log').read_text()[-3000:]}"
            ) from None
    assert not fs.exists(f"{s3_bucket}/lake/datasets/crash/{left[0].split('/')[4]}/manifest.json")

    cfg = load_config(None, _s3_args(lake, raw))
    rerun = ingest.run(cfg.data, Lake(cfg.lake))
    clean_cfg = load_config(None, _s3_args(f"s3://{s3_bucket}/clean", raw))
    clean = ingest.run(clean_cfg.data, Lake(clean_cfg.lake))

    m, c = rerun.manifest, clean.manifest
    _check_invariant(m)
    assert rerun.version == clean.version
    keys = ("rows_read", "rows_ingested", "rows_quarantined", "duplicates_collapsed", "splits")
    assert {k: m[k] for k in keys} == {k: c[k] for k in keys}
    assert m["rows_read"] == 3 * 802 and m["rows_quarantined"] == 6
    published = _ingested(rerun)
    assert published == _ingested(clean)
    assert sum(published.values()) == m["rows_ingested"]
    # The killed run's files are still there, unlisted, and were not read.
    listed = {rerun.lake.path(rerun.rel, f) for fs_ in m["split_files"].values() for f in fs_}
    in_folder = {p for p in fs.find(rerun.lake.path(rerun.rel)) if "/part-" in p}
    assert set(left) <= in_folder - listed
    assert all(p in in_folder for p in listed)
    q, qlake = m["quarantine"], Lake(m["quarantine"]["path"])
    assert len(q["files"]) == 3 and sorted(qlake.listdir("")) == sorted(q["files"])
    assert (
        sum(pq.read_table(qlake.path(f), filesystem=qlake.arrow_fs).num_rows for f in q["files"])
        == 6
    )
    assert not fs.exists(f"{s3_bucket}/lake/tmp/ingest-crash-{rerun.version}")
