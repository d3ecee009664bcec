"""MovieLens sources without the network: layouts, conversion of old formats, checksums."""

import hashlib
import io
import os
import zipfile
from pathlib import Path

import pyarrow.csv as pacsv
import pytest

from app.config import DataArgs
from app.ingest import SourceError, resolve_source
from app.ingest.movielens import MOVIELENS_SHA256, verify_sha256
from app.store import sha256_file

ML_SMALL = Path("/work/shared/data/ml-latest-small")


@pytest.mark.skipif(not ML_SMALL.is_dir(), reason="shared ml-latest-small not available")
def test_movielens_latest_small_resolves_to_its_csvs(tmp_path: Path) -> None:
    src = resolve_source(
        DataArgs(source="movielens", path=str(ML_SMALL), variant="ml-latest-small"), str(tmp_path)
    )
    assert src.paths == [str(ML_SMALL / "ratings.csv")]
    assert src.format == "csv"
    assert (src.columns.user, src.columns.item, src.columns.timestamp) == (
        "userId",
        "movieId",
        "timestamp",
    )
    assert src.columns.rating == "rating"
    assert src.item_features == str(ML_SMALL / "movies.csv")
    assert (src.item_features_id_column, src.genres_column) == ("movieId", "genres")
    assert "ml-latest-small" in src.description
    header = Path(src.paths[0]).read_text().splitlines()[0]
    assert header == "userId,movieId,rating,timestamp"
    assert not list(tmp_path.iterdir())  # used in place: nothing converted or copied

    # the parent folder works too
    parent = resolve_source(
        DataArgs(source="movielens", path=str(ML_SMALL.parent), variant="ml-latest-small"),
        str(tmp_path),
    )
    assert parent.paths == src.paths


@pytest.mark.skipif(not (ML_SMALL / "SHA256SUMS").is_file(), reason="no SHA256SUMS")
def test_shared_ml_latest_small_matches_its_sha256sums() -> None:
    for line in (ML_SMALL / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split()
        if name in ("ratings.csv", "movies.csv"):
            verify_sha256(str(ML_SMALL / name), digest)


def _write_ml100k(folder: Path) -> None:
    folder.mkdir(parents=True)
    (folder / "u.data").write_text(
        "1\t10\t4\t881250949\n2\t20\t3\t891717742\n1\t20\t5\t878887116\n"
    )
    flags_a = ["0"] * 19
    flags_a[1] = flags_a[4] = "1"  # Action, Children's
    flags_b = ["0"] * 19
    lines = [
        "|".join(["10", "Misérables, Les (1995)", "01-Jan-1995", "", "http://x"] + flags_a),
        "|".join(["20", "Plain (1996)", "01-Jan-1996", "", "http://y"] + flags_b),
    ]
    (folder / "u.item").write_bytes(("\n".join(lines) + "\n").encode("latin-1"))


def test_ml100k_is_converted_once_to_latest_style_csvs(tmp_path: Path) -> None:
    _write_ml100k(tmp_path / "raw" / "ml-100k")
    data = DataArgs(source="movielens", path=str(tmp_path / "raw"), variant="ml-100k")
    src = resolve_source(data, str(tmp_path / "cache"))
    assert src.paths == [str(tmp_path / "cache" / "ml-100k" / "ratings.csv")]
    ratings = pacsv.read_csv(src.paths[0])
    assert ratings.column_names == ["userId", "movieId", "rating", "timestamp"]
    assert ratings.num_rows == 3
    assert ratings.column("rating").to_pylist() == [4.0, 3.0, 5.0]
    assert ratings.column("timestamp").to_pylist()[0] == 881250949
    assert src.item_features is not None
    movies = pacsv.read_csv(src.item_features).to_pylist()
    assert movies == [
        {"movieId": 10, "title": "Misérables, Les (1995)", "genres": "Action|Children's"},
        {"movieId": 20, "title": "Plain (1996)", "genres": "(no genres listed)"},
    ]
    Path(src.item_features).read_text(encoding="utf-8")  # valid UTF-8

    # second resolve reuses the converted files (also when pointing at the variant folder)
    mtime = os.stat(src.paths[0]).st_mtime_ns
    again = resolve_source(
        data.model_copy(update={"path": str(tmp_path / "raw" / "ml-100k")}),
        str(tmp_path / "cache"),
    )
    assert again.paths == src.paths
    assert os.stat(src.paths[0]).st_mtime_ns == mtime
    assert not [p for p in (tmp_path / "cache" / "ml-100k").iterdir() if p.name.startswith(".")]


def test_ml1m_is_converted_to_latest_style_csvs(tmp_path: Path) -> None:
    folder = tmp_path / "ml-1m"
    folder.mkdir()
    (folder / "ratings.dat").write_text("1::1193::5::978300760\n1::661::3::978302109\n")
    (folder / "movies.dat").write_bytes(
        "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n"
        "661::Léon: The Professional (1994)::Crime|Drama|Thriller\n".encode("latin-1")
    )
    src = resolve_source(
        DataArgs(source="movielens", path=str(folder), variant="ml-1m"), str(tmp_path / "c")
    )
    ratings = pacsv.read_csv(src.paths[0])
    assert ratings.column_names == ["userId", "movieId", "rating", "timestamp"]
    assert ratings.num_rows == 2
    assert ratings.column("movieId").to_pylist() == [1193, 661]
    assert src.item_features is not None
    movies = {r["movieId"]: r for r in pacsv.read_csv(src.item_features).to_pylist()}
    assert movies[661]["title"] == "Léon: The Professional (1994)"
    assert movies[661]["genres"] == "Crime|Drama|Thriller"
    assert movies[1193]["genres"] == "Drama"


def test_missing_movielens_without_download_names_the_key(tmp_path: Path) -> None:
    data = DataArgs(source="movielens", path=str(tmp_path / "nowhere"), variant="ml-1m")
    with pytest.raises(SourceError, match=r"data\.download=true") as err:
        resolve_source(data, str(tmp_path / "cache"))
    assert "ml-1m.zip" in str(err.value)
    assert "data.path" in str(err.value)


def test_checksum_verification(tmp_path: Path) -> None:
    path = tmp_path / "archive.zip"
    path.write_bytes(b"not really a zip")
    good = hashlib.sha256(b"not really a zip").hexdigest()
    assert sha256_file(str(path)) == good
    verify_sha256(str(path), good)
    verify_sha256(str(path), good.upper())
    with pytest.raises(SourceError, match="checksum mismatch"):
        verify_sha256(str(path), "0" * 64)


def test_checksum_table_is_complete() -> None:
    for variant, digest in MOVIELENS_SHA256.items():
        assert digest is not None and len(digest) == 64, variant
        int(digest, 16)


def test_download_refused_without_a_known_checksum(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(MOVIELENS_SHA256, "ml-1m", None)
    data = DataArgs(source="movielens", path=str(tmp_path), variant="ml-1m", download=True)
    with pytest.raises(SourceError, match="no verified SHA-256"):
        resolve_source(data, str(tmp_path / "cache"))


def test_failed_download_says_which_url_and_how_to_install_by_hand(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import requests

    def offline(*args: object, **kwargs: object) -> None:
        raise requests.ConnectionError("network is unreachable")

    monkeypatch.setattr(requests, "get", offline)
    data = DataArgs(source="movielens", path=str(tmp_path), variant="ml-100k", download=True)
    with pytest.raises(SourceError) as err:
        resolve_source(data, str(tmp_path / "cache"))
    message = str(err.value)
    assert "https://files.grouplens.org/datasets/movielens/ml-100k.zip" in message
    assert "by hand" in message
    assert [p.name for p in tmp_path.iterdir()] == []  # no partial download left behind


class _FakeResponse:
    def __init__(self, body: bytes) -> None:
        self.body = body
        self.headers = {"content-length": str(len(body))}

    def __enter__(self) -> "_FakeResponse":
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def raise_for_status(self) -> None:
        return None

    def iter_content(self, chunk_size: int) -> list[bytes]:
        return [self.body[i : i + chunk_size] for i in range(0, len(self.body), chunk_size)]


def _fake_ml100k_zip(tmp_path: Path) -> bytes:
    _write_ml100k(tmp_path / "zip-src" / "ml-100k")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name in ("u.data", "u.item"):
            zf.write(tmp_path / "zip-src" / "ml-100k" / name, f"ml-100k/{name}")
    return buf.getvalue()


def test_download_verifies_and_extracts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import requests

    body = _fake_ml100k_zip(tmp_path)
    urls: list[str] = []

    def fake_get(url: str, **kwargs: object) -> _FakeResponse:
        urls.append(url)
        return _FakeResponse(body)

    monkeypatch.setattr(requests, "get", fake_get)
    monkeypatch.setitem(MOVIELENS_SHA256, "ml-100k", hashlib.sha256(body).hexdigest())
    dest = tmp_path / "data"
    data = DataArgs(source="movielens", path=str(dest), variant="ml-100k", download=True)
    src = resolve_source(data, str(tmp_path / "cache"))
    assert urls == ["https://files.grouplens.org/datasets/movielens/ml-100k.zip"]
    assert (dest / "ml-100k" / "u.data").is_file()
    assert sorted(p.name for p in dest.iterdir()) == ["ml-100k"]  # no zip or staging left
    assert pacsv.read_csv(src.paths[0]).num_rows == 3


def test_download_with_wrong_checksum_extracts_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import requests

    body = _fake_ml100k_zip(tmp_path)
    monkeypatch.setattr(requests, "get", lambda url, **kw: _FakeResponse(body))
    monkeypatch.setitem(MOVIELENS_SHA256, "ml-100k", "0" * 64)
    dest = tmp_path / "data"
    data = DataArgs(source="movielens", path=str(dest), variant="ml-100k", download=True)
    with pytest.raises(SourceError, match="checksum mismatch"):
        resolve_source(data, str(tmp_path / "cache"))
    assert list(dest.iterdir()) == []
