"""The ingest pipeline on Ray Data: raw source -> published, versioned dataset.

``run(data, lake)`` publishes ``<lake>/datasets/<data.name>/<version>/`` and returns it. The
version id is a hash of the inputs' content (``fingerprint``), the ``data`` config and
``PIPELINE_VERSION``; when that version exists already, nothing runs and it is returned as is.

The rows flow through Ray Data once, in two passes with a shuffle by user through storage
between them; no row goes through the object store, and no task holds more than one batch
(pass 1) or one bucket (pass 2). With N input rows, U users, I items and B buckets:

0. Driver, before Ray: resolve the source (download, convert or generate once; ``events``: the
   previous version + the new events, ``app.ingest.events_source``), fingerprint every file
   (SHA-256 streamed, or the ETag on object stores), check every file's header
   (``check_headers``: a wrong column or delimiter fails before any Ray work) and plan
   (``app.ingest.plan``): Parquet files are cut into units of consecutive row groups (from their
   footers), CSV and JSON-lines files are one unit each; B = the CPU count times
   ceil(N / (CPUs x ``BUCKET_ROWS``)), so a bucket holds about ``BUCKET_ROWS`` rows whatever N
   (N is estimated from the file sizes for text formats). Holds: the file list and the plan.
1. Read (one Ray Data execution, ``buckets.read_unit`` per unit): read and ``normalise`` a batch
   (a Parquet batch of ``ReadContext.batch_rows`` rows, a CSV block, a JSON-lines chunk), hash
   each good row's user id to a bucket (``bucket_of``) and append the good rows (user, item,
   time, weight, input file *index*, row) to that bucket's Arrow IPC file under the attempt's
   folder; bad rows (file, row, reason, raw) go to the attempt's quarantine file. The file path
   and reason strings never leave the task. Each task returns one row: rows read (counted from
   the input by ``readers.count_rows``, apart from the parser), good and quarantined rows,
   reasons, its distinct user and item ids and the names of its files. A task holds one batch
   plus up to ``ReadContext.flush_rows`` buffered rows. The driver merges the distinct ids as
   they arrive (``DistinctIds``, in ``passes.ReadTotals``: O(U + I)).
2. Id maps (driver): dedupe only collapses (user, item) repeats, so the users and items of the
   good rows are those of the dataset: both id maps are sorted numeric-first (``id_table``)
   once. The user map is cut by bucket into one small file per bucket (U / B ids each); the
   item map (I ids) goes to every pass-2 task. The quarantine files the tasks reported are moved
   to ``<lake>/quarantine/<name>/<version>``. Holds: both id maps.
3. Split (one Ray Data execution inside ``Lake.publish``, ``bucket_split.split_bucket`` per
   bucket): read the bucket's files (every row of about N / B rows' users), map ids to indices,
   dedupe and split with vectorised numpy (``split_codes``) and write one Parquet file per split
   into the version's staging folder; return the file names and the counts per input file and
   status. A task holds one bucket (about ``BUCKET_ROWS`` rows) and the item map.
4. Publish: once the row accounting adds up (``build_manifest``) the manifest, which lists every
   split file (``split_files``), is written last and makes the version visible; readers read
   only the listed files (``DatasetVersion.split_paths``).

Crashes and retries. Each run writes under its own attempt folder
``<lake>/tmp/ingest-<name>-<version>/<attempt id>/`` (a rerun first removes older attempts) and
names its split files after the attempt; every task names its files with a random tag and
returns them, and only returned files are read or listed. So a task retried by Ray neither
double counts nor publishes twice, and on S3, where the split files go straight into the
version's folder, a run killed mid-write and rerun publishes exactly the rerun's files: the
killed run's files stay unlisted (and unread) next to them.

Every input row ends up ingested, quarantined with a reason, or collapsed as a duplicate, per file.
"""

from __future__ import annotations

import json
import logging
import posixpath
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from app.config import DataArgs, EventsArgs
from app.ingest.bucket_split import SplitContext, split_bucket
from app.ingest.buckets import BUCKETS, ERROR, QUARANTINE, TASK, USERS, ReadContext, read_unit
from app.ingest.errors import IngestError
from app.ingest.idmaps import id_table, item_genres
from app.ingest.manifest import PIPELINE_VERSION, build_manifest
from app.ingest.passes import (
    ReadTotals,
    counts_by_file,
    fill_empty_splits,
    merge_splits,
    publish_quarantine,
    write_user_maps,
)
from app.ingest.plan import make_plan
from app.ingest.readers import check_headers, reader_spec
from app.ingest.sources import RawSource, fingerprint, resolve_source
from app.store import (
    ITEM_ID,
    ITEM_IDX,
    MANIFEST,
    SPLITS,
    USER_ID,
    USER_IDX,
    DatasetVersion,
    Lake,
    as_lake,
    content_id,
    datasets_root,
    load_dataset,
    utc_now,
)

log = logging.getLogger(__name__)


@dataclass
class IngestProfile:
    """Where one ``run`` spent its time; pass one to ``run(..., profile=...)`` to fill it."""

    phases: dict[str, float] = field(default_factory=dict)
    """Wall seconds per phase, in run order."""
    dataset_stats: list[str] = field(default_factory=list)
    """Ray Data's execution summary (``Dataset.stats()``) of each pass."""
    plan: dict[str, Any] = field(default_factory=dict)
    """Units, buckets and estimated rows of the run."""

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the ``with`` block as phase ``name``."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = round(time.perf_counter() - t, 3)


def run(
    data: DataArgs,
    lake: Lake | str,
    seed: int = 0,
    *,
    events: EventsArgs | None = None,
    profile: IngestProfile | None = None,
) -> DatasetVersion:
    """Ingest ``data`` into ``<lake>/datasets/<data.name>/<version>/`` and return the version.

    Re-running with the same inputs and config returns the existing version untouched.

    Args:
        data: The ``data`` section of the config.
        lake: The lake (a URI is accepted too while callers move to ``Lake``).
        seed: Unused: ingest is deterministic; kept so that stages share one signature.
        events: The online store settings (``cfg.serve.events``) for ``data.source: events``;
            default ``EventsArgs()``.
        profile: Filled with phase timings, the plan and Ray Data stats (for benchmarks).

    Raises:
        SourceError: when the raw files cannot be found, fetched or generated.
        IngestError: when the input cannot be ingested at all (bad header, no valid row).
    """
    t0 = time.time()
    lake = as_lake(lake)
    prof = profile if profile is not None else IngestProfile()
    with prof.phase("resolve"):
        src = resolve_source(data, cache_dir=lake.full_uri("raw"), lake=lake, events=events)
    if src.events is not None and not src.events.n_events:
        log.info("no event since %s/%s: nothing to add", data.name, src.events.previous_version)
        return load_dataset(lake, data.name, src.events.previous_version)
    spec = reader_spec(src, data)
    if src.event_weights is not None:
        spec["event_weights"] = dict(src.event_weights)
    with prof.phase("fingerprint"):
        prints = fingerprint(src.paths)
    version = content_id(
        {
            "pipeline": PIPELINE_VERSION,
            "inputs": prints,
            "item_features": src.item_features,
            "data": data.model_dump(mode="json", exclude={"name", "download"}),
            "spec": {k: v for k, v in spec.items() if k != "storage_options"},
        }
    )
    rel = posixpath.join(datasets_root(data.name), version)
    if lake.is_published(rel):
        log.info("dataset %s/%s already exists: inputs and config unchanged", data.name, version)
        return load_dataset(lake, data.name, version)

    log.info("ingesting %s (%d file(s)) into %s", src.description, len(src.paths), lake.uri)
    with prof.phase("check_headers"):
        warnings = check_headers(src, spec)
    job = _Job(data, src, spec, prints, version, lake, _attempt_id(), prof, warnings, t0)
    lake.remove(job.staged_rel)  # earlier attempts, e.g. of a killed run: never read again
    try:
        job.run()
    finally:
        lake.remove(job.staged_rel)
    log.info("published %s", lake.full_uri(rel, MANIFEST))
    return load_dataset(lake, data.name, version)


def _attempt_id() -> str:
    """Sortable, unique id of one ``run`` attempt: UTC time + random suffix."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


class _Job:
    """One ingest attempt once the version id is known: plan, the two passes, publish."""

    def __init__(
        self,
        data: DataArgs,
        src: RawSource,
        spec: dict[str, Any],
        prints: list[dict[str, Any]],
        version: str,
        lake: Lake,
        attempt_id: str,
        prof: IngestProfile,
        warnings: list[str],
        t0: float,
    ) -> None:
        self.data, self.src, self.spec, self.prints = data, src, spec, prints
        self.version, self.lake, self.attempt_id = version, lake, attempt_id
        self.prof, self.warnings, self.t0 = prof, warnings, t0
        self.staged_rel = posixpath.join("tmp", f"ingest-{data.name}-{version}")
        self.attempt_rel = posixpath.join(self.staged_rel, attempt_id)
        self.quarantine_rel = posixpath.join("quarantine", data.name, version)

    def run(self) -> None:
        """Plan, read into buckets, build the id maps, then split and publish."""
        lake, prof = self.lake, self.prof
        with prof.phase("plan"):
            units, n_buckets = make_plan(self.src, self.spec, self.prints, _cluster_cpus())
            prof.plan.update(units=len(units), buckets=n_buckets, attempt=self.attempt_id)
            for sub in (BUCKETS, QUARANTINE, USERS):
                lake.fs.makedirs(lake.path(self.attempt_rel, sub), exist_ok=True)
        ctx = ReadContext(
            spec=self.spec,
            paths=tuple(self.src.paths),
            fmt=self.src.format,
            fs=lake.arrow_fs,
            attempt=lake.path(self.attempt_rel),
            n_buckets=n_buckets,
        )
        totals = ReadTotals(len(self.src.paths))
        with prof.phase("read_bucket"):
            for stats in _map_tasks(read_unit, units, ctx, prof):
                totals.add(stats)
        if totals.units != {u["unit"] for u in units}:
            raise IngestError("internal: some read units reported no result")
        with prof.phase("id_maps"):
            users = id_table(totals.users.result(), USER_IDX, USER_ID)
            items = item_genres(self.src, id_table(totals.items.result(), ITEM_IDX, ITEM_ID))
            write_user_maps(lake, self.attempt_rel, users, n_buckets)
        with prof.phase("quarantine"):
            quarantined = publish_quarantine(
                lake, self.attempt_rel, totals.quarantine_files, self.quarantine_rel
            )
        if users.num_rows == 0:
            raise IngestError(
                f"no valid interactions in {self.src.description}: "
                + (
                    f"all rows quarantined, see {lake.full_uri(self.quarantine_rel)}"
                    if totals.quarantined.sum()
                    else "the input files are empty"
                )
            )
        rel = posixpath.join(datasets_root(self.data.name), self.version)
        write = self._writer(totals, users, items, quarantined)
        lake.publish(rel, write, {"name": self.data.name, "version": self.version})

    def _writer(
        self, totals: ReadTotals, users: pa.Table, items: pa.Table, quarantined: list[str]
    ) -> Callable[[str], dict[str, Any]]:
        """``Lake.publish``'s write step: pass 2 into the staging folder, then the manifest."""

        def write(stage: str) -> dict[str, Any]:
            lake = self.lake
            for split in SPLITS:
                lake.fs.makedirs(posixpath.join(stage, split), exist_ok=True)
            ctx = SplitContext(
                fs=lake.arrow_fs,
                attempt=lake.path(self.attempt_rel),
                stage=stage,
                attempt_id=self.attempt_id,
                items=items.column(ITEM_ID).combine_chunks(),
                n_files=len(self.src.paths),
                test_fraction=self.data.test_fraction,
                valid_fraction=self.data.valid_fraction,
            )
            tasks = [{"bucket": b, "files": f} for b, f in sorted(totals.bucket_files.items())]
            with self.prof.phase("split_write"):
                results = _map_tasks(split_bucket, tasks, ctx, self.prof)
                parts, status = merge_splits(results, {t["bucket"] for t in tasks})
            with self.prof.phase("publish"):
                parts = fill_empty_splits(lake, stage, parts, self.attempt_id)
                manifest = build_manifest(
                    self.data,
                    self.src,
                    self.version,
                    self.prints,
                    {p: int(n) for p, n in zip(self.src.paths, totals.rows_read, strict=True)},
                    counts_by_file(self.src.paths, totals, status),
                    dict(totals.reasons),
                    users,
                    items,
                    lake.full_uri(self.quarantine_rel) if quarantined else None,
                    self.warnings,
                    split_files=parts,
                    quarantine_files=quarantined,
                    ingest={**self.prof.plan, "finished_at": utc_now()},
                )
                pq.write_table(users, posixpath.join(stage, "users.parquet"), filesystem=ctx.fs)
                pq.write_table(items, posixpath.join(stage, "items.parquet"), filesystem=ctx.fs)
            return {**manifest, "ingest_seconds": round(time.time() - self.t0, 2)}

        return write


def _cluster_cpus() -> int:
    """CPUs of the Ray cluster (started here, as Ray Data would, when the caller did not)."""
    import ray

    if not ray.is_initialized():
        ray.init()
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _map_tasks(
    fn: Callable[..., pa.Table], tasks: list[dict[str, Any]], ctx: Any, prof: IngestProfile
) -> Iterator[pa.Table]:
    """Run ``fn(one-row table, ctx)`` once per task with Ray Data; yield the result rows.

    One block per task, so each task is one Ray task (retried by Ray on failure; a result is
    returned once whatever the retries). Results stream back as tasks finish.

    Raises:
        IngestError: the first input problem a task reported (its ``error`` column).
    """
    import ray.data

    if not tasks:
        return
    items = [{TASK: json.dumps(t)} for t in tasks]
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        fn, fn_kwargs={"ctx": ctx}, batch_size=1, batch_format="pyarrow"
    )
    for stats in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        yield raise_reported(stats)
    prof.dataset_stats.append(ds.stats())


def raise_reported(stats: pa.Table) -> pa.Table:
    """``stats`` unless a task reported an input problem: then raise it as ``IngestError``."""
    errors = stats.column(ERROR).drop_null()
    if len(errors):
        raise IngestError(errors[0].as_py())
    return stats
