"""Raw interaction sources: the "sources" part of the ingest stage (``python -m jobs.ingest``).

``resolve_source(cfg.data, cache_dir)`` turns ``DataArgs`` into a ``RawSource``: a sorted list of
raw files (local paths or ``s3://`` URIs) plus how to read them. Three kinds of source:

- ``files``: whatever lies under ``data.path`` with the format's suffix (or ``data.glob``).
- ``movielens``: a GroupLens MovieLens variant, optionally downloaded and checksum-verified; the
  old formats (ml-100k, ml-1m) are converted once into ml-latest style CSVs under ``cache_dir``.
- ``synthetic``: a latent-factor generator with power-law item popularity and heavy-tailed user
  activity, written once under ``cache_dir`` and reused.

Nothing here touches the network unless ``data.download`` is true and a variant is missing.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from fnmatch import fnmatch
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from app.config import ColumnMap, DataArgs, SyntheticArgs

RawFormat = Literal["csv", "parquet", "jsonl"]
TimestampUnit = Literal["s", "ms", "iso"]

FORMAT_SUFFIXES: dict[str, tuple[str, ...]] = {
    "csv": (".csv", ".csv.gz", ".tsv", ".tsv.gz"),
    "parquet": (".parquet", ".pq"),
    "jsonl": (".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz", ".ndjson.gz"),
}
"""File-name suffixes picked for each raw format when ``data.glob`` is not set."""

MOVIELENS_URL = "https://files.grouplens.org/datasets/movielens/{variant}.zip"

# SHA-256 of the GroupLens zips, from tensorflow/datasets
# tensorflow_datasets/url_checksums/movielens.txt, each cross-checked against other public repos
# that pin the same archive. None would mean "no verified hash": such a variant is never downloaded.
MOVIELENS_SHA256: dict[str, str | None] = {
    "ml-latest-small": "696d65a3dfceac7c45750ad32df2c259311949efec81f0f144fdfb91ebc9e436",
    "ml-100k": "50d2a982c66986937beb9ffb3aa76efe955bf3d5c6b761f4e3a7cd717c6a3229",
    "ml-1m": "a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20",
    "ml-20m": "96f243c338a8665f6bcc89c53edf6ee39162a846940de6b7c8c48aeada765ff3",
    "ml-25m": "8b21cfb7eb1706b4ec0aac894368d90acf26ebdfb6aced3ebd4ad5bd1eb9c6aa",
}

# Files that prove a variant is present, in its own layout.
_MOVIELENS_FILES: dict[str, tuple[str, str]] = {
    "ml-latest-small": ("ratings.csv", "movies.csv"),
    "ml-20m": ("ratings.csv", "movies.csv"),
    "ml-25m": ("ratings.csv", "movies.csv"),
    "ml-100k": ("u.data", "u.item"),
    "ml-1m": ("ratings.dat", "movies.dat"),
}

MOVIELENS_COLUMNS = ColumnMap(user="userId", item="movieId", timestamp="timestamp", rating="rating")
"""Columns of ml-latest style ``ratings.csv`` (also what ml-100k/ml-1m are converted to)."""

# ml-100k u.item genre flags, in column order (u.genre).
_ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western",
)  # fmt: skip
_NO_GENRES = "(no genres listed)"

SYNTHETIC_COLUMNS = ColumnMap(
    user="user_id",
    item="item_id",
    timestamp="timestamp",
    rating="rating",
    weight=None,
    event="event",
)
"""Columns of the synthetic raw files."""
SYNTHETIC_ITEMS_FILE = "items.csv"
"""Item features CSV (``item_id,genres``) written next to the synthetic interactions."""
SYNTHETIC_EVENTS = ("view", "click", "purchase")
_SYNTHETIC_EXT = {"csv": ".csv", "parquet": ".parquet", "jsonl": ".jsonl"}

# Bump when the generator's output changes, so cached synthetic data is regenerated.
_GENERATOR_VERSION = 2
_SUCCESS = "_SUCCESS"
# Users are generated in chunks of about this many events (bounds memory; one row group each).
_CHUNK_EVENTS = 1_000_000
# Affinities are computed this many candidates at a time (a gathered (n, dim) float32 block each).
_AFFINITY_BATCH = 1_000_000
# Candidates drawn from the popularity distribution per event before reweighting by affinity:
# a larger pool lets taste reach beyond the head of the catalogue.
_POOL_PER_EVENT = 16
# Share of a user's events that re-use one of their items (re-views, repeat purchases).
_REPEAT_RATE = 0.1
# Standard deviation of a user·item affinity; exp(affinity) tilts popularity towards taste.
# With the pool above, taste explains about as much beyond popularity as in MovieLens, where
# a personal model (EASE) beats popularity by a wide margin (docs/performance.md, quality).
_AFFINITY_STD = 3.0
_T_END = 1_704_067_200  # 2024-01-01T00:00:00Z: fixed so that a seed gives the same files
_WINDOW_S = 2 * 365 * 86_400
_GENRE_NAMES = (
    "Action", "Adventure", "Animation", "Children", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
    "War", "Western",
)  # fmt: skip


class SourceError(ValueError):
    """Raw data cannot be found, fetched or generated; the message says what to change."""


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


def resolve_source(data: DataArgs, cache_dir: str) -> RawSource:
    """Locate (download, convert or generate as needed) the raw files that ``data`` describes.

    Args:
        data: The ``data`` section of the config.
        cache_dir: Local folder for converted MovieLens files and generated synthetic data.

    Raises:
        SourceError: when the files are missing or cannot be fetched; the message names the
            config key to change.
    """
    if data.source == "files":
        return _resolve_files(data)
    if data.source == "movielens":
        return _resolve_movielens(data, cache_dir)
    return _resolve_synthetic(data.synthetic, cache_dir)


# ---------------------------------------------------------------------------------------------
# files


def _filesystem(path: str) -> tuple[Any, str]:
    """Return ``(fsspec filesystem, path inside it)``; S3 endpoints come from the environment."""
    from fsspec.core import url_to_fs

    kwargs: dict[str, Any] = {}
    if path.startswith(("s3://", "s3a://")):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            kwargs["client_kwargs"] = {"endpoint_url": endpoint}
    return url_to_fs(path, **kwargs)


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
    fs, root = _filesystem(path)
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


# ---------------------------------------------------------------------------------------------
# MovieLens


def _find_variant_dir(path: str, variant: str) -> str | None:
    """Return the folder holding ``variant``'s files: ``path`` itself or ``path/<variant>``."""
    for folder in (path, os.path.join(path, variant)):
        if all(os.path.isfile(os.path.join(folder, f)) for f in _MOVIELENS_FILES[variant]):
            return folder
    return None


def _resolve_movielens(data: DataArgs, cache_dir: str) -> RawSource:
    variant = data.variant
    if "://" in data.path:
        raise SourceError(
            f"data.path {data.path!r}: source movielens reads a local folder; for raw files in "
            "object storage use data.source=files with data.columns set to the MovieLens names"
        )
    path = os.path.abspath(os.path.expanduser(data.path))
    folder = _find_variant_dir(path, variant)
    if folder is None:
        needed = " and ".join(_MOVIELENS_FILES[variant])
        if not data.download:
            raise SourceError(
                f"MovieLens {variant} not found: no {needed} in {path} or "
                f"{os.path.join(path, variant)}. Set data.download=true to fetch it from "
                f"{MOVIELENS_URL.format(variant=variant)}, or point data.path at the folder "
                "that holds the files."
            )
        _download_variant(variant, path)
        folder = _find_variant_dir(path, variant)
        if folder is None:
            raise SourceError(
                f"downloaded {MOVIELENS_URL.format(variant=variant)} into {path} but found no "
                f"{needed} in it"
            )
    if variant in ("ml-100k", "ml-1m"):
        ratings, movies = _convert_legacy(variant, folder, os.path.join(cache_dir, variant))
    else:
        ratings, movies = os.path.join(folder, "ratings.csv"), os.path.join(folder, "movies.csv")
    return RawSource(
        paths=[ratings],
        format="csv",
        columns=MOVIELENS_COLUMNS,
        timestamp_unit="s",
        delimiter=",",
        encoding="utf-8",
        item_features=movies,
        item_features_id_column="movieId",
        genres_column="genres",
        description=f"MovieLens {variant} at {folder}",
    )


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _verify_sha256(path: str, expected: str) -> None:
    """Raise ``SourceError`` unless the file's SHA-256 is ``expected``."""
    actual = _sha256_file(path)
    if actual != expected.lower():
        raise SourceError(
            f"checksum mismatch for {path}: SHA-256 is {actual}, expected {expected}; the "
            "download is corrupt or the upstream file changed"
        )


def _download_variant(variant: str, dest: str) -> None:
    """Download ``variant``'s GroupLens zip, verify its SHA-256 and extract it into ``dest``."""
    import requests
    from tqdm.auto import tqdm

    url = MOVIELENS_URL.format(variant=variant)
    expected = MOVIELENS_SHA256.get(variant)
    manual = (
        f"To install it by hand, download {url} elsewhere, unzip it into {dest} (so that "
        f"{os.path.join(dest, variant, _MOVIELENS_FILES[variant][0])} exists) and rerun."
    )
    if expected is None:
        raise SourceError(
            f"refusing to download {variant}: no verified SHA-256 is known for {url}. {manual}"
        )
    os.makedirs(dest, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{variant}-", suffix=".zip.part", dir=dest)
    try:
        try:
            with os.fdopen(fd, "wb") as out, requests.get(url, stream=True, timeout=60) as resp:
                resp.raise_for_status()
                total = int(resp.headers.get("content-length", 0)) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc=f"{variant}.zip") as bar:
                    for block in resp.iter_content(chunk_size=1 << 20):
                        out.write(block)
                        bar.update(len(block))
        except (requests.RequestException, OSError) as exc:
            raise SourceError(f"download of {url} failed ({exc}). {manual}") from exc
        _verify_sha256(tmp, expected)
        staging = tempfile.mkdtemp(prefix=f".{variant}-extract-", dir=dest)
        try:
            with zipfile.ZipFile(tmp) as zf:
                zf.extractall(staging)  # zipfile strips absolute and ".." member paths
            for entry in os.listdir(staging):
                target = os.path.join(dest, entry)
                if not os.path.exists(target):
                    os.replace(os.path.join(staging, entry), target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_atomic(path: str, write: Callable[[io.TextIOBase], None]) -> None:
    """Write a UTF-8 text file under a temporary name, then rename it into place."""
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _convert_legacy(variant: str, folder: str, out_dir: str) -> tuple[str, str]:
    """Convert ml-100k / ml-1m into ml-latest style ``ratings.csv`` + ``movies.csv`` (once)."""
    import pandas as pd

    ratings_out = os.path.join(out_dir, "ratings.csv")
    movies_out = os.path.join(out_dir, "movies.csv")
    if os.path.isfile(ratings_out) and os.path.isfile(movies_out):
        return ratings_out, movies_out
    names = ["userId", "movieId", "rating", "timestamp"]
    if variant == "ml-100k":
        ratings = pd.read_csv(
            os.path.join(folder, "u.data"), sep="\t", header=None, names=names, dtype="int64"
        )
        movies = _read_ml100k_items(os.path.join(folder, "u.item"))
    else:
        with open(os.path.join(folder, "ratings.dat"), "rb") as f:
            raw = f.read().replace(b"::", b",")
        ratings = pd.read_csv(io.BytesIO(raw), header=None, names=names, dtype="int64")
        movies = _read_ml1m_movies(os.path.join(folder, "movies.dat"))
    ratings["rating"] = ratings["rating"].astype("float64")  # "4.0", as in ml-latest
    # movies last: its presence (with ratings) marks a complete conversion
    _write_atomic(ratings_out, lambda f: ratings.to_csv(f, index=False))
    _write_atomic(movies_out, lambda f: movies.to_csv(f, index=False))
    return ratings_out, movies_out


def _read_lines(path: str) -> Iterator[str]:
    with open(path, encoding="latin-1", newline="") as f:
        for line in f:
            line = line.rstrip("\r\n")
            if line:
                yield line


def _read_ml100k_items(path: str) -> Any:
    """Read ``u.item`` (pipe-separated, latin-1, 19 genre flags) as movieId,title,genres."""
    import pandas as pd

    rows = []
    for line in _read_lines(path):
        fields = line.split("|")
        if len(fields) < 5 + len(_ML100K_GENRES):
            raise SourceError(f"{path}: malformed u.item line {line[:80]!r}")
        flags = fields[-len(_ML100K_GENRES) :]
        genres = [g for g, flag in zip(_ML100K_GENRES, flags, strict=True) if flag.strip() == "1"]
        rows.append((int(fields[0]), fields[1], "|".join(genres) or _NO_GENRES))
    return pd.DataFrame(rows, columns=["movieId", "title", "genres"])


def _read_ml1m_movies(path: str) -> Any:
    """Read ``movies.dat`` (``::``-separated, latin-1) as movieId,title,genres."""
    import pandas as pd

    rows = []
    for line in _read_lines(path):
        fields = line.split("::")
        if len(fields) != 3:
            raise SourceError(f"{path}: malformed movies.dat line {line[:80]!r}")
        rows.append((int(fields[0]), fields[1], fields[2] or _NO_GENRES))
    return pd.DataFrame(rows, columns=["movieId", "title", "genres"])


# ---------------------------------------------------------------------------------------------
# synthetic


def _synthetic_key(args: SyntheticArgs) -> str:
    payload = json.dumps(
        {"generator": _GENERATOR_VERSION, **args.model_dump(mode="json")}, sort_keys=True
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def _resolve_synthetic(args: SyntheticArgs, cache_dir: str) -> RawSource:
    final = os.path.join(cache_dir, f"synthetic-{_synthetic_key(args)}")
    if not os.path.isfile(os.path.join(final, _SUCCESS)):
        os.makedirs(cache_dir, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".synthetic-", dir=cache_dir)
        try:
            generate_synthetic(args, staging)
            with open(os.path.join(staging, _SUCCESS), "w"):
                pass
            if os.path.isdir(final) and not os.path.isfile(os.path.join(final, _SUCCESS)):
                shutil.rmtree(final)  # a crashed earlier attempt
            try:
                os.replace(staging, final)
            except OSError:
                if not os.path.isfile(os.path.join(final, _SUCCESS)):
                    raise  # otherwise a concurrent run finished first: use its files
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    ext = _SYNTHETIC_EXT[args.format]
    paths = sorted(
        os.path.join(final, name)
        for name in os.listdir(final)
        if name.startswith("interactions-") and name.endswith(ext)
    )
    return RawSource(
        paths=paths,
        format=args.format,
        columns=SYNTHETIC_COLUMNS,
        timestamp_unit="s",
        delimiter=",",
        encoding="utf-8",
        item_features=os.path.join(final, SYNTHETIC_ITEMS_FILE),
        item_features_id_column="item_id",
        genres_column="genres",
        description=(
            f"synthetic: {args.n_users} users, {args.n_items} items, {args.n_interactions} events, "
            f"seed {args.seed} at {final}"
        ),
    )


_SYNTHETIC_SCHEMA = pa.schema(
    [
        ("user_id", pa.int64()),
        ("item_id", pa.int64()),
        ("timestamp", pa.int64()),
        ("rating", pa.float32()),
        ("event", pa.string()),
    ]
)


def generate_synthetic(args: SyntheticArgs, out_dir: str) -> list[str]:
    """Write synthetic raw interactions (and ``items.csv`` with genres) into ``out_dir``.

    Users and items get Gaussian factors. Item popularity is Zipf-like with
    ``popularity_exponent``; user activity is lognormal with at least 3 events per user. Each
    event picks an item with probability ∝ popularity × exp(user·item affinity), sampled by drawing
    a popularity-distributed candidate pool per user and resampling it by affinity. Timestamps
    increase per user within a personal sub-window of a 2-year span. Ratings (0.5 to 5.0) and
    event types (view, click, purchase) rise with affinity. The same ``args`` give the same bytes.

    Returns:
        The interaction files (``interactions-00000-of-0000N.<ext>``), sorted.

    Raises:
        SourceError: when ``n_interactions < 3 * n_users``.
    """
    if args.n_interactions < 3 * args.n_users:
        raise SourceError(
            f"data.synthetic.n_interactions={args.n_interactions} is below 3 events for each of "
            f"data.synthetic.n_users={args.n_users}; raise n_interactions or lower n_users"
        )
    from tqdm.auto import tqdm

    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    # factor std chosen so that a user·item dot product has standard deviation _AFFINITY_STD
    scale = np.sqrt(_AFFINITY_STD / np.sqrt(args.dim))
    user_f = (rng.standard_normal((args.n_users, args.dim)) * scale).astype(np.float32)
    item_f = (rng.standard_normal((args.n_items, args.dim)) * scale).astype(np.float32)
    rank_to_item = rng.permutation(args.n_items)  # which item has popularity rank r
    _write_items(args, item_f, rng, os.path.join(out_dir, SYNTHETIC_ITEMS_FILE))

    counts = _user_counts(args, rng)
    starts, spans = _user_windows(args.n_users, rng)
    ext = _SYNTHETIC_EXT[args.format]
    n_files = min(args.n_files, args.n_interactions)  # no empty files
    paths = [
        os.path.join(out_dir, f"interactions-{i:05d}-of-{n_files:05d}{ext}") for i in range(n_files)
    ]
    bounds = np.linspace(0, args.n_interactions, n_files + 1).astype(np.int64)
    sink = _ChunkSink(args.format, paths, bounds)
    ends = np.cumsum(counts)
    # cut the user range wherever the cumulative event count crosses a chunk boundary
    cuts = np.searchsorted(ends, np.arange(_CHUNK_EVENTS, ends[-1], _CHUNK_EVENTS), side="left")
    cuts = np.unique(np.concatenate([[0], cuts + 1, [args.n_users]]))
    with tqdm(
        total=args.n_interactions,
        unit="ev",
        unit_scale=True,
        desc="synthetic",
        disable=args.n_interactions < 2_000_000,
    ) as bar:
        # one writer thread: Arrow encodes and writes chunk k while numpy samples chunk k + 1
        with ThreadPoolExecutor(max_workers=1) as writer:
            pending: Future[None] | None = None
            try:
                for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):
                    table = _sample_chunk(
                        args, rng, np.arange(lo, hi), counts[lo:hi], starts[lo:hi],
                        spans[lo:hi], user_f, item_f, rank_to_item,
                    )  # fmt: skip
                    if pending is not None:
                        pending.result()
                    pending = writer.submit(sink.write, table)
                    bar.update(table.num_rows)
                if pending is not None:
                    pending.result()
            finally:
                if pending is not None:
                    pending.cancel()
                    wait([pending])
                sink.close()
    return paths


def _user_counts(args: SyntheticArgs, rng: np.random.Generator) -> np.ndarray:
    """Heavy-tailed (lognormal) events per user, each >= 3, summing to ``n_interactions``."""
    activity = rng.lognormal(mean=0.0, sigma=1.2, size=args.n_users)
    extra = rng.multinomial(args.n_interactions - 3 * args.n_users, activity / activity.sum())
    return extra.astype(np.int64) + 3


def _user_windows(n_users: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Each user's first active second and active span, inside the 2-year window."""
    t0 = _T_END - _WINDOW_S
    starts = t0 + (rng.random(n_users) * 0.9 * _WINDOW_S).astype(np.int64)
    spans = ((_T_END - starts) * rng.uniform(0.05, 1.0, n_users)).astype(np.int64)
    return starts, np.maximum(spans, 1)


def _zipf_ranks(n: int, exponent: float, size: int, rng: np.random.Generator) -> np.ndarray:
    """Popularity ranks with P(rank r) ≈ (r + 1)^-exponent, vectorised.

    Inverts the CDF of a continuous power law on [0.5, n + 0.5) and rounds: rank r gets the mass
    of [r + 0.5, r + 1.5), whose midpoint rule is (r + 1)^-exponent.
    """
    lo, hi = 0.5, n + 0.5
    x = rng.random(size)
    if abs(exponent - 1.0) < 1e-9:  # x = lo * (hi / lo) ** u, in place
        x *= np.log(hi / lo)
        np.exp(x, out=x)
        x *= lo
    else:  # x = (lo**a + u * (hi**a - lo**a)) ** (1 / a), in place
        a = 1.0 - exponent
        x *= hi**a - lo**a
        x += lo**a
        np.log(x, out=x)
        x *= 1.0 / a
        np.exp(x, out=x)
    x += 0.5
    ranks = x.astype(np.int64)
    ranks -= 1
    return np.clip(ranks, 0, n - 1, out=ranks)


def _sample_chunk(
    args: SyntheticArgs,
    rng: np.random.Generator,
    users: np.ndarray,
    counts: np.ndarray,
    starts: np.ndarray,
    spans: np.ndarray,
    user_f: np.ndarray,
    item_f: np.ndarray,
    rank_to_item: np.ndarray,
) -> pa.Table:
    """Sample the events of a contiguous block of users, grouped by user in time order."""
    n_events = int(counts.sum())
    n_local = len(users)
    # Candidate pool: _POOL_PER_EVENT popularity-distributed draws per event, deduped per user
    # (the multiplicity keeps the popularity weight).
    pool_local = np.repeat(np.arange(n_local, dtype=np.int64), counts * _POOL_PER_EVENT)
    pool_item = rank_to_item[
        _zipf_ranks(args.n_items, args.popularity_exponent, len(pool_local), rng)
    ]
    keys, mult = np.unique(pool_local * args.n_items + pool_item, return_counts=True)
    cand_local, cand_item = keys // args.n_items, keys % args.n_items
    affinity = np.empty(len(keys), dtype=np.float32)
    for b in range(0, len(keys), _AFFINITY_BATCH):
        sl = slice(b, b + _AFFINITY_BATCH)
        # np.take is ~3x faster than fancy indexing for row gathers
        rows_u = np.take(user_f, users[0] + cand_local[sl], axis=0)
        affinity[sl] = np.einsum("ij,ij->i", rows_u, np.take(item_f, cand_item[sl], axis=0))
    # Gumbel top-k per user on log(multiplicity) + affinity: distinct items drawn
    # ∝ popularity × exp(affinity). A few events re-use one of the user's items (re-views), and
    # users whose pool is too small for their count get repeats too.
    score = affinity + np.log(mult) + rng.gumbel(size=len(keys))
    n_cand = np.bincount(cand_local, minlength=n_local)
    n_pick = np.minimum(counts - rng.binomial(counts - 1, _REPEAT_RATE), n_cand)
    # by user, best score first: the fraction in (0, 0.5) falls as the score rises (much faster
    # than np.lexsort; below 0.5 so that rounding never carries a key into the next user)
    order = np.argsort(cand_local + 0.5 / (1.0 + np.exp(np.clip(score, -30.0, 30.0))))
    rank = np.arange(len(order)) - np.repeat(np.cumsum(n_cand) - n_cand, n_cand)
    picked = order[rank < np.repeat(n_pick, n_cand)]
    n_fill = counts - n_pick
    fill = picked[
        np.repeat(np.cumsum(n_pick) - n_pick, n_fill)
        + (rng.random(int(n_fill.sum())) * np.repeat(n_pick, n_fill)).astype(np.int64)
    ]
    chosen = np.concatenate([picked, fill])
    # group by user in random order: time order must not follow the score or the item id
    chosen = chosen[np.argsort(cand_local[chosen] + 0.5 * rng.random(n_events))]
    items = cand_item[chosen]
    aff = affinity[chosen].astype(np.float64)
    aff = (aff - aff.mean()) / (aff.std() + 1e-9)  # standardised taste of the chosen events

    # timestamps: uniform in each user's window, sorted per user (one sort on user-offset keys)
    local = np.repeat(np.arange(len(users), dtype=np.int64), counts)
    offsets = (rng.random(n_events) * np.repeat(spans, counts)).astype(np.int64)
    time_keys = local * (_WINDOW_S + 1) + offsets
    time_keys.sort()
    timestamps = np.repeat(starts, counts) + (time_keys - local * (_WINDOW_S + 1))

    rating = np.clip(np.round((3.5 + 0.9 * aff + rng.normal(0.0, 0.6, n_events)) * 2) / 2, 0.5, 5)
    signal = aff + rng.normal(0.0, 0.7, n_events)
    event = np.where(signal > 1.6, 2, np.where(signal > 0.4, 1, 0)).astype(np.int32)
    events = pc.take(pa.array(SYNTHETIC_EVENTS), pa.array(event))
    return pa.table(
        [
            pa.array(np.repeat(users, counts), pa.int64()),
            pa.array(items, pa.int64()),
            pa.array(timestamps, pa.int64()),
            pa.array(rating.astype(np.float32), pa.float32()),
            events,
        ],
        schema=_SYNTHETIC_SCHEMA,
    )


def _write_items(
    args: SyntheticArgs, item_f: np.ndarray, rng: np.random.Generator, path: str
) -> None:
    """Write ``item_id,genres``: 1-3 genres per item, its top scores under a random projection."""
    import pyarrow.csv as pacsv

    names = [
        _GENRE_NAMES[g] if g < len(_GENRE_NAMES) else f"Genre-{g}" for g in range(args.n_genres)
    ]
    projection = rng.standard_normal((args.dim, args.n_genres)).astype(np.float32)
    top = np.argsort(-(item_f @ projection), axis=1)[:, :3]
    n_genres = rng.integers(1, min(3, args.n_genres) + 1, size=args.n_items)
    flat = top[np.arange(top.shape[1]) < n_genres[:, None]]  # row-major: each item's best first
    offsets = np.concatenate([[0], np.cumsum(n_genres)]).astype(np.int32)
    lists = pa.ListArray.from_arrays(pa.array(offsets), pc.take(pa.array(names), pa.array(flat)))
    table = pa.table(
        {
            "item_id": pa.array(np.arange(args.n_items), pa.int64()),
            "genres": pc.binary_join(lists, "|"),
        }
    )
    pacsv.write_csv(table, path, pacsv.WriteOptions(quoting_style="needed"))


def _jsonl_bytes(table: pa.Table) -> memoryview:
    """Render a table of numbers and plain words as JSON lines, vectorised in Arrow.

    Every row becomes one string ending in a newline, so the string array's data buffer is the
    file content (about 4x faster than pandas ``to_json``). String values are not escaped: only
    use it for values without quotes, backslashes or control characters.
    """
    parts: list[Any] = []
    for i, field in enumerate(table.schema):
        text = pc.cast(table.column(i), pa.string())
        if pa.types.is_string(field.type):
            text = pc.binary_join_element_wise('"', text, '"', "")
        elif pa.types.is_floating(field.type):  # "4" -> "4.0": readers must not infer ints
            whole = pc.invert(pc.match_substring(text, "."))
            text = pc.if_else(whole, pc.binary_join_element_wise(text, ".0", ""), text)
        parts += [("{" if i == 0 else ",") + json.dumps(field.name) + ":", text]
    lines = pc.binary_join_element_wise(*parts, "}\n", "").combine_chunks()
    _, offsets_buf, data = lines.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=np.int32)[
        lines.offset : lines.offset + len(lines) + 1
    ]
    return memoryview(data)[int(offsets[0]) : int(offsets[-1])]


class _ChunkSink:
    """Spread consecutive tables over files: file ``i`` gets rows ``bounds[i]:bounds[i + 1]``."""

    def __init__(self, fmt: str, paths: list[str], bounds: np.ndarray) -> None:
        self._fmt = fmt
        self._paths = paths
        self._bounds = bounds
        self._file = -1
        self._written = 0
        self._writer: Any = None

    def write(self, table: pa.Table) -> None:
        offset = 0
        while offset < table.num_rows:
            while self._file < 0 or self._written >= self._bounds[self._file + 1]:
                self._open_next()
            take = min(table.num_rows - offset, int(self._bounds[self._file + 1]) - self._written)
            self._write(table.slice(offset, take))
            offset += take
            self._written += take

    def _open_next(self) -> None:
        import pyarrow.csv as pacsv
        import pyarrow.parquet as pq

        self._close_current()
        self._file += 1
        path = self._paths[self._file]
        if self._fmt == "parquet":
            self._writer = pq.ParquetWriter(path, _SYNTHETIC_SCHEMA)
        elif self._fmt == "csv":
            self._writer = pacsv.CSVWriter(
                path, _SYNTHETIC_SCHEMA, write_options=pacsv.WriteOptions(quoting_style="needed")
            )
        else:
            self._writer = open(path, "wb")  # noqa: SIM115 - closed in close()

    def _write(self, table: pa.Table) -> None:
        if self._fmt == "parquet":
            self._writer.write_table(table, row_group_size=_CHUNK_EVENTS)
        elif self._fmt == "csv":
            self._writer.write_table(table)
        else:
            self._writer.write(_jsonl_bytes(table))

    def _close_current(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def close(self) -> None:
        """Close the open file and create any file that got no rows (so every path exists)."""
        self._close_current()
        while self._file + 1 < len(self._paths):
            self._open_next()
        self._close_current()
