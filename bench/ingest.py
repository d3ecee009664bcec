"""Ingest benchmark: the Ray Data pipeline (``app.ingest.run``) against single-process pyarrow.

Run by ``python -m bench.ingest`` (``make bench``); ``--quick`` is a one-minute smoke run.

For each workload size (raw synthetic interactions in Parquet on local disk) it measures, in the
same run, the wall time and peak memory of

- ``ray``: ``app.ingest.run`` on a local Ray cluster started once with ``--cpus`` logical CPUs;
  memory is the summed PSS of the driver and every process it started (GCS, raylet, Ray workers:
  object-store pages are shared, so PSS counts each page once across processes);
- ``baseline``: the same steps (read, validate, dedupe, temporal split, id maps, encode, write)
  in one plain pyarrow/numpy process, run as a subprocess so that its peak RSS is its own.

Both outputs are checked against each other (row accounting, split sizes, user and item counts
and an order-free checksum of every split), then ``bench/results/ingest.json`` is written and a
table printed.
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
import pyarrow.parquet as pq

DEFAULT_SIZES = (1_000_000, 5_000_000, 20_000_000)
QUICK_SIZES = (200_000,)
RESULTS = Path(__file__).resolve().parent / "results" / "ingest.json"
# Targets from the issue: Ray at least as fast as the baseline at the largest size, and Ray's peak
# memory growing at most this many times from the smallest to the largest size.
TARGET_THROUGHPUT_RATIO = 1.0
TARGET_MEMORY_GROWTH = 3.0
_SPLITS = ("train", "valid", "test")
# Raw column names written by app.ingest.generate_synthetic (the baseline does not import app).
_COLUMNS = {"user": "user_id", "item": "item_id", "timestamp": "timestamp", "rating": "rating"}
_EVENT = "event"
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


def _data_dir(workdir: Path, n: int) -> Path:
    w = _workload(n)
    return workdir / "data" / f"synthetic-n{n}-u{w['n_users']}-i{w['n_items']}-f{w['n_files']}"


def _ensure_data(workdir: Path, n: int) -> Path:
    """Generate (once, in a subprocess so the driver's memory stays clean) the raw Parquet files."""
    out = _data_dir(workdir, n)
    if not (out / "_SUCCESS").is_file():
        print(f"generating {n:,} synthetic interactions into {out}", flush=True)
        cmd = [
            sys.executable,
            "-m",
            "bench.ingest",
            "--_generate",
            str(n),
            "--workdir",
            str(workdir),
        ]
        subprocess.run(cmd, check=True)
    return out


def _generate(workdir: Path, n: int) -> None:
    from app.config import SyntheticArgs
    from app.ingest import generate_synthetic

    out = _data_dir(workdir, n)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    generate_synthetic(SyntheticArgs(**_workload(n), format="parquet", seed=0), str(tmp))
    (tmp / "_SUCCESS").touch()
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def _raw_files(data_dir: Path) -> list[str]:
    return sorted(str(p) for p in data_dir.glob("interactions-*.parquet"))


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


class _MemorySampler(threading.Thread):
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
    sampler = _MemorySampler(root)
    sampler._sample_pss(sampler._pids())
    return round(sampler.peak_pss / _MB, 1)


# ---------------------------------------------------------------- baseline (one process)


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
    """Raw ids of any type as trimmed text (1.0 and 1 give the same id)."""
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


def _id_map(ids: pa.ChunkedArray) -> tuple[np.ndarray, pa.Array]:
    """Per row, the index of its id in the sorted (numeric-first) unique ids; and those ids."""
    enc = pc.dictionary_encode(ids).combine_chunks()
    order = np.asarray(pc.sort_indices(_order_key(enc.dictionary)))
    rank = np.empty(len(order), dtype=np.int32)
    rank[order] = np.arange(len(order), dtype=np.int32)
    return rank[enc.indices.to_numpy()], enc.dictionary.take(pa.array(order))


def _baseline_ingest(paths: list[str], out: Path, test_frac: float, valid_frac: float) -> dict:
    """Read → validate → dedupe → per-user temporal split → id maps → encode → write, in memory."""
    phases: dict[str, float] = {}
    t = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        phases[name] = round(now - t, 3)
        t = now

    cols = [*_COLUMNS.values(), _EVENT]
    table = pa.concat_tables([pq.read_table(p, columns=cols) for p in paths])
    rows_read = table.num_rows
    lap("read")

    # validate: missing ids, missing/unparsable/negative timestamps, missing/negative ratings
    user = _as_text(table.column(_COLUMNS["user"]))
    item = _as_text(table.column(_COLUMNS["item"]))
    ts_f = _as_float(table.column(_COLUMNS["timestamp"]))
    weight = _as_float(table.column(_COLUMNS["rating"]))
    bad = pc.fill_null(pc.equal(pc.utf8_length(user), 0), True).to_numpy(zero_copy_only=False)
    bad |= pc.fill_null(pc.equal(pc.utf8_length(item), 0), True).to_numpy(zero_copy_only=False)
    bad |= ~np.isfinite(ts_f) | (ts_f < 0) | ~np.isfinite(weight) | (weight < 0)
    quarantined = int(bad.sum())
    if quarantined:
        good = pa.array(~bad)
        user, item = user.filter(good), item.filter(good)
        ts_f, weight = ts_f[~bad], weight[~bad]
    ts = np.floor(ts_f).astype(np.int64)
    del table, ts_f
    lap("validate")

    # id maps: sorted unique ids; the row's index in them is also its sort rank
    uidx, user_ids = _id_map(user)
    iidx, item_ids = _id_map(item)
    del user, item
    lap("id_maps")

    # dedupe: first event per (user, item) in (user, timestamp, item) order
    order = np.lexsort((iidx, ts, uidx))
    u, i = uidx[order], iidx[order]
    pair = u.astype(np.int64) * len(item_ids) + i
    _, first = np.unique(pair, return_index=True)
    first.sort()
    keep = order[first]
    duplicates = len(order) - len(keep)
    del order, pair, u, i, first
    lap("dedupe")

    # split per user: test = last ceil(tf * n), valid = last ceil(vf * rest) of the remainder
    ku = uidx[keep]
    starts = np.flatnonzero(np.r_[True, ku[1:] != ku[:-1]])
    counts = np.diff(np.r_[starts, len(ku)])
    n = np.repeat(counts, counts)
    from_end = n - 1 - (np.arange(len(ku)) - np.repeat(starts, counts))
    n_test = _ceil_frac(n, test_frac)
    n_valid = _ceil_frac(n - n_test, valid_frac)
    split = np.where(from_end < n_test, 2, np.where(from_end < n_test + n_valid, 1, 0))
    del ku, n, from_end, n_test, n_valid, starts, counts
    lap("split")

    # encode + write
    out.mkdir(parents=True, exist_ok=True)
    sizes, sums = {}, {}
    for code, name in enumerate(_SPLITS):
        rows = keep[split == code]
        part = pa.table(
            {
                "user_idx": pa.array(uidx[rows], pa.int32()),
                "item_idx": pa.array(iidx[rows], pa.int32()),
                "timestamp": pa.array(ts[rows], pa.int64()),
                "weight": pa.array(weight[rows], pa.float32()),
            }
        )
        (out / name).mkdir(exist_ok=True)
        pq.write_table(part, out / name / "part-0.parquet")
        sizes[name] = part.num_rows
        sums[name] = _pair_checksum(part, len(item_ids))
    pq.write_table(
        pa.table({"user_idx": np.arange(len(user_ids)), "user_id": user_ids}), out / "users.parquet"
    )
    pq.write_table(
        pa.table({"item_idx": np.arange(len(item_ids)), "item_id": item_ids}), out / "items.parquet"
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
        "phases_s": phases,
    }


def _pair_checksum(part: pa.Table, n_items: int) -> int:
    """Order-free checksum of a split: sum of user_idx * n_items + item_idx, modulo 2**64."""
    u = part.column("user_idx").to_numpy().astype(np.uint64)
    i = part.column("item_idx").to_numpy().astype(np.uint64)
    return int(np.sum(u * np.uint64(n_items) + i, dtype=np.uint64))


def _baseline_main(data_dir: Path, out: Path, cpus: int) -> None:
    """Subprocess entry point: run the baseline and print its result as one JSON line."""
    import resource

    pa.set_cpu_count(cpus)
    pa.set_io_thread_count(cpus)
    t0 = time.perf_counter()
    result = _baseline_ingest(_raw_files(data_dir), out, 0.2, 0.1)
    result["seconds"] = time.perf_counter() - t0
    result["max_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(result), flush=True)


def _run_baseline(data_dir: Path, out: Path, cpus: int) -> dict[str, Any]:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "bench.ingest", "--_baseline", str(data_dir), str(out)]
    cmd += ["--cpus", str(cpus)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    sampler = _MemorySampler(proc.pid)
    sampler.start()
    stdout, _ = proc.communicate()
    wall = time.perf_counter() - t0
    sampler.stop()
    if proc.returncode:
        raise RuntimeError(f"baseline failed with exit code {proc.returncode}")
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


# Phase names of app.ingest.IngestProfile -> the names bench/results/ingest.json has used.
_PHASE_NAMES = {
    "fingerprint": "fingerprint_sha256",
    "check_headers": "preflight",
    "stage": "read_normalise_shuffle_dedupe_stage",
    "stats": "stats_collect",
    "write_splits": "encode_write_splits",
}


def _profile_report(profile: Any) -> dict[str, Any]:
    """Phase seconds (named after what they run) and Ray Data's per-operator summary."""
    return {
        "phases_s": {_PHASE_NAMES.get(k, k): v for k, v in profile.phases.items()},
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


def _start_ray(cpus: int, dashboard: bool) -> None:
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    import ray

    # address="local": always a fresh cluster of our own, never another engineer's `ray start`.
    # Ray gives the raylet a fixed 30 s to register; on a busy shared host that can run out.
    for attempt in range(3):
        try:
            ray.init(
                address="local", num_cpus=cpus, include_dashboard=dashboard, log_to_driver=False
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


def _run_ray(data_dir: Path, lake: Path, store_reader: Any) -> dict[str, Any]:
    from app.config import DataArgs
    from app.ingest import SYNTHETIC_COLUMNS, IngestProfile, run
    from app.store import Lake

    shutil.rmtree(lake, ignore_errors=True)
    data = DataArgs(
        name="bench",
        source="files",
        format="parquet",
        path=str(data_dir),
        columns=SYNTHETIC_COLUMNS,
    )
    sampler = _MemorySampler(os.getpid(), store_reader)
    sampler.start()
    t0 = time.perf_counter()
    profile = IngestProfile()
    version = run(data, Lake(str(lake)), profile=profile)
    seconds = time.perf_counter() - t0
    sampler.stop()
    m = version.manifest
    root = Path(version.lake.path(version.rel))
    checksums = {
        s: _pair_checksum(pq.read_table(root / s, columns=["user_idx", "item_idx"]), m["n_items"])
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


def _check_same(ray_r: dict[str, Any], base: dict[str, Any]) -> None:
    """Both implementations must produce the same splits (this validates both)."""
    keys = ("rows_read", "rows_quarantined", "duplicates_collapsed", "splits", "checksums")
    keys += ("n_users", "n_items")
    diff = {k: (ray_r[k], base[k]) for k in keys if ray_r[k] != base[k]}
    if diff:
        raise AssertionError(f"Ray pipeline and baseline disagree (ray, baseline): {diff}")


# ---------------------------------------------------------------- driver


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 2)


def _summarise(n: int, rays: list[dict], bases: list[dict]) -> dict[str, Any]:
    r_s = _median([r["seconds"] for r in rays])
    b_s = _median([b["seconds"] for b in bases])
    ray_mem = _median([r["peak_pss_mb"] for r in rays])
    base_mem = _median([b["peak_rss_mb"] for b in bases])
    return {
        "rows": n,
        "workload": {**_workload(n), "format": "parquet", "files_on": "local disk"},
        "repeats": len(rays),
        "ray": {
            "seconds": r_s,
            "rows_per_s": round(n / r_s),
            "peak_pss_mb": ray_mem,
            "runs": rays,
        },
        "baseline": {
            "seconds": b_s,
            "rows_per_s": round(n / b_s),
            "peak_rss_mb": base_mem,
            "runs": bases,
        },
        "throughput_ratio_ray_over_baseline": round(b_s / r_s, 3),
        "memory_ratio_ray_over_baseline": round(ray_mem / base_mem, 2),
        "outputs_match": True,
    }


def _table(result: dict[str, Any]) -> str:
    head = (
        f"{'rows':>11} {'ray s':>8} {'ray rows/s':>11} {'ray PSS MB':>11} "
        f"{'base s':>8} {'base rows/s':>11} {'base RSS MB':>11} {'thr ratio':>9}"
    )
    lines = [head, "-" * len(head)]
    for s in result["sizes"]:
        r, b = s["ray"], s["baseline"]
        lines.append(
            f"{s['rows']:>11,} {r['seconds']:>8.1f} {r['rows_per_s']:>11,} "
            f"{r['peak_pss_mb']:>11,.0f} {b['seconds']:>8.1f} {b['rows_per_s']:>11,} "
            f"{b['peak_rss_mb']:>11,.0f} {s['throughput_ratio_ray_over_baseline']:>9.2f}"
        )
    lines.append("")
    for name, target in result.get("targets", {}).items():
        if isinstance(target, dict):
            lines.append(
                f"{name}: {target.get('measured')} (target {target['target']}): "
                f"{'met' if target['met'] else 'MISSED'}"
            )
    return "\n".join(lines)


def _targets(sizes: list[dict[str, Any]], idle_mb: float) -> dict[str, Any]:
    small, large = sizes[0], sizes[-1]
    ray_growth = large["ray"]["peak_pss_mb"] / small["ray"]["peak_pss_mb"]
    above_idle = (large["ray"]["peak_pss_mb"] - idle_mb) / max(
        1.0, small["ray"]["peak_pss_mb"] - idle_mb
    )
    base_growth = large["baseline"]["peak_rss_mb"] / small["baseline"]["peak_rss_mb"]
    ratio = large["throughput_ratio_ray_over_baseline"]
    return {
        "throughput": {
            "at_rows": large["rows"],
            "measured": ratio,
            "target": f">= {TARGET_THROUGHPUT_RATIO}",
            "met": ratio >= TARGET_THROUGHPUT_RATIO,
        },
        "ray_memory_growth": {
            "from_rows": small["rows"],
            "to_rows": large["rows"],
            "data_growth": round(large["rows"] / small["rows"], 1),
            "measured": round(ray_growth, 2),
            "target": f"<= {TARGET_MEMORY_GROWTH}",
            "met": ray_growth <= TARGET_MEMORY_GROWTH,
            "above_idle_cluster": round(above_idle, 2),
        },
        "baseline_memory_growth": round(base_growth, 2),
    }


def _machine() -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "pyarrow": pa.__version__,
        "numpy": np.__version__,
        "mem_total_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
    }


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Run the benchmark and write ``bench/results/ingest.json``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default=",".join(str(s) for s in DEFAULT_SIZES))
    p.add_argument("--quick", action="store_true", help=f"smoke run at {QUICK_SIZES[0]:,} rows")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/scalerec-bench"))
    p.add_argument("--cpus", type=int, default=2, help="logical CPUs for Ray (and Arrow threads)")
    p.add_argument("--repeats", type=int, default=1, help="runs per size; medians are reported")
    p.add_argument("--dashboard", action="store_true", help="start Ray's dashboard too")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--_generate", type=int, help=argparse.SUPPRESS)
    p.add_argument("--_baseline", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._generate:
        _generate(args.workdir, args._generate)
        return None
    if args._baseline:
        _baseline_main(args._baseline[0], args._baseline[1], args.cpus)
        return None

    sizes = list(QUICK_SIZES) if args.quick else sorted(int(s) for s in args.sizes.split(","))
    data_dirs = {n: _ensure_data(args.workdir, n) for n in sizes}
    load_before = os.getloadavg()
    _start_ray(args.cpus, args.dashboard)
    import ray

    store_reader = _object_store_reader()
    time.sleep(2)  # let the worker pool settle before measuring the idle footprint
    idle_mb = _idle_pss_mb(os.getpid())
    results = []
    try:
        for n in sizes:
            rays, bases = [], []
            for rep in range(args.repeats):
                print(f"{n:,} rows, run {rep + 1}/{args.repeats}: baseline", flush=True)
                out = args.workdir / "out" / f"baseline-{n}"
                bases.append(_run_baseline(data_dirs[n], out, args.cpus))
                print(f"{n:,} rows, run {rep + 1}/{args.repeats}: ray", flush=True)
                r = _run_ray(data_dirs[n], args.workdir / "out" / f"lake-{n}", store_reader)
                _check_same(r, bases[-1])
                rays.append(r)
                print(
                    f"  baseline {bases[-1]['seconds']:.1f}s {bases[-1]['peak_rss_mb']:.0f} MB"
                    f" | ray {r['seconds']:.1f}s {r['peak_pss_mb']:.0f} MB PSS",
                    flush=True,
                )
            results.append(_summarise(n, rays, bases))
    finally:
        ray.shutdown()
    load_after = os.getloadavg()
    result = {
        "benchmark": "ingest",
        "description": "raw synthetic interactions (Parquet, local disk) → validated, deduped, "
        "split, id-mapped, encoded train/valid/test Parquet",
        "cpus": args.cpus,
        "ray_dashboard": args.dashboard,
        "memory": {
            "ray": "peak over time of the summed PSS of the driver and all its descendants "
            "(GCS, raylet, agents, Ray workers), sampled every "
            f"{_TICK_S * _PSS_EVERY:.1f} s from /proc/<pid>/smaps_rollup; PSS splits shared "
            "pages (object store, libraries) between the processes that map them, so each "
            "page counts once. Includes the idle cluster (idle_cluster_pss_mb).",
            "baseline": "peak RSS (ru_maxrss) of the single baseline process, exact.",
            "idle_cluster_pss_mb": idle_mb,
        },
        "throughput": "raw input rows / wall seconds of the whole ingest (Ray: app.ingest.run, "
        "including input fingerprinting; baseline: read to written files)",
        "sizes": results,
        "machine": {
            **_machine(),
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in load_after],
            "note": "shared host: other engineers' tests run concurrently; compare ratios",
        },
    }
    result["cast_probe"] = _cast_probe(data_dirs[sizes[-1]])
    if len(results) >= 2:
        result["targets"] = _targets(results, idle_mb)
    result["notes"] = _notes(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(_table(result))
    print(f"wrote {args.out}")
    return result


def _cast_probe(data_dir: Path) -> dict[str, Any]:
    """Time ``app.ingest.as_binary`` on one int64 id column against a cast through ``string``.

    Parquet ids are int64 here; Arrow has no int64 → binary cast, so ``as_binary`` must go another
    way (the output is the same text either way).
    """
    from app.ingest import as_binary

    col = pq.read_table(_raw_files(data_dir)[0], columns=[_COLUMNS["user"]]).column(0)
    t0 = time.process_time()
    slow = as_binary(col)
    t1 = time.process_time()
    fast = pc.cast(pc.cast(col, pa.string()), pa.binary())
    t2 = time.process_time()
    return {
        "rows": len(col),
        "as_binary_cpu_us_per_value": round((t1 - t0) / len(col) * 1e6, 3),
        "cast_via_string_cpu_us_per_value": round((t2 - t1) / len(col) * 1e6, 3),
        "same_output": slow.equals(fast),
    }


def _notes(result: dict[str, Any]) -> list[str]:
    """Explain misses with the measured numbers of this run."""
    notes = []
    load = result["machine"]["loadavg_before"][0]
    cpus = result["machine"]["cpu_count"] or 1
    if load > cpus:
        notes.append(
            f"host load average {load} on {cpus} CPUs before the run (after: "
            f"{result['machine']['loadavg_after'][0]}): absolute times are inflated by other "
            "work; Ray suffers more than the baseline because it waits for worker and actor "
            "processes to be scheduled (see ListFiles wall vs CPU time in ray_data_operators)."
        )
    targets = result.get("targets", {})
    large = result["sizes"][-1]
    ray_run = large["ray"]["runs"][0]
    probe = result.get("cast_probe", {})
    if targets and not targets["throughput"]["met"]:
        phases = ", ".join(f"{k} {v:.1f}s" for k, v in ray_run["phases_s"].items() if v >= 0.5)
        notes.append(
            f"throughput: at {large['rows']:,} rows Ray ran {large['ray']['seconds']}s against "
            f"{large['baseline']['seconds']}s for the baseline (ratio "
            f"{large['throughput_ratio_ray_over_baseline']}). Ray's phases: {phases}. "
            "Causes: (1) app.ingest.as_binary turns every int id and timestamp into text, as "
            f"Arrow has no int64 → binary cast ({probe.get('as_binary_cpu_us_per_value')} "
            "µs/value against "
            f"{probe.get('cast_via_string_cpu_us_per_value')} µs via a string cast, 3 int "
            "columns per row); (2) the pipeline makes three passes with a Parquet round trip "
            "(shuffle+stage, stats, encode) where the baseline makes one; (3) fixed costs per "
            "execution (ListFiles task, hash-shuffle aggregator actors, worker start-up)."
        )
    if targets and not targets["ray_memory_growth"]["met"]:
        notes.append(
            f"memory: Ray's peak PSS grew {targets['ray_memory_growth']['measured']}x for "
            f"{targets['ray_memory_growth']['data_growth']}x more rows; at the peak: "
            f"{ray_run['pss_at_peak_mb']} MB by process kind, object store peak "
            f"{ray_run.get('peak_object_store_used_mb')} MB. The hash shuffle by user "
            "(repartition(keys=[user])) starts its reduce tasks only after every map task has "
            "put its shards in the object store, so the whole normalised dataset (string ids, "
            "the file path on every row) is resident at once, until the store (30% of RAM by "
            "default) fills and spills to disk."
        )
    if targets:
        growth = targets["ray_memory_growth"]
        notes.append(
            f"Ray's peak includes an idle cluster of {result['memory']['idle_cluster_pss_mb']} "
            f"MB (driver, GCS, raylet, agents, idle workers); above that, the peak grew "
            f"{growth['above_idle_cluster']}x from {growth['from_rows']:,} to "
            f"{growth['to_rows']:,} rows."
        )
    return notes


if __name__ == "__main__":
    main()
