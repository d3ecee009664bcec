"""Ingest benchmark: the Ray Data pipeline (``app.ingest.run``) against one process.

Run by ``python -m bench.ingest`` (``make bench``); ``--quick`` is a one-minute smoke run.

Workloads are raw synthetic interactions in 8 files on local disk: Parquet at ``--sizes``
(default 1M, 5M, 20M and 50M rows) and CSV at ``--csv-sizes`` (default 5M), for the formats in
``--formats``. For each one it measures, in the same run, the wall time and peak memory of

- ``ray``: ``app.ingest.run`` on a local Ray cluster started once with ``--cpus`` logical CPUs;
  memory is the peak summed PSS of the driver and every process it started (GCS, raylet, Ray
  workers: object-store pages are shared, so PSS counts each page once across processes), with
  the object store's own peak use beside it; the pipeline's phases are reported too;
- the single-process implementations of the same steps (read, validate, id maps, dedupe,
  temporal split, encode, write), each run as a subprocess so that its peak RSS is its own:
  ``pyarrow`` (vectorised pyarrow + numpy) and, when ``polars`` is importable, ``polars``. The
  fastest of them is the ``baseline`` that the throughput ratio compares against.

Every implementation's output is checked against Ray's (row accounting, split sizes, user and
item counts and an order-free checksum of every split), then ``bench/results/ingest.json`` is
written and a table printed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

DEFAULT_SIZES = (1_000_000, 5_000_000, 20_000_000, 50_000_000)
DEFAULT_CSV_SIZES = (5_000_000,)
QUICK_SIZES = (200_000,)
RESULTS = Path(__file__).resolve().parent / "results" / "ingest.json"
# Targets from the issue: Ray at least this share of the fastest single process's throughput at
# these sizes (Parquet), and Ray's peak memory at the largest size at most this many times its
# peak at the reference size.
TARGET_THROUGHPUT_RATIO = 0.8
TARGET_THROUGHPUT_AT = (20_000_000, 50_000_000)
TARGET_MEMORY_GROWTH = 1.5
TARGET_MEMORY_FROM, TARGET_MEMORY_TO = 5_000_000, 50_000_000
_SPLITS = ("train", "valid", "test")
# Raw column names written by app.ingest.generate_synthetic (the baselines do not import app).
_COLUMNS = {"user": "user_id", "item": "item_id", "timestamp": "timestamp", "rating": "rating"}
_EXT = {"parquet": ".parquet", "csv": ".csv"}
_ID_PAD = 20
_TICK_S = 0.2
# PSS needs /proc/<pid>/smaps_rollup, which walks page tables (slow on a busy host): read it,
# and refresh the process tree, every few ticks; /proc/<pid>/status every tick.
_PSS_EVERY = 5
_MB = 1 << 20


# ---------------------------------------------------------------- workload


def _workload(n: int) -> dict[str, int]:
    """Synthetic generator settings for ``n`` raw interactions (users and items scale with n)."""
    return {
        "n_interactions": n,
        "n_users": max(1, n // 20),
        "n_items": max(10, min(n // 100, 100_000)),
        "n_files": 8,
    }


def _data_dir(workdir: Path, n: int, fmt: str) -> Path:
    w = _workload(n)
    suffix = "" if fmt == "parquet" else f"-{fmt}"
    name = f"synthetic-n{n}-u{w['n_users']}-i{w['n_items']}-f{w['n_files']}{suffix}"
    return workdir / "data" / name


def _ensure_data(workdir: Path, n: int, fmt: str) -> Path:
    """Generate (once, in a subprocess so the driver's memory stays clean) the raw files."""
    out = _data_dir(workdir, n, fmt)
    if not (out / "_SUCCESS").is_file():
        print(f"generating {n:,} synthetic interactions ({fmt}) into {out}", flush=True)
        cmd = [sys.executable, "-m", "bench.ingest", "--_generate", str(n), fmt]
        subprocess.run([*cmd, "--workdir", str(workdir)], check=True)
    return out


def _generate(workdir: Path, n: int, fmt: str) -> None:
    from app.config import SyntheticArgs
    from app.ingest import generate_synthetic

    out = _data_dir(workdir, n, fmt)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    generate_synthetic(SyntheticArgs(**_workload(n), format=fmt, seed=0), str(tmp))
    (tmp / "_SUCCESS").touch()
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def _raw_files(data_dir: Path, fmt: str) -> list[str]:
    return sorted(str(p) for p in data_dir.glob(f"interactions-*{_EXT[fmt]}"))


# ---------------------------------------------------------------- memory sampling


def _read_kb(path: str, keys: tuple[bytes, ...]) -> dict[bytes, int]:
    out = dict.fromkeys(keys, 0)
    with open(path, "rb") as f:
        for line in f:
            key = line.split(b":", 1)[0]
            if key in out:
                out[key] = int(line.split()[1])
    return out


def _process_kind(pid: int, driver: int) -> str:
    if pid == driver:
        return "driver"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read()
    except OSError:
        return "other"
    return "ray_workers" if cmd.startswith(b"ray::") else "ray_system"


class MemorySampler(threading.Thread):
    """Samples the summed memory of a process and all its descendants until stopped.

    Every tick (0.2 s): RSS from ``/proc/<pid>/status`` (shared pages counted once per process,
    so an upper bound). Every ``_PSS_EVERY`` ticks: PSS and USS from ``smaps_rollup``.
    """

    def __init__(self, root: int, object_store: Any = None) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.object_store = object_store
        self._stop_event = threading.Event()
        self.peak_rss = 0
        self.peak_pss = 0
        self.peak_uss = 0
        self.pss_at_peak: dict[str, int] = {}
        self.peak_store_used = 0
        self.spilled = 0
        self.samples = 0
        self.cpu_s = 0.0

    def _pids(self) -> list[int]:
        import psutil

        try:
            root = psutil.Process(self.root)
            return [self.root] + [c.pid for c in root.children(recursive=True)]
        except psutil.Error:
            return []

    def run(self) -> None:  # noqa: D102
        tick = 0
        t_cpu = time.thread_time()
        pids: list[int] = []
        while not self._stop_event.is_set():
            if tick % _PSS_EVERY == 0:  # walking /proc for the process tree is not cheap either
                pids = self._pids()
            rss = 0
            for pid in pids:
                try:
                    rss += _read_kb(f"/proc/{pid}/status", (b"VmRSS",))[b"VmRSS"] * 1024
                except OSError:
                    pass
            self.peak_rss = max(self.peak_rss, rss)
            if tick % _PSS_EVERY == 0:
                self._sample_pss(pids)
            tick += 1
            self.samples += 1
            self._stop_event.wait(_TICK_S)
        self._sample_pss(self._pids())
        self.cpu_s = time.thread_time() - t_cpu

    def _sample_pss(self, pids: list[int]) -> None:
        keys = (b"Pss", b"Private_Clean", b"Private_Dirty")
        pss, uss = 0, 0
        by_kind: dict[str, int] = {}
        for pid in pids:
            try:
                m = _read_kb(f"/proc/{pid}/smaps_rollup", keys)
            except OSError:
                continue
            kind = _process_kind(pid, self.root)
            by_kind[kind] = by_kind.get(kind, 0) + m[b"Pss"] * 1024
            pss += m[b"Pss"] * 1024
            uss += (m[b"Private_Clean"] + m[b"Private_Dirty"]) * 1024
        if pss > self.peak_pss:
            self.peak_pss, self.pss_at_peak = pss, by_kind
        self.peak_uss = max(self.peak_uss, uss)
        if self.object_store is not None:
            try:
                used, spilled = self.object_store()
                self.peak_store_used = max(self.peak_store_used, used)
                self.spilled = max(self.spilled, spilled)
            except Exception:  # noqa: BLE001 - a missed reading must not stop the sampler
                pass

    def stop(self) -> None:
        """Stop sampling and wait for the last sample."""
        self._stop_event.set()
        self.join()

    def report(self) -> dict[str, Any]:
        """Peaks in MB."""
        out: dict[str, Any] = {
            "peak_pss_mb": round(self.peak_pss / _MB, 1),
            "peak_uss_mb": round(self.peak_uss / _MB, 1),
            "peak_rss_sum_mb": round(self.peak_rss / _MB, 1),
            "pss_at_peak_mb": {k: round(v / _MB, 1) for k, v in sorted(self.pss_at_peak.items())},
            "sampler": {"samples": self.samples, "cpu_s": round(self.cpu_s, 2)},
        }
        if self.object_store is not None:
            out["peak_object_store_used_mb"] = round(self.peak_store_used / _MB, 1)
            out["object_store_spilled_mb"] = round(self.spilled / _MB, 1)
        return out


def _object_store_reader() -> Any:
    """Return a callable giving (bytes used, bytes spilled so far) of the local object store."""
    import ray
    from ray._private import internal_api

    state = internal_api.get_state_from_address(ray.get_runtime_context().gcs_address)

    def read() -> tuple[int, int]:
        stats = internal_api.get_memory_info_reply(state, timeout_seconds=5).store_stats
        return int(stats.object_store_bytes_used), int(stats.spilled_bytes_total)

    return read


def _idle_pss_mb(root: int) -> float:
    sampler = MemorySampler(root)
    sampler._sample_pss(sampler._pids())
    return round(sampler.peak_pss / _MB, 1)


# ---------------------------------------------------------------- single process: pyarrow


def _order_key(ids: pa.Array) -> pa.Array:
    """Numeric-first id order: digit-only ids compare as numbers, other ids as text after them."""
    digits = pc.fill_null(pc.utf8_is_digit(ids), False)
    padded = pc.utf8_lpad(ids, _ID_PAD, "0")
    return pc.if_else(
        digits,
        pc.binary_join_element_wise("0", padded, ""),
        pc.binary_join_element_wise("1", ids, ""),
    )


def _as_text(col: pa.ChunkedArray) -> pa.ChunkedArray:
    """Raw ids of any non-integer type as trimmed text (1.0 and 1 give the same id)."""
    if pa.types.is_floating(col.type):
        ints = pc.cast(col, pa.int64(), safe=False)
        col = pc.if_else(pc.equal(pc.cast(ints, col.type), col), ints, col)
    if pa.types.is_dictionary(col.type):
        col = pc.cast(col, col.type.value_type)
    return pc.utf8_trim_whitespace(pc.cast(col, pa.string()))


def _as_float(col: pa.ChunkedArray) -> np.ndarray:
    """Numeric column (or numeric text) as float64, NaN where missing or unparsable."""
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        text = pc.utf8_trim_whitespace(col)
        col = pc.if_else(pc.equal(pc.utf8_length(text), 0), pa.scalar(None, text.type), text)
    try:
        col = pc.cast(col, pa.float64())
    except pa.ArrowInvalid:
        col = pa.chunked_array(
            [pa.array([_to_float(v) for v in col.to_pylist()], pa.float64())], pa.float64()
        )
    return col.to_numpy().astype(np.float64)  # nulls become NaN


def _to_float(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _ceil_frac(n: np.ndarray, frac: float) -> np.ndarray:
    from fractions import Fraction

    f = Fraction(frac).limit_denominator(10**6)
    return (n * f.numerator + f.denominator - 1) // f.denominator


def _encode_ids(col: pa.ChunkedArray) -> tuple[np.ndarray, pa.Array, np.ndarray]:
    """Per row its code (-1: missing) in a dictionary of distinct id texts, and the texts.

    Integer ids are hashed as integers and only the distinct ones turned into text (much
    cheaper than text for every row); other types go through their trimmed text.
    Returns ``(codes, dictionary, bad)``, ``bad`` marking rows without a usable id.
    """
    if pa.types.is_integer(col.type):
        enc = pc.dictionary_encode(col).combine_chunks()
        text = pc.cast(enc.dictionary, pa.string())
    else:
        enc = pc.dictionary_encode(_as_text(col)).combine_chunks()
        text = enc.dictionary
    indices = enc.indices if not enc.indices.null_count else pc.fill_null(enc.indices, -1)
    codes = indices.to_numpy()
    empty = pc.equal(pc.utf8_length(text), 0).to_numpy(zero_copy_only=False)
    bad = codes < 0
    if empty.any():
        bad |= np.r_[empty, False][codes]
    return codes, text, bad


def _ranks(codes: np.ndarray, text: pa.Array) -> tuple[np.ndarray, pa.Array]:
    """Dense rank of each row's id among the ids present, numeric-first; the sorted ids."""
    present = np.flatnonzero(np.bincount(codes, minlength=len(text)) > 0)
    ids = text.take(pa.array(present))
    keyed = pa.table({"key": _order_key(ids), "id": ids})
    order = pc.sort_indices(keyed, sort_keys=[("key", "ascending"), ("id", "ascending")])
    order = order.to_numpy()
    rank = np.full(len(text), -1, dtype=np.int64)
    rank[present[order]] = np.arange(len(order))
    return rank[codes], ids.take(pa.array(order))


def _read_pyarrow(paths: list[str], fmt: str) -> pa.Table:
    cols = list(_COLUMNS.values())
    if fmt == "parquet":
        return pa.concat_tables([pq.ParquetFile(p).read(columns=cols) for p in paths])
    tables = []
    for p in paths:
        types = {_COLUMNS["user"]: pa.string(), _COLUMNS["item"]: pa.string()}
        numeric = {_COLUMNS["timestamp"]: pa.float64(), _COLUMNS["rating"]: pa.float64()}
        opts = pacsv.ConvertOptions(include_columns=cols, column_types={**types, **numeric})
        try:
            tables.append(pacsv.read_csv(p, convert_options=opts))
        except pa.ArrowInvalid:  # a non-numeric value: parse the numbers per value below
            opts = pacsv.ConvertOptions(
                include_columns=cols, column_types=dict.fromkeys(cols, pa.string())
            )
            tables.append(pacsv.read_csv(p, convert_options=opts))
    return pa.concat_tables(tables, promote_options="permissive")


def _sort_order(u: np.ndarray, i: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """Stable order by (user, ts, item): one packed 63-bit key when it fits."""
    if not len(u):
        return np.zeros(0, dtype=np.int64)
    t = ts - ts.min()
    bu, bt, bi = (int(x.max()).bit_length() for x in (u, t, i))
    if bu + bt + bi <= 63:
        return np.argsort((u << (bt + bi)) | (t << bi) | i, kind="stable")
    return np.lexsort((i, ts, u))


def _split_sorted(u: np.ndarray, i: np.ndarray, tf: float, vf: float) -> np.ndarray:
    """Status per sorted row: 0 train, 1 valid, 2 test, 3 duplicate."""
    status = np.full(len(u), 3, dtype=np.int8)
    if not len(u):
        return status
    _, first = np.unique(u * (int(i.max()) + 1) + i, return_index=True)
    keep = np.zeros(len(u), dtype=bool)
    keep[first] = True
    ku = u[keep]
    starts = np.flatnonzero(np.r_[True, ku[1:] != ku[:-1]])
    counts = np.diff(np.r_[starts, len(ku)])
    n = np.repeat(counts, counts)
    from_end = n - 1 - (np.arange(len(ku)) - np.repeat(starts, counts))
    n_test = _ceil_frac(n, tf)
    n_valid = _ceil_frac(n - n_test, vf)
    status[keep] = np.where(from_end < n_test, 2, np.where(from_end < n_test + n_valid, 1, 0))
    return status


def _write_outputs(
    out: Path,
    uidx: np.ndarray,
    iidx: np.ndarray,
    ts: np.ndarray,
    w: np.ndarray,
    status: np.ndarray,
    user_ids: pa.Array,
    item_ids: pa.Array,
) -> tuple[dict[str, int], dict[str, int]]:
    """Write the splits and id maps; return the split sizes and checksums."""
    out.mkdir(parents=True, exist_ok=True)
    sizes, sums = {}, {}
    for code, name in enumerate(_SPLITS):
        rows = np.flatnonzero(status == code)
        part = pa.table(
            {
                "user_idx": pa.array(uidx[rows], pa.int32()),
                "item_idx": pa.array(iidx[rows], pa.int32()),
                "timestamp": pa.array(ts[rows], pa.int64()),
                "weight": pa.array(w[rows], pa.float32()),
            }
        )
        (out / name).mkdir(exist_ok=True)
        pq.write_table(part, out / name / "part-0.parquet")
        sizes[name] = part.num_rows
        sums[name] = _pair_checksum(part, len(item_ids))
    users = pa.table({"user_idx": np.arange(len(user_ids), dtype=np.int32), "user_id": user_ids})
    items = pa.table({"item_idx": np.arange(len(item_ids), dtype=np.int32), "item_id": item_ids})
    pq.write_table(users, out / "users.parquet")
    pq.write_table(items, out / "items.parquet")
    return sizes, sums


def _pyarrow_ingest(paths: list[str], fmt: str, out: Path, tf: float, vf: float) -> dict:
    """Read → validate → id maps → dedupe → per-user temporal split → encode → write."""
    lap = _Laps()
    table = _read_pyarrow(paths, fmt)
    rows_read = table.num_rows
    lap("read")

    # validate: missing ids, missing/unparsable/negative timestamps, missing/negative ratings
    ucode, utext, bad = _encode_ids(table.column(_COLUMNS["user"]))
    icode, itext, ibad = _encode_ids(table.column(_COLUMNS["item"]))
    ts_f = _as_float(table.column(_COLUMNS["timestamp"]))
    weight = _as_float(table.column(_COLUMNS["rating"]))
    del table
    bad |= ibad | ~np.isfinite(ts_f) | (ts_f < 0) | ~np.isfinite(weight) | (weight < 0)
    quarantined = int(bad.sum())
    if quarantined:
        good = ~bad
        ucode, icode, ts_f, weight = ucode[good], icode[good], ts_f[good], weight[good]
    ts = np.floor(ts_f).astype(np.int64)
    del ts_f
    lap("validate")

    uidx, user_ids = _ranks(ucode, utext)
    iidx, item_ids = _ranks(icode, itext)
    del ucode, icode
    lap("id_maps")

    order = _sort_order(uidx, iidx, ts)
    uidx, iidx, ts, weight = uidx[order], iidx[order], ts[order], weight[order]
    del order
    status = _split_sorted(uidx, iidx, tf, vf)
    lap("dedupe_split")

    sizes, sums = _write_outputs(out, uidx, iidx, ts, weight, status, user_ids, item_ids)
    lap("encode_write")
    return {
        "rows_read": rows_read,
        "rows_quarantined": quarantined,
        "duplicates_collapsed": int((status == 3).sum()),
        "splits": sizes,
        "checksums": sums,
        "n_users": len(user_ids),
        "n_items": len(item_ids),
        "phases_s": lap.phases,
    }


class _Laps:
    """Seconds between calls, by name."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self._t = time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.phases[name] = round(now - self._t, 3)
        self._t = now


# ---------------------------------------------------------------- single process: polars


def _polars_available() -> bool:
    try:
        import polars  # noqa: F401
    except ImportError:
        return False
    return True


def _polars_ids(df: Any, col: str, out: str) -> tuple[Any, Any]:
    """``df`` with ``out``: the dense numeric-first rank of ``col``; and the sorted id texts.

    Non-negative integer ids rank as numbers (their text order is numeric order); other ids
    through the numeric-first text key, ties by text.
    """
    import polars as pl

    dtype = df.schema[col]
    if dtype.is_integer() and (df.height == 0 or df[col].min() >= 0):
        df = df.with_columns((pl.col(col).rank("dense") - 1).cast(pl.Int64).alias(out))
        ids = df.select(pl.col(col).unique().sort().cast(pl.Utf8))[col]
        return df, ids
    uniq = df.select(pl.col(col).unique())
    digits = pl.col(col).str.contains(r"^[0-9]+$")
    key = (
        pl.when(digits)
        .then("0" + pl.col(col).str.pad_start(_ID_PAD, "0"))
        .otherwise("1" + pl.col(col))
    )
    uniq = uniq.with_columns(key.alias("_key")).sort(["_key", col]).with_row_index(out)
    df = df.join(uniq.select([col, pl.col(out).cast(pl.Int64)]), on=col, how="left")
    return df, uniq[col]


def _polars_ingest(paths: list[str], fmt: str, out: Path, tf: float, vf: float) -> dict:
    """The same steps as ``_pyarrow_ingest``, in polars."""
    from fractions import Fraction

    import polars as pl

    lap = _Laps()
    u, i, t, r = (_COLUMNS[k] for k in ("user", "item", "timestamp", "rating"))
    if fmt == "parquet":
        df = pl.read_parquet(paths, columns=[u, i, t, r])
    else:
        schema = {u: pl.Utf8, i: pl.Utf8, t: pl.Float64, r: pl.Float64}
        df = pl.concat(
            [pl.read_csv(p, columns=[u, i, t, r], schema_overrides=schema) for p in paths]
        )
    rows_read = df.height
    lap("read")

    for c in (u, i):
        if not df.schema[c].is_integer():
            df = df.with_columns(pl.col(c).cast(pl.Utf8).str.strip_chars())
    ts = pl.col(t).cast(pl.Float64)
    w = pl.col(r).cast(pl.Float64)
    ok = pl.col(u).is_not_null() & pl.col(i).is_not_null() & ts.is_finite() & (ts >= 0)
    ok = ok & w.is_finite() & (w >= 0)
    for c in (u, i):
        if df.schema[c] == pl.Utf8:
            ok = ok & (pl.col(c).str.len_bytes() > 0)
    good = df.filter(ok)
    quarantined = rows_read - good.height
    good = good.with_columns(ts.floor().cast(pl.Int64).alias("ts"), w.cast(pl.Float32).alias("w"))
    lap("validate")

    good, user_ids = _polars_ids(good, u, "uidx")
    good, item_ids = _polars_ids(good, i, "iidx")
    good = good.select(["uidx", "iidx", "ts", "w"])
    lap("id_maps")

    n_items = max(1, len(item_ids))
    good = good.sort(["uidx", "ts", "iidx"], maintain_order=True)
    first = (pl.col("uidx") * n_items + pl.col("iidx")).is_first_distinct()
    kept = good.filter(first)
    duplicates = good.height - kept.height
    ft, fv = (Fraction(x).limit_denominator(10**6) for x in (tf, vf))
    n = pl.len().over("uidx")
    from_end = n - 1 - pl.int_range(pl.len()).over("uidx")
    n_test = (n * ft.numerator + ft.denominator - 1) // ft.denominator
    n_valid = ((n - n_test) * fv.numerator + fv.denominator - 1) // fv.denominator
    status = (
        pl.when(from_end < n_test).then(2).when(from_end < n_test + n_valid).then(1).otherwise(0)
    )
    kept = kept.with_columns(status.alias("status"))
    lap("dedupe_split")

    out.mkdir(parents=True, exist_ok=True)
    sizes, sums = {}, {}
    for code, name in enumerate(_SPLITS):
        part = kept.filter(pl.col("status") == code).select(
            pl.col("uidx").cast(pl.Int32).alias("user_idx"),
            pl.col("iidx").cast(pl.Int32).alias("item_idx"),
            pl.col("ts").alias("timestamp"),
            pl.col("w").alias("weight"),
        )
        (out / name).mkdir(exist_ok=True)
        part.write_parquet(out / name / "part-0.parquet")
        sizes[name] = part.height
        sums[name] = _pair_checksum(part.to_arrow(), len(item_ids))
    pl.DataFrame({"user_idx": range(len(user_ids)), "user_id": user_ids}).write_parquet(
        out / "users.parquet"
    )
    pl.DataFrame({"item_idx": range(len(item_ids)), "item_id": item_ids}).write_parquet(
        out / "items.parquet"
    )
    lap("encode_write")
    return {
        "rows_read": rows_read,
        "rows_quarantined": quarantined,
        "duplicates_collapsed": duplicates,
        "splits": sizes,
        "checksums": sums,
        "n_users": len(user_ids),
        "n_items": len(item_ids),
        "phases_s": lap.phases,
    }


_SINGLE = {"pyarrow": _pyarrow_ingest, "polars": _polars_ingest}
"""The single-process implementations, by name."""


def _pair_checksum(part: pa.Table, n_items: int) -> int:
    """Order-free checksum of a split: sum of user_idx * n_items + item_idx, modulo 2**64."""
    u = part.column("user_idx").to_numpy().astype(np.uint64)
    i = part.column("item_idx").to_numpy().astype(np.uint64)
    return int(np.sum(u * np.uint64(n_items) + i, dtype=np.uint64))


def _single_main(name: str, data_dir: Path, fmt: str, out: Path, cpus: int) -> None:
    """Subprocess entry point: run one implementation and print its result as one JSON line."""
    import resource

    # Same CPUs as Ray gets: Arrow's (and polars') thread pools.
    pa.set_cpu_count(cpus)
    pa.set_io_thread_count(cpus)
    t0 = time.perf_counter()
    result = _SINGLE[name](_raw_files(data_dir, fmt), fmt, out, 0.2, 0.1)
    result["seconds"] = time.perf_counter() - t0
    result["max_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(result), flush=True)


def _run_single(name: str, data_dir: Path, fmt: str, out: Path, cpus: int) -> dict[str, Any]:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "bench.ingest", "--_single", name, str(data_dir), fmt, str(out)]
    env = {**os.environ, "POLARS_MAX_THREADS": str(cpus)}
    t0 = time.perf_counter()
    proc = subprocess.Popen([*cmd, "--cpus", str(cpus)], stdout=subprocess.PIPE, text=True, env=env)
    sampler = MemorySampler(proc.pid)
    sampler.start()
    stdout, _ = proc.communicate()
    wall = time.perf_counter() - t0
    sampler.stop()
    if proc.returncode:
        raise RuntimeError(f"{name} failed with exit code {proc.returncode}")
    result = json.loads(stdout.strip().splitlines()[-1])
    shutil.rmtree(out, ignore_errors=True)
    mem = sampler.report()
    return {
        **result,
        "seconds": round(result["seconds"], 2),
        "process_wall_s": round(wall, 2),
        "peak_rss_mb": result.pop("max_rss_mb"),
        "peak_pss_mb": mem["peak_pss_mb"],
        "sampler": mem["sampler"],
    }


# ---------------------------------------------------------------- Ray pipeline


def _profile_report(profile: Any) -> dict[str, Any]:
    """Phase seconds, the plan (units, buckets) and Ray Data's per-operator summary."""
    return {
        "phases_s": dict(profile.phases),
        "plan": dict(profile.plan),
        "ray_data_operators": [
            line for text in profile.dataset_stats for line in _operator_lines(text)
        ],
    }


def _operator_lines(text: str) -> list[str]:
    """The operator lines and remote wall/CPU totals of a Dataset's execution stats."""
    keep = []
    for line in text.splitlines():
        s = line.strip()
        if (
            s.startswith("Operator ")
            or s.startswith("* Remote wall time")
            or s.startswith("* Remote cpu time")
        ):
            keep.append(re.sub(r"\s+", " ", s))
    return keep


def _start_ray(cpus: int, dashboard: bool, object_store_mb: int | None = None) -> None:
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    import ray

    # address="local": always a fresh cluster of our own, never another engineer's `ray start`.
    # Ray gives the raylet a fixed 30 s to register; on a busy shared host that can run out.
    for attempt in range(3):
        try:
            ray.init(
                address="local",
                num_cpus=cpus,
                include_dashboard=dashboard,
                log_to_driver=False,
                object_store_memory=object_store_mb * 1024**2 if object_store_mb else None,
            )
            break
        except Exception:
            ray.shutdown()
            if attempt == 2:
                raise
            print("Ray did not start in time (busy host); retrying", flush=True)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_auto_log_stats = False


def _run_ray(data_dir: Path, fmt: str, lake: Path, store_reader: Any) -> dict[str, Any]:
    from app.config import DataArgs
    from app.ingest import SYNTHETIC_COLUMNS, IngestProfile, run
    from app.store import Lake

    shutil.rmtree(lake, ignore_errors=True)
    data = DataArgs(
        name="bench",
        source="files",
        format=fmt,
        path=str(data_dir),
        glob=f"interactions-*{_EXT[fmt]}",  # not the generator's items.csv
        columns=SYNTHETIC_COLUMNS,
    )
    sampler = MemorySampler(os.getpid(), store_reader)
    sampler.start()
    t0 = time.perf_counter()
    profile = IngestProfile()
    version = run(data, Lake(str(lake)), profile=profile)
    seconds = time.perf_counter() - t0
    sampler.stop()
    m = version.manifest
    checksums = {
        s: _pair_checksum(
            pq.read_table(version.split_paths(s), columns=["user_idx", "item_idx"]), m["n_items"]
        )
        for s in _SPLITS
    }
    shutil.rmtree(lake, ignore_errors=True)
    return {
        "seconds": round(seconds, 2),
        "manifest_ingest_seconds": m["ingest_seconds"],
        **sampler.report(),
        **_profile_report(profile),
        "rows_read": m["rows_read"],
        "rows_quarantined": m["rows_quarantined"],
        "duplicates_collapsed": m["duplicates_collapsed"],
        "splits": m["splits"],
        "checksums": checksums,
        "n_users": m["n_users"],
        "n_items": m["n_items"],
    }


_COMPARED = ("rows_read", "rows_quarantined", "duplicates_collapsed", "splits", "checksums")
_COMPARED += ("n_users", "n_items")


def _differences(ray_r: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """Where an implementation's output differs from Ray's (empty: the same)."""
    return {k: {"ray": ray_r[k], "other": other[k]} for k in _COMPARED if ray_r[k] != other[k]}


# ---------------------------------------------------------------- driver


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 2)


def _summarise(
    n: int, fmt: str, rays: list[dict], singles: dict[str, list[dict]], diffs: dict[str, Any]
) -> dict[str, Any]:
    r_s = _median([r["seconds"] for r in rays])
    ray_mem = _median([r["peak_pss_mb"] for r in rays])
    impls = {}
    for name, runs in singles.items():
        s = _median([b["seconds"] for b in runs])
        impls[name] = {
            "seconds": s,
            "rows_per_s": round(n / s),
            "peak_rss_mb": _median([b["peak_rss_mb"] for b in runs]),
            "outputs_match": not diffs.get(name),
            "runs": runs,
        }
    fastest = min(impls, key=lambda k: impls[k]["seconds"])
    base = impls[fastest]
    return {
        "rows": n,
        "format": fmt,
        "workload": {**_workload(n), "format": fmt, "files_on": "local disk"},
        "repeats": len(rays),
        "ray": {
            "seconds": r_s,
            "rows_per_s": round(n / r_s),
            "peak_pss_mb": ray_mem,
            "peak_object_store_used_mb": _median(
                [r.get("peak_object_store_used_mb", 0.0) for r in rays]
            ),
            "phases_s": rays[0]["phases_s"],
            "plan": rays[0]["plan"],
            "runs": rays,
        },
        "baseline": {
            "implementation": fastest,
            "seconds": base["seconds"],
            "rows_per_s": base["rows_per_s"],
            "peak_rss_mb": base["peak_rss_mb"],
        },
        "single_process": impls,
        "throughput_ratio_ray_over_baseline": round(base["seconds"] / r_s, 3),
        "memory_ratio_ray_over_baseline": round(ray_mem / base["peak_rss_mb"], 2),
        "outputs_match": not any(diffs.values()),
        **({"output_differences": diffs} if any(diffs.values()) else {}),
    }


def _table(result: dict[str, Any]) -> str:
    head = (
        f"{'rows':>11} {'fmt':>7} {'ray s':>8} {'ray rows/s':>11} {'ray PSS MB':>10} "
        f"{'store MB':>8} {'baseline':>8} {'base s':>7} {'base rows/s':>11} {'base RSS MB':>11} "
        f"{'ratio':>6} {'match':>5}"
    )
    lines = [head, "-" * len(head)]
    for s in result["sizes"]:
        r, b = s["ray"], s["baseline"]
        lines.append(
            f"{s['rows']:>11,} {s['format']:>7} {r['seconds']:>8.1f} {r['rows_per_s']:>11,} "
            f"{r['peak_pss_mb']:>10,.0f} {r['peak_object_store_used_mb']:>8,.0f} "
            f"{b['implementation']:>8} {b['seconds']:>7.1f} {b['rows_per_s']:>11,} "
            f"{b['peak_rss_mb']:>11,.0f} {s['throughput_ratio_ray_over_baseline']:>6.2f} "
            f"{'yes' if s['outputs_match'] else 'NO':>5}"
        )
    lines.append("")
    lines.append("Ray phases (s):")
    for s in result["sizes"]:
        phases = ", ".join(f"{k} {v:.1f}" for k, v in s["ray"]["phases_s"].items() if v >= 0.05)
        lines.append(f"  {s['rows']:>11,} {s['format']:>7}: {phases}")
    lines.append("")
    for name, target in result.get("targets", {}).items():
        if isinstance(target, dict) and "target" in target:
            lines.append(
                f"{name}: {target.get('measured')} (target {target['target']}): "
                f"{'met' if target['met'] else 'MISSED'}"
            )
    return "\n".join(lines)


def _pick(sizes: list[dict[str, Any]], rows: int, fmt: str = "parquet") -> dict[str, Any] | None:
    return next((s for s in sizes if s["rows"] == rows and s["format"] == fmt), None)


def _targets(sizes: list[dict[str, Any]], idle_mb: float) -> dict[str, Any]:
    """The issue's targets, for the sizes this run measured."""
    out: dict[str, Any] = {}
    for rows in TARGET_THROUGHPUT_AT:
        s = _pick(sizes, rows)
        if s is not None:
            ratio = s["throughput_ratio_ray_over_baseline"]
            out[f"throughput_at_{rows // 1_000_000}M"] = {
                "measured": ratio,
                "baseline": s["baseline"]["implementation"],
                "target": f">= {TARGET_THROUGHPUT_RATIO}",
                "met": ratio >= TARGET_THROUGHPUT_RATIO,
            }
    small, large = _pick(sizes, TARGET_MEMORY_FROM), _pick(sizes, TARGET_MEMORY_TO)
    if small is not None and large is not None:
        growth = large["ray"]["peak_pss_mb"] / small["ray"]["peak_pss_mb"]
        above_idle = (large["ray"]["peak_pss_mb"] - idle_mb) / max(
            1.0, small["ray"]["peak_pss_mb"] - idle_mb
        )
        out["ray_memory_growth"] = {
            "from_rows": small["rows"],
            "to_rows": large["rows"],
            "data_growth": round(large["rows"] / small["rows"], 1),
            "measured": round(growth, 2),
            "target": f"<= {TARGET_MEMORY_GROWTH}",
            "met": growth <= TARGET_MEMORY_GROWTH,
            "above_idle_cluster": round(above_idle, 2),
        }
    return out


def _machine() -> dict[str, Any]:
    info = {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "pyarrow": pa.__version__,
        "numpy": np.__version__,
        "mem_total_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
    }
    if _polars_available():
        import polars

        info["polars"] = polars.__version__
    return info


def _workloads(args: argparse.Namespace) -> list[tuple[int, str]]:
    """(rows, format) pairs to run: Parquet at --sizes, CSV at --csv-sizes, as --formats says."""
    if args.quick:
        return [(n, "parquet") for n in QUICK_SIZES]
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    unknown = set(formats) - set(_EXT)
    if unknown:
        raise SystemExit(f"--formats: unknown {sorted(unknown)}; expected {sorted(_EXT)}")
    sizes = {"parquet": args.sizes, "csv": args.csv_sizes}
    return [
        (n, fmt) for fmt in ("parquet", "csv") if fmt in formats for n in _parse_sizes(sizes[fmt])
    ]


def _parse_sizes(text: str) -> list[int]:
    """``1M,5M,200000`` → sorted row counts."""
    out = []
    for part in (p.strip().upper() for p in text.split(",") if p.strip()):
        scale = {"K": 1_000, "M": 1_000_000}.get(part[-1], 1)
        out.append(int(float(part.rstrip("KM")) * scale))
    return sorted(out)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Run the benchmark and write ``bench/results/ingest.json``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default=",".join(str(s) for s in DEFAULT_SIZES), help="Parquet")
    p.add_argument("--csv-sizes", default=",".join(str(s) for s in DEFAULT_CSV_SIZES))
    p.add_argument("--formats", default="parquet,csv", help="which of parquet,csv to run")
    p.add_argument("--quick", action="store_true", help=f"smoke run at {QUICK_SIZES[0]:,} rows")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/scalerec-bench"))
    p.add_argument("--cpus", type=int, default=2, help="logical CPUs for Ray (and Arrow threads)")
    p.add_argument("--repeats", type=int, default=1, help="runs per size; medians are reported")
    p.add_argument("--no-polars", action="store_true", help="skip the polars implementation")
    p.add_argument("--dashboard", action="store_true", help="start Ray's dashboard too")
    p.add_argument("--object-store-mb", type=int, help="cap Ray's object store (default: Ray's)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--_generate", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--_single", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._generate:
        _generate(args.workdir, int(args._generate[0]), args._generate[1])
        return None
    if args._single:
        name, data_dir, fmt, out = args._single
        _single_main(name, Path(data_dir), fmt, Path(out), args.cpus)
        return None

    workloads = _workloads(args)
    names = ["pyarrow"] + (["polars"] if _polars_available() and not args.no_polars else [])
    data_dirs = {w: _ensure_data(args.workdir, *w) for w in workloads}
    load_before = os.getloadavg()
    _start_ray(args.cpus, args.dashboard, args.object_store_mb)
    import ray

    store_reader = _object_store_reader()
    time.sleep(2)  # let the worker pool settle before measuring the idle footprint
    idle_mb = _idle_pss_mb(os.getpid())
    results = []
    try:
        for n, fmt in workloads:
            results.append(_measure(args, n, fmt, data_dirs[(n, fmt)], names, store_reader))
    finally:
        ray.shutdown()
    load_after = os.getloadavg()
    result = {
        "benchmark": "ingest",
        "description": "raw synthetic interactions (Parquet or CSV, local disk) → validated, "
        "deduped, split, id-mapped, encoded train/valid/test Parquet",
        "cpus": args.cpus,
        "ray_dashboard": args.dashboard,
        "memory": {
            "ray": "peak over time of the summed PSS of the driver and all its descendants "
            "(GCS, raylet, agents, Ray workers), sampled every "
            f"{_TICK_S * _PSS_EVERY:.1f} s from /proc/<pid>/smaps_rollup; PSS splits shared "
            "pages (object store, libraries) between the processes that map them, so each "
            "page counts once. Includes the idle cluster (idle_cluster_pss_mb); the object "
            "store's own peak use is ray.peak_object_store_used_mb.",
            "single_process": "peak RSS (ru_maxrss) of the single process, exact.",
            "idle_cluster_pss_mb": idle_mb,
        },
        "throughput": "raw input rows / wall seconds of the whole ingest (Ray: app.ingest.run, "
        "including input fingerprinting; single process: read to written files). baseline: "
        "the fastest single-process implementation at that size "
        f"(of {', '.join(names)}).",
        "sizes": results,
        "machine": {
            **_machine(),
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in load_after],
            "note": "shared host: other engineers' tests run concurrently; compare ratios",
        },
    }
    result["targets"] = _targets(results, idle_mb)
    result["notes"] = _notes(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(_table(result))
    print(f"wrote {args.out}")
    return result


def _measure(
    args: argparse.Namespace, n: int, fmt: str, data_dir: Path, names: list[str], store: Any
) -> dict[str, Any]:
    """Every implementation at one workload, ``--repeats`` times; the summary entry."""
    rays: list[dict[str, Any]] = []
    singles: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    diffs: dict[str, Any] = {}
    for rep in range(args.repeats):
        for name in names:
            print(f"{n:,} rows ({fmt}), run {rep + 1}/{args.repeats}: {name}", flush=True)
            out = args.workdir / "out" / f"{name}-{fmt}-{n}"
            singles[name].append(_run_single(name, data_dir, fmt, out, args.cpus))
        print(f"{n:,} rows ({fmt}), run {rep + 1}/{args.repeats}: ray", flush=True)
        r = _run_ray(data_dir, fmt, args.workdir / "out" / f"lake-{fmt}-{n}", store)
        rays.append(r)
        for name in names:
            diff = _differences(r, singles[name][-1])
            if diff:
                diffs[name] = diff
                print(f"  OUTPUTS DIFFER ({name} vs ray): {diff}", flush=True)
        line = " | ".join(f"{k} {v[-1]['seconds']:.1f}s" for k, v in singles.items())
        print(f"  {line} | ray {r['seconds']:.1f}s {r['peak_pss_mb']:.0f} MB PSS", flush=True)
    return _summarise(n, fmt, rays, singles, diffs)


def _notes(result: dict[str, Any]) -> list[str]:
    """Explain what the measured numbers say, with this run's numbers."""
    notes = []
    load = result["machine"]["loadavg_before"][0]
    cpus = result["machine"]["cpu_count"] or 1
    if load > cpus:
        notes.append(
            f"host load average {load} on {cpus} CPUs before the run (after: "
            f"{result['machine']['loadavg_after'][0]}): absolute times are inflated by other "
            "work; Ray suffers more than one process because it waits for its worker processes "
            "to be scheduled."
        )
    for name, t in result.get("targets", {}).items():
        if name.startswith("throughput") and not t["met"]:
            s = _pick(result["sizes"], int(name.split("_")[-1].rstrip("M")) * 1_000_000)
            phases = ", ".join(f"{k} {v:.1f}s" for k, v in s["ray"]["phases_s"].items() if v >= 0.5)
            notes.append(
                f"{name}: Ray {s['ray']['seconds']}s against {s['baseline']['seconds']}s for "
                f"{s['baseline']['implementation']} (ratio {t['measured']}); Ray's phases: "
                f"{phases}; plan {s['ray']['plan']}."
            )
    growth = result.get("targets", {}).get("ray_memory_growth")
    if growth:
        large = _pick(result["sizes"], growth["to_rows"])
        notes.append(
            f"Ray's peak includes an idle cluster of {result['memory']['idle_cluster_pss_mb']} "
            f"MB (driver, GCS, raylet, agents, idle workers); above that, the peak grew "
            f"{growth['above_idle_cluster']}x from {growth['from_rows']:,} to "
            f"{growth['to_rows']:,} rows; at the largest size's peak, by process kind: "
            f"{large['ray']['runs'][0]['pss_at_peak_mb']} MB."
        )
    return notes


if __name__ == "__main__":
    main()
