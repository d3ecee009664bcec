"""The files source: picking raw files by suffix or glob, locally and on S3, and its errors."""

import gzip
import os
from pathlib import Path

import pytest

from app.config import DataArgs
from app.ingest import SourceError, resolve_source
from app.ingest.sources import fingerprint
from app.store import filesystem_for


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
    fs, root = filesystem_for("s3://bucket/prefix")
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
        fs, _ = filesystem_for("s3://raw-bucket")
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


def test_fingerprint_identifies_local_files_by_content(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("x\n")
    (tmp_path / "b.csv").write_text("x\n")
    prints = fingerprint([str(tmp_path / "a.csv"), str(tmp_path / "b.csv")])
    assert [p["path"] for p in prints] == [str(tmp_path / "a.csv"), str(tmp_path / "b.csv")]
    assert prints[0]["sha256"] == prints[1]["sha256"]
    assert prints[0]["size"] == 2
    (tmp_path / "b.csv").write_text("y\n")
    assert fingerprint([str(tmp_path / "b.csv")])[0]["sha256"] != prints[0]["sha256"]
