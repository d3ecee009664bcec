"""The ingest pipeline on Ray Data: raw source -> published, versioned dataset.

``run(data, lake)`` publishes ``<lake>/datasets/<data.name>/<version>/`` and returns it. The
version id is a hash of the inputs' content (``fingerprint``), the ``data`` config and
``PIPELINE_VERSION``; when that version exists already, nothing runs and it is returned as is.

Passes, and what each holds in memory:

0. Driver, before Ray: resolve the source (download, convert or generate once; ``events``:
   the previous version + the new events, ``app.ingest.events_source``), fingerprint
   every file (SHA-256 streamed in blocks, or the ETag on object stores) and read every file's
   header (``check_headers``), so that a wrong column or delimiter fails before any Ray work.
1. Stage (one Ray Data execution): read (CSV in blocks, JSON lines in chunks, Parquet by
   block) -> ``normalise`` every row -> hash-shuffle by user -> per partition
   ``dedupe_and_split`` -> Parquet under ``<lake>/tmp``. A read task holds one block; the
   shuffle keeps the whole normalised dataset in the object store (spilling to disk) until its
   reduce tasks run; a reduce task holds one partition, i.e. every row of its users. A
   zero-CPU actor counts the rows each reader produced, per file, independently of the later
   steps.
2. Stats: one streaming pass over the staged rows; each block returns counts by (file,
   status), quarantine reasons and its distinct user and item ids. The driver holds the
   distinct ids (the id maps, sorted numeric-first) and the item genres of ``item_features``.
3. Quarantine: the staged bad rows (file, row, reason, raw) are written to
   ``<lake>/quarantine/<name>/<version>``, streaming.
4. Publish: once the row accounting adds up (``build_manifest``), ``Lake.publish`` runs the
   last pass into a staging folder: the staged good rows are mapped to integer ids (every task
   gets both id maps) and written per split, then ``users.parquet`` and ``items.parquet``;
   ``manifest.json`` comes last and makes the version visible. The staged rows are then removed.

Every input row ends up ingested, quarantined with a reason, or collapsed as a duplicate, per file.
"""

from __future__ import annotations

import json
import logging
import posixpath
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from app.config import DataArgs, EventsArgs
from app.ingest.errors import IngestError
from app.ingest.idmaps import id_table, item_genres
from app.ingest.manifest import PIPELINE_VERSION, build_manifest
from app.ingest.readers import (
    check_headers,
    csv_batches,
    jsonl_batches,
    parquet_table,
    reader_spec,
)
from app.ingest.sources import RawSource, fingerprint, resolve_source
from app.ingest.split import QUARANTINED, STAGED_SCHEMA, STATUS, dedupe_and_split
from app.ingest.validate import FILE, ITEM, NORMAL_SCHEMA, QUARANTINE_SCHEMA, REASON, TS, USER, W
from app.store import (
    INTERACTION_SCHEMA,
    ITEM_ID,
    ITEM_IDX,
    MANIFEST,
    SPLITS,
    TIMESTAMP,
    USER_ID,
    USER_IDX,
    WEIGHT,
    DatasetVersion,
    Lake,
    as_lake,
    content_id,
    datasets_root,
    filesystem_for,
    load_dataset,
)

log = logging.getLogger(__name__)


@dataclass
class IngestProfile:
    """Where one ``run`` spent its time; pass one to ``run(..., profile=...)`` to fill it."""

    phases: dict[str, float] = field(default_factory=dict)
    """Wall seconds per phase, in run order."""
    dataset_stats: list[str] = field(default_factory=list)
    """Ray Data's execution summary (``Dataset.stats()``) of each dataset written."""

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
        profile: Filled with phase timings and Ray Data stats when given (for benchmarks).

    Raises:
        SourceError: when the raw files cannot be found, fetched or generated.
        IngestError: when the input cannot be ingested at all (bad header, no valid row).
    """
    import ray
    import ray.data

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
    root = datasets_root(data.name)
    if lake.is_published(posixpath.join(root, version)):
        log.info("dataset %s/%s already exists: inputs and config unchanged", data.name, version)
        return load_dataset(lake, data.name, version)

    log.info("ingesting %s (%d file(s)) into %s", src.description, len(src.paths), lake.uri)
    arrow_fs = lake.arrow_fs
    staged_rel = posixpath.join("tmp", f"ingest-{data.name}-{version}")
    lake.remove(staged_rel)
    with prof.phase("check_headers"):
        warnings = check_headers(src, spec)
    counter = ray.remote(num_cpus=0)(_RowCounter).remote()
    with prof.phase("stage"):
        normal = _read_normalised(src, spec, counter)
        n_parts = max(2, min(64, int(ray.cluster_resources().get("CPU", 2)) * 2))
        staging = normal.repartition(n_parts, keys=[USER]).map_batches(
            dedupe_and_split,
            fn_kwargs={"test_fraction": data.test_fraction, "valid_fraction": data.valid_fraction},
            batch_format="pyarrow",
            batch_size=None,
        )
        staging.write_parquet(lake.path(staged_rel), filesystem=arrow_fs)
    if profile is not None:
        profile.dataset_stats.append(staging.stats())
    staged = ray.data.read_parquet(lake.path(staged_rel), filesystem=arrow_fs, schema=STAGED_SCHEMA)

    with prof.phase("stats"):
        by_file, reasons, user_list, item_list = _collect_stats(staged)
    rows_read = ray.get(counter.get.remote())
    ray.kill(counter)
    with prof.phase("id_maps"):
        users = id_table(user_list, USER_IDX, USER_ID)
        items = id_table(item_list, ITEM_IDX, ITEM_ID)
    if users.num_rows == 0:
        raise IngestError(
            f"no valid interactions in {src.description}: "
            + (
                f"all rows quarantined, see {lake.full_uri('quarantine', data.name, version)}"
                if by_file
                else "the input files are empty"
            )
        )
    items = item_genres(src, items)

    quarantine_rel = posixpath.join("quarantine", data.name, version)
    lake.remove(quarantine_rel)
    if reasons:
        with prof.phase("quarantine"):
            staged.filter(expr=f"{STATUS} == '{QUARANTINED}'").select_columns(
                QUARANTINE_SCHEMA.names
            ).write_parquet(lake.path(quarantine_rel), filesystem=arrow_fs)

    # Checked before writing: a version whose rows do not add up is never published.
    manifest = build_manifest(
        data,
        src,
        version,
        prints,
        rows_read,
        by_file,
        reasons,
        users,
        items,
        lake.full_uri(quarantine_rel) if reasons else None,
        warnings,
    )
    user_ids = users.column(USER_ID).combine_chunks()
    item_ids = items.column(ITEM_ID).combine_chunks()

    def write(out: str) -> dict[str, Any]:
        with prof.phase("write_splits"):
            encoded = staged.map_batches(
                _encode,
                fn_kwargs={"users": user_ids, "items": item_ids},
                batch_format="pyarrow",
            )
            encoded.write_parquet(out, filesystem=arrow_fs, partition_cols=["split"])
        if profile is not None:
            profile.dataset_stats.append(encoded.stats())
        _publish_splits(lake, out)
        pq.write_table(users, posixpath.join(out, "users.parquet"), filesystem=arrow_fs)
        pq.write_table(items, posixpath.join(out, "items.parquet"), filesystem=arrow_fs)
        return {"ingest_seconds": round(time.time() - t0, 2)}

    rel = posixpath.join(root, version)
    lake.publish(rel, write, manifest)
    lake.remove(staged_rel)
    log.info("published %s", lake.full_uri(rel, MANIFEST))
    return load_dataset(lake, data.name, version)


class _RowCounter:
    """Counts rows as the readers produce them, independently of the later pipeline steps."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def add(self, counts: dict[str, int]) -> None:
        """Add rows per file."""
        for path, n in counts.items():
            self.counts[path] = self.counts.get(path, 0) + n

    def get(self) -> dict[str, int]:
        """Rows per file so far."""
        return self.counts


def _read_normalised(src: RawSource, spec: dict[str, Any], counter: Any) -> Any:
    """Ray Dataset of normalised rows (good and bad) for every input file."""
    import ray
    import ray.data

    if src.format == "parquet":
        arrow_fs = Lake(src.paths[0]).arrow_fs
        stored = {filesystem_for(p)[1]: p for p in src.paths}
        # At least one block per file and per CPU, so that validation runs on every core.
        n_blocks = max(len(stored), int(ray.cluster_resources().get("CPU", 1)))
        ds = ray.data.read_parquet(
            list(stored), filesystem=arrow_fs, include_paths=True, override_num_blocks=n_blocks
        )
        return ds.map_batches(
            _parquet_block,
            fn_kwargs={"src": {**spec, "paths": stored}, "counter": counter},
            batch_format="pyarrow",
            batch_size=None,
        )
    reader = csv_batches if src.format == "csv" else jsonl_batches

    def read_files(batch: pa.Table) -> Iterator[pa.Table]:
        for path in batch.column("path").to_pylist():
            n = 0
            for table in reader(path, spec):
                n += table.num_rows
                yield table
            ray.get(counter.add.remote({path: n}))

    files = ray.data.from_items(
        [{"path": p} for p in src.paths], override_num_blocks=len(src.paths)
    )
    return files.map_batches(read_files, batch_format="pyarrow", batch_size=1)


def _parquet_block(batch: pa.Table, src: dict[str, Any], counter: Any) -> pa.Table:
    """Normalise one Parquet block read by Ray Data (``path`` column added by the reader)."""
    import ray

    paths = batch.column("path")
    out = []
    counts = {}
    for stored in pc.unique(paths).to_pylist():
        path = src["paths"].get(stored, stored)
        part = batch.filter(pc.equal(paths, stored))
        out.append(parquet_table(part, path, src))
        counts[path] = part.num_rows
    ray.get(counter.add.remote(counts))
    return pa.concat_tables(out) if out else NORMAL_SCHEMA.empty_table()


def _block_stats(batch: pa.Table) -> pa.Table:
    """Per-block counts by (file, status), quarantine reasons and distinct ids, as one JSON row."""
    counts: dict[str, dict[str, int]] = {}
    for row in batch.group_by([FILE, STATUS]).aggregate([([], "count_all")]).to_pylist():
        counts.setdefault(row[FILE], {})[row[STATUS]] = row["count_all"]
    bad = batch.filter(pc.equal(batch.column(STATUS), QUARANTINED))
    reasons = {
        r[REASON]: r["count_all"]
        for r in bad.group_by([REASON]).aggregate([([], "count_all")]).to_pylist()
    }
    good = batch.filter(pc.is_in(batch.column(STATUS), pa.array(SPLITS)))
    stats = {
        "counts": counts,
        "reasons": reasons,
        "users": pc.unique(good.column(USER)).to_pylist(),
        "items": pc.unique(good.column(ITEM)).to_pylist(),
    }
    return pa.table({"stats": [json.dumps(stats)]})


def _collect_stats(staged: Any) -> tuple[dict[str, dict[str, int]], dict[str, int], list, list]:
    """Rows per (file, status), quarantine reasons and the distinct user and item ids."""
    by_file: dict[str, dict[str, int]] = {}
    reasons: dict[str, int] = {}
    users: set[str] = set()
    items: set[str] = set()
    stats_ds = staged.map_batches(_block_stats, batch_format="pyarrow", batch_size=None)
    for row in stats_ds.iter_rows():
        stats = json.loads(row["stats"])
        for path, c in stats["counts"].items():
            for status, n in c.items():
                by_file.setdefault(path, {})[status] = by_file.get(path, {}).get(status, 0) + n
        for reason, n in stats["reasons"].items():
            reasons[reason] = reasons.get(reason, 0) + n
        users.update(stats["users"])
        items.update(stats["items"])
    return by_file, reasons, list(users), list(items)


def _encode(batch: pa.Table, users: pa.Array, items: pa.Array) -> pa.Table:
    """Good staged rows as integer-id interactions, with their split."""
    batch = batch.filter(pc.is_in(batch.column(STATUS), pa.array(SPLITS)))
    return pa.table(
        {
            "split": batch.column(STATUS),
            USER_IDX: pc.cast(pc.index_in(batch.column(USER), value_set=users), pa.int32()),
            ITEM_IDX: pc.cast(pc.index_in(batch.column(ITEM), value_set=items), pa.int32()),
            TIMESTAMP: batch.column(TS),
            WEIGHT: batch.column(W),
        },
        schema=INTERACTION_SCHEMA.insert(0, pa.field("split", pa.string())),
    )


def _publish_splits(lake: Lake, out: str) -> None:
    """Rename Hive folders ``split=train`` → ``train`` (an empty split gets an empty file)."""
    fs = lake.fs
    for split in SPLITS:
        hive, final = posixpath.join(out, f"split={split}"), posixpath.join(out, split)
        if fs.exists(hive) and lake.is_local:
            fs.mv(hive, final, recursive=True)
        elif fs.exists(hive):
            # Object stores have no folder rename: copy each part, then drop the Hive folder.
            for part in fs.find(hive):
                fs.copy(part, posixpath.join(final, posixpath.basename(part)))
            fs.rm(hive, recursive=True)
        else:
            fs.makedirs(final, exist_ok=True)
            pq.write_table(
                INTERACTION_SCHEMA.empty_table(),
                posixpath.join(final, "empty.parquet"),
                filesystem=lake.arrow_fs,
            )
