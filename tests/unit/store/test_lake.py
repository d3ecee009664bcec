"""Tests for app.store.lake: atomic writes, staging, publish (manifest last), versions, pickling."""

import json
import os
import pickle

import pytest

from app.store import MANIFEST, Lake, LakeError, as_lake, content_id, sha256_file


def test_atomic_json_round_trip_leaves_no_temp_files(tmp_path):
    lake = Lake(str(tmp_path))
    lake.write_json("a/b.json", {"x": 1})
    assert lake.read_json("a/b.json") == {"x": 1}
    assert os.listdir(tmp_path / "a") == ["b.json"]


def test_missing_file_error_names_it(tmp_path):
    with pytest.raises(LakeError, match="nope.json"):
        Lake(str(tmp_path)).read_bytes("nope.json")


def _publish(lake, rel, created):
    with lake.staging(rel) as out:
        with open(os.path.join(out, "data.txt"), "w") as f:
            f.write(rel)
        with open(os.path.join(out, MANIFEST), "w") as f:
            json.dump({"created_at": created}, f)


def test_staging_publishes_atomically(tmp_path):
    lake = Lake(str(tmp_path))
    _publish(lake, "datasets/d/v1", "2026-01-01")
    _publish(lake, "datasets/d/v2", "2026-01-02")
    assert lake.versions("datasets/d") == ["v1", "v2"]
    assert lake.resolve_version("datasets/d", "latest") == "v2"
    assert lake.resolve_version("datasets/d", "v1") == "v1"
    # No staging folders are left behind.
    assert sorted(os.listdir(tmp_path / "datasets/d")) == ["v1", "v2"]


def test_failed_staging_leaves_nothing_visible(tmp_path):
    lake = Lake(str(tmp_path))
    with pytest.raises(RuntimeError):
        with lake.staging("datasets/d/v3") as out:
            open(os.path.join(out, "part.parquet"), "w").close()
            raise RuntimeError("crash mid-write")
    assert lake.versions("datasets/d") == []
    assert not os.path.exists(tmp_path / "datasets/d/v3")
    with pytest.raises(LakeError, match="without manifest"):
        with lake.staging("datasets/d/v4"):
            pass
    assert os.listdir(tmp_path / "datasets/d") == []


def test_unpublished_folder_is_not_a_version(tmp_path):
    lake = Lake(str(tmp_path))
    (tmp_path / "datasets/d/half").mkdir(parents=True)
    with pytest.raises(LakeError, match="no published versions"):
        lake.resolve_version("datasets/d")


def test_unknown_version_lists_the_available_ones(tmp_path):
    lake = Lake(str(tmp_path))
    _publish(lake, "datasets/d/abc1", "2026-01-01")
    with pytest.raises(LakeError, match="versions: abc1"):
        lake.resolve_version("datasets/d", "zzz")
    assert lake.resolve_version("datasets/d", "abc") == "abc1"
    _publish(lake, "datasets/d/abc2", "2026-01-02")
    with pytest.raises(LakeError, match=r"ambiguous \(matches abc1, abc2\)"):
        lake.resolve_version("datasets/d", "abc")


def test_content_id_is_stable_and_order_free():
    assert content_id({"a": 1, "b": [1, 2]}) == content_id({"b": [1, 2], "a": 1})
    assert content_id({"a": 1}) != content_id({"a": 2})


def test_sha256_file(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")
    expected = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert sha256_file(str(path)) == expected


# --- Lake.publish: files first, manifest last, once ---
def _writer(calls, files=("a.txt", "b.txt"), extra=None):
    def write(stage):
        calls.append(stage)
        # The manifest must not exist while the files are being written.
        assert not os.path.exists(os.path.join(stage, MANIFEST))
        for name in files:
            with open(os.path.join(stage, name), "w") as f:
                f.write(name)
        return extra

    return write


def test_publish_writes_files_then_manifest(tmp_path):
    lake = Lake(str(tmp_path))
    calls = []
    manifest = lake.publish("things/v1", _writer(calls, extra={"rows": 2}), {"name": "t"})
    assert len(calls) == 1 and not calls[0].endswith("things/v1")  # written in staging
    assert manifest["name"] == "t" and manifest["rows"] == 2 and manifest["created_at"]
    assert lake.read_json("things/v1/manifest.json") == manifest
    assert sorted(os.listdir(tmp_path / "things/v1")) == ["a.txt", "b.txt", MANIFEST]
    assert os.listdir(tmp_path / "things") == ["v1"]
    assert lake.is_published("things/v1") and lake.versions("things") == ["v1"]


def test_publish_keeps_a_given_created_at(tmp_path):
    lake = Lake(str(tmp_path))
    manifest = lake.publish("things/v1", _writer([]), {"created_at": "2026-01-01T00:00:00"})
    assert manifest["created_at"] == "2026-01-01T00:00:00"


def test_publish_failure_leaves_nothing_visible(tmp_path):
    lake = Lake(str(tmp_path))

    def crash(stage):
        _writer([])(stage)
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError, match="crash mid-write"):
        lake.publish("things/v1", crash, {"name": "t"})
    assert not lake.is_published("things/v1") and lake.versions("things") == []
    assert os.listdir(tmp_path / "things") == []  # no staging folder left behind


def test_publish_again_returns_the_published_version_untouched(tmp_path):
    lake = Lake(str(tmp_path))
    first = lake.publish("things/v1", _writer([]), {"name": "t"})
    calls = []
    again = lake.publish("things/v1", _writer(calls, files=("c.txt",)), {"name": "other"})
    assert calls == [] and again == first
    assert sorted(os.listdir(tmp_path / "things/v1")) == ["a.txt", "b.txt", MANIFEST]


# --- crossing process boundaries ---
def test_lake_pickles_as_its_uri(tmp_path):
    lake = Lake(str(tmp_path) + "/")
    assert lake.__reduce__() == (Lake, (str(tmp_path),))
    copy = pickle.loads(pickle.dumps(lake))
    assert isinstance(copy, Lake) and copy == lake and copy.uri == str(tmp_path)
    assert copy.path("a") == lake.path("a")
    assert len(pickle.dumps(lake)) < 200 + len(lake.uri)


def test_as_lake_and_lake_of_a_lake(tmp_path):
    lake = Lake(str(tmp_path))
    assert as_lake(lake) is lake
    assert as_lake(str(tmp_path)) == lake and as_lake(tmp_path) == lake
    assert Lake(lake) == lake and hash(Lake(lake)) == hash(lake)
    assert Lake(str(tmp_path / "other")) != lake


def test_publish_on_s3_writes_manifest_last_and_cleans_up_on_error(s3_lake):
    def write(stage):
        assert stage == s3_lake.path("things/v1")  # object stores write in place
        s3_lake.fs.pipe_file(f"{stage}/a.txt", b"a")
        assert not s3_lake.is_published("things/v1")

    manifest = s3_lake.publish("things/v1", write, {"name": "t"})
    assert s3_lake.read_json("things/v1/manifest.json") == manifest
    assert s3_lake.listdir("things/v1") == ["a.txt", MANIFEST]

    def crash(stage):
        s3_lake.fs.pipe_file(f"{stage}/a.txt", b"a")
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        s3_lake.publish("things/v2", crash, {"name": "t"})
    assert not s3_lake.exists("things/v2") and s3_lake.versions("things") == ["v1"]
    assert pickle.loads(pickle.dumps(s3_lake)) == s3_lake
