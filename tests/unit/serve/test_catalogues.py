"""What a replica serves: versions and catalogues, and a start that survives a bad pointer."""

from __future__ import annotations

import logging
import shutil

from app.serve.store import Catalogues, ServingPointer
from app.store import Lake, models_root


def test_start_follows_the_pointer(serve_lake) -> None:
    cats = Catalogues(serve_lake.lake, serve_lake.name)
    production, staging = serve_lake.versions
    assert cats.load_at_start(staging, production).version == staging
    assert cats.load_at_start(None, production).version == production


def test_start_on_a_deleted_pointed_version_serves_the_configured_one(
    serve_lake, tmp_path, caplog
) -> None:
    # a copy of the lake, so the shared one keeps both versions
    lake_dir = tmp_path / "lake"
    shutil.copytree(serve_lake.lake.path(), lake_dir)
    lake = Lake(str(lake_dir))
    production, staging = serve_lake.versions
    shutil.rmtree(lake.path(models_root(serve_lake.name), staging))
    with caplog.at_level(logging.WARNING, logger="app.serve.store"):
        state = Catalogues(lake, serve_lake.name).load_at_start(staging, production)
    assert state.version == production
    assert f"names {staging}, which cannot be loaded" in caplog.text


def test_a_reload_survives_a_redeploy_of_the_same_config_but_not_a_new_one(tmp_lake) -> None:
    pointer = ServingPointer(tmp_lake, "m", "app")
    assert pointer.follow("v1") is None  # no reload yet: the config's version
    pointer.write("v2", configured="v1")  # /admin/reload while the config named v1
    again = ServingPointer(tmp_lake, "m", "app")  # a rebuild, a replica restart
    assert again.follow("v1") == "v2"
    moved = ServingPointer(tmp_lake, "m", "app")  # a deploy whose config names v3
    assert moved.follow("v3") == "v3"
    assert ServingPointer(tmp_lake, "m", "app").follow("v3") == "v3"  # and stays there
    assert ServingPointer(tmp_lake, "m", "other").follow("v1") is None  # keyed by app name
