"""The dataset manifest of an ingest (per-file row accounting, splits, protocol) and its summary.

``build_manifest`` refuses to publish when a file's rows do not add up: every row read is
ingested, quarantined with a reason, or collapsed as a duplicate. The manifest lists the exact
files of each split (``split_files``, relative to the version folder) and of the quarantine:
readers read those and nothing else, so files that a crashed attempt left behind are never
read. An ``events`` ingest also records ``events_cursor`` (where it stopped reading the event
log) and its events' counts.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from app.config import DataArgs
from app.ingest.errors import IngestError
from app.ingest.sources import RawSource
from app.ingest.split import DUPLICATE, QUARANTINED
from app.store import GENRES, INTERACTION_SCHEMA, SPLITS, utc_now

# Version ids change when the pipeline's output format changes (2: listed split files, rows
# sorted by user and time within each file, deterministic tie-breaks).
PIPELINE_VERSION = 2


def build_manifest(
    data: DataArgs,
    src: RawSource,
    version: str,
    fingerprint: list[dict[str, Any]],
    rows_read: dict[str, int],
    by_file: dict[str, dict[str, int]],
    reasons: dict[str, int],
    users: pa.Table,
    items: pa.Table,
    quarantine_uri: str | None,
    warnings: list[str],
    *,
    split_files: dict[str, list[str]] | None = None,
    quarantine_files: list[str] | None = None,
    ingest: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest of dataset version ``version``, less ``ingest_seconds`` (known at publish).

    Args:
        data: The ``data`` config the version was built from.
        src: The raw source.
        version: The version id.
        fingerprint: ``fingerprint(src.paths)``.
        rows_read: Rows each reader produced, per file.
        by_file: Rows per file and status (split, ``quarantined``, ``duplicate``).
        reasons: Quarantined rows per reason.
        users: The user id map.
        items: The item id map, with genres.
        quarantine_uri: Where the quarantined rows are, or None when there are none.
        warnings: Non-fatal findings (e.g. empty files).
        split_files: Per split, its files relative to the version folder (the only files
            readers read); None leaves the key out (readers then read each split's folder).
        quarantine_files: The quarantine's files, relative to ``quarantine_uri``.
        ingest: How the version was built (attempt id, units, buckets), for the record.

    Raises:
        IngestError: when a file's rows do not add up or rows belong to no input file.
    """
    files = []
    totals = {"rows_read": 0, "rows_ingested": 0, "rows_quarantined": 0, "duplicates_collapsed": 0}
    splits = dict.fromkeys(SPLITS, 0)
    for fp in fingerprint:
        c = by_file.get(fp["path"], {})
        entry = {
            "path": fp["path"],
            "rows_ingested": sum(c.get(s, 0) for s in SPLITS),
            "rows_quarantined": c.get(QUARANTINED, 0),
            "duplicates_collapsed": c.get(DUPLICATE, 0),
        }
        entry["rows_read"] = rows_read.get(fp["path"], 0)
        accounted = (
            entry["rows_ingested"] + entry["rows_quarantined"] + entry["duplicates_collapsed"]
        )
        if accounted != entry["rows_read"]:
            raise IngestError(
                f"{fp['path']}: read {entry['rows_read']} rows but accounted for {accounted} "
                "(ingested + quarantined + duplicates); refusing to publish"
            )
        files.append(entry)
        for k in totals:
            totals[k] += entry[k]
        for s in SPLITS:
            splits[s] += c.get(s, 0)
    unknown = set(by_file) - {fp["path"] for fp in fingerprint}
    if unknown:
        raise IngestError(f"internal: rows attributed to unknown files {sorted(unknown)}")
    return {
        "name": data.name,
        "version": version,
        "created_at": utc_now(),
        "source": {"description": src.description, "format": src.format, "files": fingerprint},
        **totals,
        "splits": splits,
        "n_users": users.num_rows,
        "n_items": items.num_rows,
        "items_with_genres": int(sum(1 for g in items.column(GENRES).to_pylist() if g)),
        "files": files,
        "quarantine": {
            "reasons": reasons,
            "path": quarantine_uri,
            "files": list(quarantine_files or []),
        },
        "schema": {f.name: str(f.type) for f in INTERACTION_SCHEMA},
        "protocol": {
            "dedupe": "first event per (user, item)",
            "split": "per user by (timestamp, item): test last ceil(test_fraction*n), "
            "valid last ceil(valid_fraction*rest)",
            "test_fraction": data.test_fraction,
            "valid_fraction": data.valid_fraction,
        },
        "config": data.model_dump(mode="json"),
        "density": round(sum(splits.values()) / max(1, users.num_rows * items.num_rows), 6),
        "rows_check": "rows_read == rows_ingested + rows_quarantined + duplicates_collapsed",
        "pipeline_version": PIPELINE_VERSION,
        "warnings": warnings,
        **({"split_files": split_files} if split_files is not None else {}),
        **({"ingest": ingest} if ingest is not None else {}),
        **_events_entries(src, files),
    }


def _events_entries(src: RawSource, files: list[dict[str, Any]]) -> dict[str, Any]:
    """``events`` source: the log cursor reached and the events' own row accounting.

    The next reader of the log starts after ``events_cursor``; the events' counts are those of
    the ``events-*`` files (the previous version's rows are the other files).
    """
    if src.events is None:
        return {}
    mine = [f for f in files if f["path"] in src.events.event_files]
    if sum(f["rows_read"] for f in mine) != src.events.n_events:
        raise IngestError(
            f"read {src.events.n_events} events from the log but "
            f"{sum(f['rows_read'] for f in mine)} rows from their files; refusing to publish"
        )
    return {
        "events_cursor": src.events.end_cursor,
        "events_start_cursor": src.events.start_cursor,
        "events_previous_version": src.events.previous_version,
        "events_read": src.events.n_events,
        "events_ingested": sum(f["rows_ingested"] for f in mine),
        "events_quarantined": sum(f["rows_quarantined"] for f in mine),
        "events_duplicates": sum(f["duplicates_collapsed"] for f in mine),
    }


def summary_table(manifest: dict[str, Any]) -> str:
    """Readable per-file counts of a manifest (read = ingested + quarantined + duplicates)."""
    head = f"{'file':<48} {'read':>11} {'ingested':>11} {'quarantined':>11} {'duplicates':>11}"
    lines = [f"dataset {manifest['name']} version {manifest['version']}", head, "-" * len(head)]
    keys = ("rows_read", "rows_ingested", "rows_quarantined", "duplicates_collapsed")
    for f in manifest["files"] + [{"path": "TOTAL", **{k: manifest[k] for k in keys}}]:
        name = f["path"] if len(f["path"]) <= 48 else "…" + f["path"][-47:]
        lines.append(f"{name:<48} " + " ".join(f"{f[k]:>11,}" for k in keys))
    s = manifest["splits"]
    lines.append(
        f"users {manifest['n_users']:,}  items {manifest['n_items']:,}  "
        f"train {s['train']:,}  valid {s['valid']:,}  test {s['test']:,}"
    )
    for reason, n in sorted(manifest["quarantine"]["reasons"].items(), key=lambda x: -x[1]):
        lines.append(f"  quarantined {n:>9,}  {reason}")
    return "\n".join(lines)
