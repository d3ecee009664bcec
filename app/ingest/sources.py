"""Raw interaction sources: which raw files an ingest reads, and how to read them.

``resolve_source(data, cache_dir, lake=..., events=...)`` turns ``DataArgs`` into a ``RawSource``:
a sorted list of raw files (local paths or ``s3://`` URIs) plus how to read them. Four kinds:

- ``files``: whatever lies under ``data.path`` with the format's suffix (or ``data.glob``).
- ``movielens``: a GroupLens MovieLens variant (``app.ingest.movielens``), optionally downloaded
  and checksum-verified; the old formats are converted once under ``cache_dir``.
- ``synthetic``: the latent-factor generator (``app.ingest.synthetic``), written once under
  ``cache_dir`` and reused.

With an object-store ``cache_dir`` (an ``s3://`` lake's ``raw/``) the MovieLens and synthetic
files are uploaded there once and read from there: Ray workers on other nodes cannot read the
driver's disk.
- ``events``: the newest version of ``data.name`` in the lake plus the live events logged since
  it (``app.ingest.events_source``), materialised once as Parquet under ``cache_dir``.

``fingerprint(paths)`` identifies the files by content, for the dataset version id.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from fnmatch import fnmatch
from typing import TYPE_CHECKING, Any, Literal

from app.config import ColumnMap, DataArgs, EventsArgs
from app.ingest.errors import SourceError
from app.ingest.movielens import MOVIELENS_COLUMNS, locate_movielens
from app.ingest.synthetic import SYNTHETIC_COLUMNS, SYNTHETIC_ITEMS_FILE, cached_synthetic
from app.store import Lake, content_id, filesystem_for, sha256_file

if TYPE_CHECKING:
    from app.ingest.events_source import EventsRead

RawFormat = Literal["csv", "parquet", "jsonl"]
_SUCCESS = "_SUCCESS"
TimestampUnit = Literal["s", "ms", "iso"]

FORMAT_SUFFIXES: dict[str, tuple[str, ...]] = {
    "csv": (".csv", ".csv.gz", ".tsv", ".tsv.gz"),
    "parquet": (".parquet", ".pq"),
    "jsonl": (".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz", ".ndjson.gz"),
}
"""File-name suffixes picked for each raw format when ``data.glob`` is not set."""


@dataclass(frozen=True)
class RawSource:
    """Raw interaction files ready for ingestion, and how to read them."""

    paths: list[str]
    """Raw files, sorted: local paths or ``s3://bucket/key`` URIs."""
    format: RawFormat
    """Raw file format."""
    columns: ColumnMap
    """Which raw column holds each interaction field."""
    timestamp_unit: TimestampUnit = "s"
    """Unix seconds, Unix milliseconds or ISO-8601 strings."""
    delimiter: str = ","
    """CSV field delimiter."""
    encoding: str = "utf-8"
    """Text encoding of CSV/JSONL files."""
    item_features: str | None = None
    """Optional CSV with an item id column and a ``|``-separated genres column."""
    item_features_id_column: str = "movieId"
    """Item id column of ``item_features``."""
    genres_column: str = "genres"
    """Genres column of ``item_features``."""
    description: str = ""
    """Human-readable origin, e.g. "MovieLens ml-latest-small at /data/ml-latest-small"."""
    event_weights: dict[str, float] | None = None
    """Weight per event type, replacing ``data.event_weights`` (the ``events`` source's)."""
    events: EventsRead | None = None
    """``events`` source: what was read from the event log (None for other sources)."""


def resolve_source(
    data: DataArgs,
    cache_dir: str,
    *,
    lake: Lake | None = None,
    events: EventsArgs | None = None,
) -> RawSource:
    """Locate (download, convert or generate as needed) the raw files that ``data`` describes.

    Args:
        data: The ``data`` section of the config.
        cache_dir: Folder for converted MovieLens files, generated synthetic data and
            materialised events.
        lake: The lake (``events`` source: its previous version and, embedded, its event log).
        events: The online store settings (``serve.events``; default ``EventsArgs()``).

    Raises:
        SourceError: when the files are missing or cannot be fetched; the message names the
            config key to change.
    """
    if data.source == "events":
        if lake is None:
            raise SourceError("data.source=events reads the lake: pass resolve_source(lake=...)")
        from app.ingest.events_source import resolve_events  # it imports this module

        return resolve_events(data, lake, events or EventsArgs(), cache_dir)
    if data.source == "files":
        return _resolve_files(data)
    if data.source == "movielens":
        if "://" in cache_dir:
            ratings, movies, folder = _movielens_on_lake(data, cache_dir)
        else:
            ratings, movies, folder = locate_movielens(data, cache_dir)
        where = f"MovieLens {data.variant} at {folder}"
        return RawSource(
            [ratings], "csv", MOVIELENS_COLUMNS, item_features=movies, description=where
        )
    args = data.synthetic
    folder, paths = cached_synthetic(args, cache_dir)
    return RawSource(
        paths,
        args.format,
        SYNTHETIC_COLUMNS,
        item_features=os.path.join(folder, SYNTHETIC_ITEMS_FILE),
        item_features_id_column="item_id",
        description=(
            f"synthetic: {args.n_users} users, {args.n_items} items, {args.n_interactions} events, "
            f"seed {args.seed} at {folder}"
        ),
    )


def _movielens_on_lake(data: DataArgs, cache_dir: str) -> tuple[str, str, str]:
    """``locate_movielens`` with the ratings and movies uploaded under an object-store cache.

    The files are converted (old variants) in a local temporary folder and uploaded once into
    ``<cache_dir>/movielens-<variant>-<content id>/``, complete when ``_SUCCESS`` exists; a
    rerun finds them there. Returns the uploaded files' URIs and the local variant folder.
    """
    with tempfile.TemporaryDirectory(prefix="scalerec-movielens-") as local:
        ratings, movies, folder = locate_movielens(data, local)
        hashes = {"ratings": sha256_file(ratings), "movies": sha256_file(movies)}
        key = content_id({"variant": data.variant, **hashes})
        remote = Lake(cache_dir.rstrip("/") + f"/movielens-{data.variant}-{key}")
        if not remote.exists(_SUCCESS):
            remote.remove("")  # a crashed earlier upload
            for name, path in (("ratings.csv", ratings), ("movies.csv", movies)):
                remote.fs.put_file(path, remote.path(name))
            remote.write_bytes(_SUCCESS, b"")
    return remote.full_uri("ratings.csv"), remote.full_uri("movies.csv"), folder


def _is_local(fs: Any) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def _matches(rel: str, glob: str | None, fmt: str) -> bool:
    name = rel.rsplit("/", 1)[-1]
    if name.startswith((".", "_")):  # _SUCCESS markers, .crc files, temporary uploads
        return False
    if glob:
        return fnmatch(rel, glob) or fnmatch(name, glob)
    return name.lower().endswith(FORMAT_SUFFIXES[fmt])


def _list_files(path: str, fmt: str, glob: str | None) -> list[str]:
    """List the raw files under ``path`` (a file or a folder, local or ``s3://``), sorted."""
    fs, root = filesystem_for(path)
    try:
        if fs.isfile(root):  # a file named explicitly is taken whatever its suffix
            return [root if _is_local(fs) else fs.unstrip_protocol(root)]
        if fs.isdir(root):
            found = list(fs.find(root))  # files only, recursively
        else:
            raise SourceError(
                f"data.path {path!r} does not exist; point data.path at a {fmt} file or a folder "
                "of them"
            )
    except (PermissionError, OSError) as exc:
        raise SourceError(f"cannot list data.path {path!r}: {exc}") from exc
    base = root.rstrip("/")
    picked = sorted(p for p in found if _matches(p[len(base) :].lstrip("/"), glob, fmt))
    if not picked:
        expected = (
            f"files matching data.glob={glob!r}"
            if glob
            else (f"{fmt} files ({', '.join(FORMAT_SUFFIXES[fmt])})")
        )
        seen = ", ".join(p.rsplit("/", 1)[-1] for p in sorted(found)[:5]) or "nothing"
        raise SourceError(
            f"no raw files at data.path {path!r}: expected {expected}, found {seen}. "
            "Check data.path, data.format and data.glob."
        )
    if _is_local(fs):
        return picked
    return [fs.unstrip_protocol(p) for p in picked]


def _resolve_files(data: DataArgs) -> RawSource:
    paths = _list_files(data.path, data.format, data.glob)
    return RawSource(
        paths=paths,
        format=data.format,
        columns=data.columns,
        timestamp_unit=data.timestamp_unit,
        delimiter=data.delimiter,
        encoding=data.encoding,
        item_features=data.item_features,
        item_features_id_column=data.item_features_id_column,
        genres_column=data.genres_column,
        description=f"{len(paths)} {data.format} file(s) at {data.path}",
    )


def fingerprint(paths: list[str]) -> list[dict[str, Any]]:
    """Identify inputs by content: SHA-256 of local files, ETag + size on object stores."""
    prints = []
    for path in paths:
        fs, p = filesystem_for(path)
        info = fs.info(p)
        entry: dict[str, Any] = {"path": path, "size": info.get("size")}
        if _is_local(fs):
            entry["sha256"] = sha256_file(p)
        else:
            entry["etag"] = str(info.get("ETag", "")).strip('"')
        prints.append(entry)
    return prints
