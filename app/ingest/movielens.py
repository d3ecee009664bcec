"""GroupLens MovieLens: find a variant on disk, download it checksum-verified, convert old formats.

``locate_movielens(data, cache_dir)`` returns the ml-latest style ``ratings.csv`` and
``movies.csv`` of ``data.variant``. ml-100k and ml-1m ship in their own layouts; they are converted
once into that style under ``cache_dir``. Nothing touches the network unless ``data.download`` is
true and the variant is missing.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from typing import Any

from app.config import ColumnMap, DataArgs
from app.ingest.errors import SourceError
from app.store import sha256_file

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

MOVIELENS_COLUMNS = ColumnMap(user="userId", item="movieId", timestamp="timestamp", rating="rating")
"""Columns of ml-latest style ``ratings.csv`` (also what ml-100k/ml-1m are converted to)."""

# Files that prove a variant is present, in its own layout.
_VARIANT_FILES: dict[str, tuple[str, str]] = {
    "ml-latest-small": ("ratings.csv", "movies.csv"),
    "ml-20m": ("ratings.csv", "movies.csv"),
    "ml-25m": ("ratings.csv", "movies.csv"),
    "ml-100k": ("u.data", "u.item"),
    "ml-1m": ("ratings.dat", "movies.dat"),
}

# ml-100k u.item genre flags, in column order (u.genre).
_ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western",
)  # fmt: skip
_NO_GENRES = "(no genres listed)"


def locate_movielens(data: DataArgs, cache_dir: str) -> tuple[str, str, str]:
    """Find (download and convert as needed) ``data.variant`` under ``data.path``.

    Args:
        data: The ``data`` section of the config (``source: movielens``).
        cache_dir: Local folder for the converted ml-100k / ml-1m files.

    Returns:
        ``(ratings.csv, movies.csv, folder holding the variant's own files)``.

    Raises:
        SourceError: when the variant is missing and may not or cannot be downloaded.
    """
    variant = data.variant
    if "://" in data.path:
        raise SourceError(
            f"data.path {data.path!r}: source movielens reads a local folder; for raw files in "
            "object storage use data.source=files with data.columns set to the MovieLens names"
        )
    path = os.path.abspath(os.path.expanduser(data.path))
    folder = _find_variant_dir(path, variant)
    if folder is None:
        needed = " and ".join(_VARIANT_FILES[variant])
        if not data.download:
            raise SourceError(
                f"MovieLens {variant} not found: no {needed} in {path} or "
                f"{os.path.join(path, variant)}. Set data.download=true to fetch it from "
                f"{MOVIELENS_URL.format(variant=variant)}, or point data.path at the folder "
                "that holds the files."
            )
        download_variant(variant, path)
        folder = _find_variant_dir(path, variant)
        if folder is None:
            raise SourceError(
                f"downloaded {MOVIELENS_URL.format(variant=variant)} into {path} but found no "
                f"{needed} in it"
            )
    if variant in ("ml-100k", "ml-1m"):
        ratings, movies = convert_legacy(variant, folder, os.path.join(cache_dir, variant))
    else:
        ratings, movies = os.path.join(folder, "ratings.csv"), os.path.join(folder, "movies.csv")
    return ratings, movies, folder


def _find_variant_dir(path: str, variant: str) -> str | None:
    """Return the folder holding ``variant``'s files: ``path`` itself or ``path/<variant>``."""
    for folder in (path, os.path.join(path, variant)):
        if all(os.path.isfile(os.path.join(folder, f)) for f in _VARIANT_FILES[variant]):
            return folder
    return None


def verify_sha256(path: str, expected: str) -> None:
    """Raise ``SourceError`` unless the file's SHA-256 is ``expected`` (any case)."""
    actual = sha256_file(path)
    if actual != expected.lower():
        raise SourceError(
            f"checksum mismatch for {path}: SHA-256 is {actual}, expected {expected}; the "
            "download is corrupt or the upstream file changed"
        )


def download_variant(variant: str, dest: str) -> None:
    """Download ``variant``'s GroupLens zip, verify its SHA-256 and extract it into ``dest``.

    Raises:
        SourceError: when no verified checksum is known, the download fails or the checksum does
            not match; nothing is extracted then, and the message says how to install by hand.
    """
    import requests
    from tqdm.auto import tqdm

    url = MOVIELENS_URL.format(variant=variant)
    expected = MOVIELENS_SHA256.get(variant)
    manual = (
        f"To install it by hand, download {url} elsewhere, unzip it into {dest} (so that "
        f"{os.path.join(dest, variant, _VARIANT_FILES[variant][0])} exists) and rerun."
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
        verify_sha256(tmp, expected)
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


def convert_legacy(variant: str, folder: str, out_dir: str) -> tuple[str, str]:
    """Convert ml-100k / ml-1m into ml-latest style ``ratings.csv`` + ``movies.csv`` (once).

    Returns:
        The paths of the converted ``ratings.csv`` and ``movies.csv`` under ``out_dir``.
    """
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
        movies = _read_movies(os.path.join(folder, "u.item"), "|", _ml100k_genres)
    else:
        with open(os.path.join(folder, "ratings.dat"), "rb") as f:
            raw = f.read().replace(b"::", b",")
        ratings = pd.read_csv(io.BytesIO(raw), header=None, names=names, dtype="int64")
        movies = _read_movies(os.path.join(folder, "movies.dat"), "::", _ml1m_genres)
    ratings["rating"] = ratings["rating"].astype("float64")  # "4.0", as in ml-latest
    # movies last: its presence (with ratings) marks a complete conversion
    _write_atomic(ratings_out, lambda f: ratings.to_csv(f, index=False))
    _write_atomic(movies_out, lambda f: movies.to_csv(f, index=False))
    return ratings_out, movies_out


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


def _read_movies(path: str, sep: str, genres_of: Callable[[list[str]], str | None]) -> Any:
    """Read a latin-1 movie list as movieId,title,genres (one movie per non-empty line).

    ``genres_of`` turns a line's fields into ``|``-separated genres, or None for a malformed line.
    """
    import pandas as pd

    rows = []
    with open(path, encoding="latin-1", newline="") as f:
        for line in f:
            line = line.rstrip("\r\n")
            if not line:
                continue
            fields = line.split(sep)
            genres = genres_of(fields)
            if genres is None:
                name = os.path.basename(path)
                raise SourceError(f"{path}: malformed {name} line {line[:80]!r}")
            rows.append((int(fields[0]), fields[1], genres or _NO_GENRES))
    return pd.DataFrame(rows, columns=["movieId", "title", "genres"])


def _ml100k_genres(fields: list[str]) -> str | None:
    """``u.item``: pipe-separated, the last 19 fields are genre flags."""
    if len(fields) < 5 + len(_ML100K_GENRES):
        return None
    flags = fields[-len(_ML100K_GENRES) :]
    return "|".join(g for g, flag in zip(_ML100K_GENRES, flags, strict=True) if flag.strip() == "1")


def _ml1m_genres(fields: list[str]) -> str | None:
    """``movies.dat``: ``movieId::title::genres``."""
    return fields[2] if len(fields) == 3 else None
