"""Tests for app.store.usage: who uses a model version, refused and forced deletion, heartbeats,
and the ``jobs.registry`` command line."""

from __future__ import annotations

import logging
import posixpath
import re
import time

import pytest

import app.store.usage as usage_mod
from app.config import AppConfig, ModelArgs
from app.models import build_model
from app.serve.store import ServingPointer
from app.store import (
    LIVE_S,
    MANIFEST,
    DatasetVersion,
    Heartbeat,
    Lake,
    RegistryError,
    VersionInUse,
    aliases,
    delete_version,
    deletions,
    heartbeat_rel,
    list_versions,
    models_root,
    pointer_rel,
    promote,
    register,
    resolve,
    usage_table,
    users,
    users_by_version,
    write_heartbeat,
)
from jobs import registry as registry_job

NAME = "tiny-mf"
S3_NAME = "usage-s3-mf"
APP = "scalerec"


@pytest.fixture
def versions(tmp_lake: Lake, tiny_dataset: DatasetVersion) -> list[str]:
    """Three registered MF versions of ``tiny-mf``: production, staging and an unused one."""
    cfg = AppConfig.model_validate({"lake": tmp_lake.uri, "model": {"name": "mf", "embed_dim": 4}})
    found = []
    for seed in range(3):
        model = build_model(
            ModelArgs(name="mf", embed_dim=4), tiny_dataset.n_users, tiny_dataset.n_items, seed=seed
        )
        rec = register(tmp_lake, NAME, model, cfg, tiny_dataset, {"valid_ndcg@10": 0.1})
        found.append(rec.version)
    promote(tmp_lake, NAME, found[0], "production")
    promote(tmp_lake, NAME, found[1], "staging")
    return found


def _folder(lake: Lake, version: str) -> str:
    return posixpath.join(models_root(NAME), version)


def _stale_heartbeat(lake: Lake, version: str, replica: str = "old") -> None:
    beat = {"version": version, "time": time.time() - LIVE_S - 1}
    lake.write_json(heartbeat_rel(NAME, APP, replica), beat)


def test_paths() -> None:
    assert pointer_rel(NAME, APP) == "serving/tiny-mf/scalerec.json"
    assert heartbeat_rel(NAME, APP, "abc") == "serving/tiny-mf/live/scalerec/abc.json"
    for bad in ("", "a/b", "..", ".hidden"):
        with pytest.raises(RegistryError):
            pointer_rel(NAME, bad)
        with pytest.raises(RegistryError):
            heartbeat_rel(NAME, APP, bad)


def test_unused_version_is_deleted_and_logged(tmp_lake: Lake, versions: list[str]) -> None:
    assert users(tmp_lake, NAME, versions[2]) == []
    entry = delete_version(tmp_lake, NAME, versions[2])
    assert list_versions(tmp_lake, NAME) == versions[:2]
    assert not tmp_lake.exists(_folder(tmp_lake, versions[2]))
    assert entry["version"] == versions[2] and entry["forced"] is False and entry["users"] == []
    assert deletions(tmp_lake, NAME) == [entry]
    # the others are untouched
    assert resolve(tmp_lake, NAME, "production") == versions[0]
    assert tmp_lake.is_published(_folder(tmp_lake, versions[1]))


def test_refused_by_alias(tmp_lake: Lake, versions: list[str]) -> None:
    with pytest.raises(VersionInUse) as info:
        delete_version(tmp_lake, NAME, versions[0])
    assert info.value.users == ["alias production"]
    msg = str(info.value)
    assert versions[0] in msg and "alias production" in msg and "force" in msg
    assert list_versions(tmp_lake, NAME) == versions  # nothing deleted
    assert deletions(tmp_lake, NAME) == []


def test_refused_by_serving_pointer(tmp_lake: Lake, versions: list[str]) -> None:
    # the pointer that POST /admin/reload writes, keyed by the application name
    pointer = ServingPointer(tmp_lake, NAME, APP)
    assert pointer.rel == pointer_rel(NAME, APP)
    pointer.write(versions[2], previous=versions[0], ref=versions[2])
    with pytest.raises(VersionInUse, match=f"serving pointer of app {APP}"):
        delete_version(tmp_lake, NAME, versions[2])
    assert ServingPointer(tmp_lake, NAME, APP).read() == versions[2]  # a rebuilt app finds it
    pointer.write(versions[0])  # reloaded elsewhere: the version is free again
    delete_version(tmp_lake, NAME, versions[2])
    assert versions[2] not in list_versions(tmp_lake, NAME)


def test_refused_by_fresh_heartbeat(tmp_lake: Lake, versions: list[str]) -> None:
    write_heartbeat(tmp_lake, NAME, APP, "abc", versions[2])
    with pytest.raises(VersionInUse) as info:
        delete_version(tmp_lake, NAME, versions[2])
    assert len(info.value.users) == 1
    assert re.fullmatch(rf"live app {APP} \(replica abc, \d+ s ago\)", info.value.users[0])
    assert tmp_lake.is_published(_folder(tmp_lake, versions[2]))


def test_stale_heartbeat_does_not_block(tmp_lake: Lake, versions: list[str]) -> None:
    _stale_heartbeat(tmp_lake, versions[2])
    assert users(tmp_lake, NAME, versions[2]) == []
    assert users(tmp_lake, NAME, versions[2], live_s=LIVE_S * 10) != []
    delete_version(tmp_lake, NAME, versions[2])
    assert versions[2] not in list_versions(tmp_lake, NAME)


def test_message_names_every_user(tmp_lake: Lake, versions: list[str]) -> None:
    ServingPointer(tmp_lake, NAME, APP).write(versions[0])
    ServingPointer(tmp_lake, NAME, "canary").write(versions[1])  # another version: not named
    write_heartbeat(tmp_lake, NAME, APP, "r1", versions[0])
    write_heartbeat(tmp_lake, NAME, APP, "r2", versions[0])
    _stale_heartbeat(tmp_lake, versions[0])
    found = users(tmp_lake, NAME, versions[0])
    assert [u.split(" (")[0] for u in found] == [
        "alias production",
        f"serving pointer of app {APP}",
        f"live app {APP}",
        f"live app {APP}",
    ]
    with pytest.raises(VersionInUse) as info:
        delete_version(tmp_lake, NAME, versions[0])
    msg = str(info.value)
    assert all(u in msg for u in found)
    assert "replica r1" in msg and "replica r2" in msg and "replica old" not in msg
    assert "canary" not in msg
    assert "POST /admin/reload" in msg and "promote" in msg and "stop" in msg


def test_force_deletes_and_logs(tmp_lake: Lake, versions: list[str]) -> None:
    ServingPointer(tmp_lake, NAME, APP).write(versions[0])
    expected = ["alias production", f"serving pointer of app {APP}"]
    entry = delete_version(tmp_lake, NAME, versions[0], force=True)
    assert entry["forced"] is True and entry["users"] == expected
    assert deletions(tmp_lake, NAME) == [entry]
    assert list_versions(tmp_lake, NAME) == versions[1:]
    assert not tmp_lake.exists(_folder(tmp_lake, versions[0]))
    # the alias still names it: resolving says so instead of loading missing files
    assert aliases(tmp_lake, NAME)["production"] == versions[0]
    with pytest.raises(RegistryError, match="not published"):
        resolve(tmp_lake, NAME, "production")


def test_unknown_version(tmp_lake: Lake, versions: list[str]) -> None:
    with pytest.raises(RegistryError) as info:
        delete_version(tmp_lake, NAME, "20990101T000000-deadbeef")
    msg = str(info.value)
    assert "20990101T000000-deadbeef" in msg and "jobs.registry list" in msg
    assert tmp_lake.uri not in msg and versions[0] not in msg  # names no storage or history
    assert not isinstance(info.value, VersionInUse)
    with pytest.raises(RegistryError):  # an exact id only: no prefix, alias or latest
        delete_version(tmp_lake, NAME, versions[2][:10])
    for ref in ("latest", "staging", "..", "a/b", ""):
        with pytest.raises(RegistryError):
            delete_version(tmp_lake, NAME, ref)
    assert list_versions(tmp_lake, NAME) == versions


def test_unpublished_leftover_needs_force(tmp_lake: Lake, versions: list[str]) -> None:
    # a deletion interrupted after the manifest went
    tmp_lake.remove(posixpath.join(_folder(tmp_lake, versions[2]), MANIFEST))
    with pytest.raises(RegistryError, match="no manifest"):
        delete_version(tmp_lake, NAME, versions[2])
    entry = delete_version(tmp_lake, NAME, versions[2], force=True)
    assert entry["forced"] is True
    assert not tmp_lake.exists(_folder(tmp_lake, versions[2]))


def test_unreadable_pointer_blocks_every_version(tmp_lake: Lake, versions: list[str]) -> None:
    tmp_lake.write_bytes(pointer_rel(NAME, "broken"), b"{not json")
    with pytest.raises(VersionInUse, match="unreadable serving pointer of app broken"):
        delete_version(tmp_lake, NAME, versions[2])


def test_usage_table(tmp_lake: Lake, versions: list[str]) -> None:
    ServingPointer(tmp_lake, NAME, APP).write(versions[1])
    write_heartbeat(tmp_lake, NAME, APP, "r1", versions[1])
    delete_version(tmp_lake, NAME, versions[2])
    ServingPointer(tmp_lake, NAME, "old-app").write(versions[2])  # names a deleted version
    by_version = users_by_version(tmp_lake, NAME)
    assert by_version[versions[0]] == ["alias production"]
    assert by_version[versions[2]] == ["serving pointer of app old-app"]
    lines = usage_table(tmp_lake, NAME).splitlines()
    assert lines[0].split() == ["version", "created_at", "aliases", "used", "by"]
    assert lines[1].startswith(versions[0]) and "production" in lines[1] and lines[1].endswith("-")
    assert "staging" in lines[2] and f"serving pointer of app {APP}; live app {APP}" in lines[2]
    assert lines[3].startswith(versions[2]) and "(not published)" in lines[3]
    assert len(lines) == 4


# --- the replica heartbeat ---
def test_heartbeat_writes_beats_and_stops(tmp_lake: Lake, versions: list[str]) -> None:
    served = [versions[0]]
    beat = Heartbeat(tmp_lake, NAME, APP, "r1", lambda: served[0], every_s=60.0)
    beat.start()  # written before start returns
    try:
        assert tmp_lake.read_json(beat.rel)["version"] == versions[0]
        served[0] = versions[1]
        beat.beat()  # a version switch: written by the thread at once, not after 60 s
        deadline = time.monotonic() + 10
        while tmp_lake.read_json(beat.rel)["version"] != versions[1]:
            assert time.monotonic() < deadline, "heartbeat not rewritten after beat()"
            time.sleep(0.02)
        assert users(tmp_lake, NAME, versions[1])[-1].startswith(f"live app {APP} (replica r1")
    finally:
        beat.stop()
    assert not tmp_lake.exists(beat.rel)  # a stopped replica uses nothing
    assert not beat._thread.is_alive()
    assert users(tmp_lake, NAME, versions[1]) == ["alias staging"]


def test_heartbeat_failure_logged_once_per_streak(
    tmp_lake: Lake, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    failing = [True]

    def flaky(*args: object) -> None:
        if failing[0]:
            raise OSError("lake unreachable")

    monkeypatch.setattr(usage_mod, "write_heartbeat", flaky)
    beat = Heartbeat(tmp_lake, NAME, APP, "r1", lambda: "v1")
    with caplog.at_level(logging.INFO, logger="app.store.usage"):
        assert [beat.write() for _ in range(3)] == [False, False, False]
        failing[0] = False
        assert beat.write() and beat.write()
        failing[0] = True
        assert not beat.write()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and "lake unreachable" in warnings[0].getMessage()
    assert sum("written again" in r.getMessage() for r in caplog.records) == 1


# --- S3 lake through moto (fixture in conftest.py) ---
def test_s3_delete_and_refusal(s3_lake: Lake) -> None:
    # moto keeps its buckets for the whole process: a name no other S3 test uses
    for version in ("v1", "v2"):
        rel = posixpath.join(models_root(S3_NAME), version)

        def write(stage: str) -> None:
            s3_lake.fs.pipe_file(posixpath.join(stage, "weights.pt"), b"w")

        s3_lake.publish(rel, write, {"name": S3_NAME, "version": version})
    write_heartbeat(s3_lake, S3_NAME, APP, "r1", "v1")
    with pytest.raises(VersionInUse, match=f"live app {APP}"):
        delete_version(s3_lake, S3_NAME, "v1")
    delete_version(s3_lake, S3_NAME, "v2")
    assert list_versions(s3_lake, S3_NAME) == ["v1"]
    assert not s3_lake.exists(posixpath.join(models_root(S3_NAME), "v2", "weights.pt"))
    assert [d["version"] for d in deletions(s3_lake, S3_NAME)] == ["v2"]


# --- the jobs.registry entry point ---
def test_cli_list_and_delete(
    tmp_lake: Lake, versions: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["--lake", tmp_lake.uri, "--name", NAME]
    write_heartbeat(tmp_lake, NAME, APP, "r1", versions[1])
    assert registry_job.main(["list", *base]) == 0
    out = capsys.readouterr().out
    assert all(v in out for v in versions) and "production" in out and f"live app {APP}" in out

    assert registry_job.main(["delete", *base, "--version", versions[1]]) == 1
    err = capsys.readouterr().err
    assert "refusing to delete" in err and "alias staging" in err and f"live app {APP}" in err
    assert versions[1] in list_versions(tmp_lake, NAME)

    assert registry_job.main(["delete", *base, "--version", versions[2]]) == 0
    assert f"deleted {NAME} {versions[2]}" in capsys.readouterr().out
    assert registry_job.main(["delete", *base, "--version", versions[2]]) == 2
    assert "no published version" in capsys.readouterr().err

    assert registry_job.main(["delete", *base, "--version", versions[1], "--force"]) == 0
    assert "(forced)" in capsys.readouterr().out
    assert list_versions(tmp_lake, NAME) == versions[:1]

    with pytest.raises(SystemExit) as info:
        registry_job.main(["delete", *base])  # no --version
    assert info.value.code == 2
