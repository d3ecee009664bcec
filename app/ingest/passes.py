"""The driver's side of the two ingest passes, apart from running them.

Merging the tasks' result rows (``ReadTotals`` for pass 1, ``merge_splits`` for pass 2,
``counts_by_file`` for the manifest) and the storage steps between and after the passes: the
user id map cut by bucket (``write_user_maps``), the quarantine files moved to their version's
folder (``publish_quarantine``) and an empty file for a split without rows
(``fill_empty_splits``). The passes are described in ``app.ingest.pipeline``.
"""

from __future__ import annotations

import json
import posixpath
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from app.ingest.buckets import QUARANTINE, USERS, bucket_of
from app.ingest.errors import IngestError
from app.ingest.idmaps import DistinctIds
from app.ingest.split import QUARANTINED, STATUS_NAMES
from app.store import INTERACTION_SCHEMA, SPLITS, USER_ID, Lake


@dataclass
class ReadTotals:
    """Pass 1's results merged in the driver: counts per input file, ids, file names."""

    n_files: int
    rows_read: np.ndarray = field(init=False)
    good: np.ndarray = field(init=False)
    quarantined: np.ndarray = field(init=False)
    reasons: Counter[str] = field(default_factory=Counter)
    users: DistinctIds = field(default_factory=DistinctIds)
    items: DistinctIds = field(default_factory=DistinctIds)
    bucket_files: dict[int, list[str]] = field(default_factory=dict)
    quarantine_files: list[str] = field(default_factory=list)
    units: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.rows_read, self.good, self.quarantined = (
            np.zeros(self.n_files, dtype=np.int64) for _ in range(3)
        )

    def add(self, stats: pa.Table) -> None:
        """Merge the result rows of some pass-1 tasks."""
        for unit, f, read, good, bad, reasons in zip(
            *(stats.column(c).to_pylist() for c in ("unit", "file", "rows_read", "good")),
            stats.column("quarantined").to_pylist(),
            stats.column("reasons").to_pylist(),
            strict=True,
        ):
            if unit in self.units:
                raise IngestError(f"internal: read unit {unit} reported twice")
            self.units.add(unit)
            self.rows_read[f] += read
            self.good[f] += good
            self.quarantined[f] += bad
            self.reasons.update(json.loads(reasons))
        self.users.add(pc.list_flatten(stats.column("users")))
        self.items.add(pc.list_flatten(stats.column("items")))
        for name in pc.list_flatten(stats.column("bucket_files")).to_pylist():
            # b<bucket>-u<unit>-<tag>.arrow
            self.bucket_files.setdefault(int(name[1:].split("-", 1)[0]), []).append(name)
        self.quarantine_files += pc.list_flatten(stats.column("quarantine_files")).to_pylist()


def write_user_maps(lake: Lake, attempt_rel: str, users: pa.Table, n_buckets: int) -> None:
    """One file per bucket with its users' (index, id), in index order, for pass 2."""
    buckets = bucket_of(users.column(USER_ID), n_buckets)
    order = np.argsort(buckets, kind="stable")
    counts = np.bincount(buckets, minlength=n_buckets)
    starts = np.cumsum(counts) - counts
    ordered = users.take(pa.array(order))
    for b in np.flatnonzero(counts):
        path = lake.path(attempt_rel, USERS, f"b{b:05d}.parquet")
        pq.write_table(ordered.slice(starts[b], counts[b]), path, filesystem=lake.arrow_fs)


def publish_quarantine(lake: Lake, attempt_rel: str, files: list[str], rel: str) -> list[str]:
    """Move the reported quarantine files to ``rel`` (replacing an earlier attempt's)."""
    lake.remove(rel)
    if not files:
        return []
    lake.fs.makedirs(lake.path(rel), exist_ok=True)
    for name in sorted(files):
        lake.fs.mv(lake.path(attempt_rel, QUARANTINE, name), lake.path(rel, name))
    return sorted(files)


def merge_splits(
    results: Iterable[pa.Table], buckets: set[int]
) -> tuple[dict[str, list[str]], dict[int, np.ndarray]]:
    """Merge pass 2's result rows (one per bucket of ``buckets``).

    Returns the split files per split, and the rows per input file index and status code.
    """
    parts: dict[str, list[str]] = {s: [] for s in SPLITS}
    status: dict[int, np.ndarray] = {}
    seen: set[int] = set()
    for stats in results:
        for bucket, files, counts in zip(
            stats.column("bucket").to_pylist(),
            stats.column("parts").to_pylist(),
            stats.column("counts").to_pylist(),
            strict=True,
        ):
            if bucket in seen:
                raise IngestError(f"internal: bucket {bucket} reported twice")
            seen.add(bucket)
            for part in files:
                parts[part.split("/", 1)[0]].append(part)
            for f, c in json.loads(counts).items():
                status[int(f)] = status.get(int(f), 0) + np.asarray(c, dtype=np.int64)
    if seen != buckets:
        raise IngestError("internal: some buckets reported no result")
    return {s: sorted(p) for s, p in parts.items()}, status


def fill_empty_splits(
    lake: Lake, stage: str, parts: dict[str, list[str]], attempt_id: str
) -> dict[str, list[str]]:
    """Give a split without rows one empty file, so that every split reads as a table."""
    for split, files in parts.items():
        if not files:
            rel = f"{split}/part-{attempt_id}-empty.parquet"
            empty = INTERACTION_SCHEMA.empty_table()
            pq.write_table(empty, posixpath.join(stage, rel), filesystem=lake.arrow_fs)
            files.append(rel)
    return parts


def counts_by_file(
    paths: list[str], totals: ReadTotals, status: dict[int, np.ndarray]
) -> dict[str, dict[str, int]]:
    """Rows per input file and status, for ``build_manifest``.

    Raises:
        IngestError: when pass 2 saw other rows than pass 1 wrote (an internal error).
    """
    by_file = {}
    for f, path in enumerate(paths):
        counts = status.get(f, np.zeros(len(STATUS_NAMES), dtype=np.int64))
        if int(counts.sum()) != int(totals.good[f]):
            raise IngestError(
                f"internal: {path}: {totals.good[f]} good rows read but {counts.sum()} split"
            )
        entry = {name: int(n) for name, n in zip(STATUS_NAMES, counts, strict=True)}
        entry[QUARANTINED] = int(totals.quarantined[f])
        by_file[path] = entry
    return by_file
