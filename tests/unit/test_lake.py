import json
import os

import pytest

from app.lake import MANIFEST, Lake, LakeError, content_id


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
    with pytest.raises(LakeError, match="available: abc1"):
        lake.resolve_version("datasets/d", "zzz")
    assert lake.resolve_version("datasets/d", "abc") == "abc1"


def test_content_id_is_stable_and_order_free():
    assert content_id({"a": 1, "b": [1, 2]}) == content_id({"b": [1, 2], "a": 1})
    assert content_id({"a": 1}) != content_id({"a": 2})
