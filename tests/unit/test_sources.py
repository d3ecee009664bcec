import gzip
import hashlib
import io
import os
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq
import pytest

from app import sources
from app.config import DataArgs, SyntheticArgs
from app.sources import (
    SourceError,
    _filesystem,
    _sha256_file,
    _verify_sha256,
    generate_synthetic,
    resolve_source,
)

ML_SMALL = Path("/work/shared/data/ml-latest-small")
SYNTH_COLUMNS = ["user_id", "item_id", "timestamp", "rating", "event"]


def _read(path: str, fmt: str) -> pa.Table:
    if fmt == "parquet":
        return pq.read_table(path)
    if fmt == "csv":
        return pacsv.read_csv(path)
    return pajson.read_json(path)


def _read_all(paths: list[str], fmt: str) -> pa.Table:
    return pa.concat_tables([_read(p, fmt) for p in paths])


# ---------------------------------------------------------------------------------------------
# MovieLens


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
            _verify_sha256(str(ML_SMALL / name), digest)


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
    assert _sha256_file(str(path)) == good
    _verify_sha256(str(path), good)
    _verify_sha256(str(path), good.upper())
    with pytest.raises(SourceError, match="checksum mismatch"):
        _verify_sha256(str(path), "0" * 64)


def test_checksum_table_is_complete() -> None:
    for variant, digest in sources.MOVIELENS_SHA256.items():
        assert digest is not None and len(digest) == 64, variant
        int(digest, 16)


def test_download_refused_without_a_known_checksum(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sources.MOVIELENS_SHA256, "ml-1m", None)
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
    monkeypatch.setitem(sources.MOVIELENS_SHA256, "ml-100k", hashlib.sha256(body).hexdigest())
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
    monkeypatch.setitem(sources.MOVIELENS_SHA256, "ml-100k", "0" * 64)
    dest = tmp_path / "data"
    data = DataArgs(source="movielens", path=str(dest), variant="ml-100k", download=True)
    with pytest.raises(SourceError, match="checksum mismatch"):
        resolve_source(data, str(tmp_path / "cache"))
    assert list(dest.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# synthetic

SMALL = SyntheticArgs(n_users=300, n_items=400, n_interactions=12_000, seed=7, n_files=2)


def test_synthetic_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    a = generate_synthetic(SMALL, str(tmp_path / "a"))
    b = generate_synthetic(SMALL, str(tmp_path / "b"))
    assert [Path(p).name for p in a] == [Path(p).name for p in b]
    for pa_, pb in zip(a, b, strict=True):
        assert _read(pa_, "parquet").equals(_read(pb, "parquet"))
        assert Path(pa_).read_bytes() == Path(pb).read_bytes()
    assert (tmp_path / "a" / "items.csv").read_bytes() == (
        tmp_path / "b" / "items.csv"
    ).read_bytes()
    other = generate_synthetic(SMALL.model_copy(update={"seed": 8}), str(tmp_path / "c"))
    assert not _read_all(other, "parquet").equals(_read_all(a, "parquet"))


def test_synthetic_statistics(tmp_path: Path) -> None:
    paths = generate_synthetic(SMALL, str(tmp_path))
    assert len(paths) == 2
    table = _read_all(paths, "parquet")
    assert table.column_names == SYNTH_COLUMNS
    assert table.num_rows == SMALL.n_interactions
    users = table.column("user_id").to_numpy()
    items = table.column("item_id").to_numpy()
    ts = table.column("timestamp").to_numpy()
    per_user = np.bincount(users, minlength=SMALL.n_users)
    assert (per_user >= 3).all()
    assert per_user.max() > 4 * np.median(per_user)  # heavy-tailed activity
    pop = np.sort(np.bincount(items, minlength=SMALL.n_items))[::-1]
    assert pop[: SMALL.n_items // 10].sum() / pop.sum() > 0.25  # uniform would be 0.1
    assert items.min() >= 0 and items.max() < SMALL.n_items
    # grouped by user, time non-decreasing within each user, inside a ~2-year window
    assert (np.diff(users) >= 0).all()
    same_user = np.diff(users) == 0
    assert (np.diff(ts)[same_user] >= 0).all()
    assert 1.5e9 < ts.min() and ts.max() <= 1_704_067_200
    assert ts.max() - ts.min() < 2.1 * 365 * 86_400
    ratings = table.column("rating").to_numpy()
    assert ratings.min() >= 0.5 and ratings.max() <= 5.0
    assert np.allclose(ratings * 2, np.round(ratings * 2))
    assert set(table.column("event").to_pylist()) == {"view", "click", "purchase"}
    # some repeated pairs, but most events are distinct pairs
    pairs = len(set(zip(users.tolist(), items.tolist(), strict=True)))
    assert 0.7 * len(users) < pairs < len(users)
    genres = pacsv.read_csv(tmp_path / "items.csv")
    assert genres.column_names == ["item_id", "genres"]
    assert genres.num_rows == SMALL.n_items
    counts = [len(g.split("|")) for g in genres.column("genres").to_pylist()]
    assert min(counts) >= 1 and max(counts) <= 3


@pytest.mark.parametrize("fmt", ["csv", "parquet", "jsonl"])
def test_synthetic_formats_are_readable(tmp_path: Path, fmt: str) -> None:
    args = SyntheticArgs(n_users=50, n_items=80, n_interactions=1_000, format=fmt, n_files=3)
    paths = generate_synthetic(args, str(tmp_path))
    assert [Path(p).name for p in paths] == [
        f"interactions-0000{i}-of-00003.{'jsonl' if fmt == 'jsonl' else fmt}" for i in range(3)
    ]
    tables = [_read(p, fmt) for p in paths]
    for t in tables:
        assert t.column_names == SYNTH_COLUMNS
        assert pa.types.is_integer(t.schema.field("user_id").type)
        assert pa.types.is_integer(t.schema.field("item_id").type)
        assert pa.types.is_integer(t.schema.field("timestamp").type)
        assert pa.types.is_floating(t.schema.field("rating").type)
    assert sum(t.num_rows for t in tables) == 1_000


def test_synthetic_needs_three_events_per_user(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="n_interactions"):
        generate_synthetic(SyntheticArgs(n_users=100, n_interactions=299), str(tmp_path))


def test_resolve_synthetic_generates_once_into_cache(tmp_path: Path) -> None:
    data = DataArgs(source="synthetic", synthetic=SMALL.model_copy(update={"format": "csv"}))
    src = resolve_source(data, str(tmp_path))
    assert src.format == "csv"
    assert len(src.paths) == 2
    folder = Path(src.paths[0]).parent
    assert folder.parent == tmp_path and folder.name.startswith("synthetic-")
    assert (folder / "_SUCCESS").is_file()
    assert (src.columns.user, src.columns.item, src.columns.timestamp) == (
        "user_id",
        "item_id",
        "timestamp",
    )
    assert (src.columns.rating, src.columns.event, src.columns.weight) == ("rating", "event", None)
    assert src.item_features == str(folder / "items.csv")
    assert src.item_features_id_column == "item_id"
    assert sum(_read(p, "csv").num_rows for p in src.paths) == SMALL.n_interactions
    mtime = os.stat(src.paths[0]).st_mtime_ns
    assert resolve_source(data, str(tmp_path)) == src
    assert os.stat(src.paths[0]).st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # no staging left over
    # other args -> other folder
    other = resolve_source(
        data.model_copy(update={"synthetic": SMALL.model_copy(update={"seed": 1})}), str(tmp_path)
    )
    assert Path(other.paths[0]).parent != folder


# ---------------------------------------------------------------------------------------------
# files


@pytest.fixture
def mixed_folder(tmp_path: Path) -> Path:
    root = tmp_path / "raw"
    (root / "sub").mkdir(parents=True)
    for name in ("b.csv", "a.csv", "sub/d.tsv", "c.parquet", "e.pq", "f.jsonl", "notes.txt"):
        (root / name).write_text("x\n")
    with gzip.open(root / "g.csv.gz", "wt") as f:
        f.write("x\n")
    (root / "_SUCCESS").write_text("")
    (root / ".hidden.csv").write_text("")
    return root


def test_files_source_picks_by_suffix(mixed_folder: Path) -> None:
    def names(fmt: str, glob: str | None = None) -> list[str]:
        data = DataArgs(source="files", path=str(mixed_folder), format=fmt, glob=glob)
        src = resolve_source(data, "unused")
        assert src.format == fmt
        return [os.path.relpath(p, mixed_folder) for p in src.paths]

    assert names("csv") == ["a.csv", "b.csv", "g.csv.gz", "sub/d.tsv"]
    assert names("parquet") == ["c.parquet", "e.pq"]
    assert names("jsonl") == ["f.jsonl"]
    assert names("csv", glob="b*") == ["b.csv"]
    assert names("csv", glob="sub/*") == ["sub/d.tsv"]


def test_files_source_keeps_the_data_settings(mixed_folder: Path) -> None:
    data = DataArgs(
        source="files",
        path=str(mixed_folder / "a.csv"),
        delimiter=";",
        encoding="latin-1",
        timestamp_unit="ms",
        item_features="/x/items.csv",
        item_features_id_column="id",
    )
    src = resolve_source(data, "unused")
    assert src.paths == [str(mixed_folder / "a.csv")]
    assert (src.delimiter, src.encoding, src.timestamp_unit) == (";", "latin-1", "ms")
    assert (src.item_features, src.item_features_id_column) == ("/x/items.csv", "id")
    assert src.columns == data.columns


def test_files_source_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("")
    with pytest.raises(SourceError, match=r"no raw files .*empty.*\.parquet") as err:
        resolve_source(DataArgs(path=str(tmp_path / "empty"), format="parquet"), "unused")
    assert "readme.txt" in str(err.value)
    with pytest.raises(SourceError, match="data.glob"):
        resolve_source(DataArgs(path=str(tmp_path / "empty"), glob="*.csv"), "unused")
    with pytest.raises(SourceError, match="does not exist"):
        resolve_source(DataArgs(path=str(tmp_path / "missing")), "unused")
    with pytest.raises(SourceError, match="local folder"):
        resolve_source(DataArgs(source="movielens", path="s3://bucket/ml"), "unused")


def test_a_named_file_is_taken_whatever_its_suffix(tmp_path: Path) -> None:
    (tmp_path / "events.log").write_text("x\n")
    src = resolve_source(DataArgs(path=str(tmp_path / "events.log")), "unused")
    assert src.paths == [str(tmp_path / "events.log")]


def test_s3_endpoint_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("s3fs")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:1")
    fs, root = _filesystem("s3://bucket/prefix")
    assert root == "bucket/prefix"
    assert fs.client_kwargs == {"endpoint_url": "http://127.0.0.1:1"}


@pytest.mark.slow
def test_files_source_lists_s3_with_the_env_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
        fs, _ = _filesystem("s3://raw-bucket")
        fs.mkdir("raw-bucket")
        fs.pipe({f"raw-bucket/in/{n}": b"x" for n in ("b.csv", "a.csv", "c.parquet", "s/d.csv")})
        src = resolve_source(DataArgs(path="s3://raw-bucket/in"), "unused")
        assert src.paths == [
            "s3://raw-bucket/in/a.csv",
            "s3://raw-bucket/in/b.csv",
            "s3://raw-bucket/in/s/d.csv",
        ]
        with pytest.raises(SourceError, match="no raw files"):
            resolve_source(DataArgs(path="s3://raw-bucket/in", format="jsonl"), "unused")
    finally:
        server.stop()
