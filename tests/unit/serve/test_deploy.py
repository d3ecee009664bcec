"""The application builder, as Serve imports and calls it from a config's ``import_path``.

Binding deployments builds the graph only: nothing here starts Ray or Serve.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize(
    "import_path",
    [
        *sorted(
            {
                yaml.safe_load(p.read_text())["applications"][0]["import_path"]
                for p in (ROOT / "serve_configs").glob("*.yaml")
            }
        ),
        "app.serve:build_app",
    ],
)
def test_typed_builder_from_import_path(serve_lake, import_path: str) -> None:
    import ray
    from ray.serve import Application
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve._private.utils import import_attr

    ray_was_up = ray.is_initialized()  # another test's session cluster may be running
    builder = import_attr(import_path)
    for colocate in (True, False):
        args = {
            "lake": serve_lake.lake.uri,
            "name": serve_lake.name,
            "colocate_scoring": colocate,
            "auth": {"required": False},
        }
        app = call_user_app_builder_with_args_if_necessary(builder, args)
        assert isinstance(app, Application)
    with pytest.raises(Exception, match="max_k"):
        call_user_app_builder_with_args_if_necessary(
            builder, {"lake": serve_lake.lake.uri, "max_k": 0}
        )
    assert ray.is_initialized() == ray_was_up, "building the app started Ray"


def test_builder_needs_a_key_when_auth_is_required(serve_lake, tmp_path, monkeypatch) -> None:
    from app.serve import ServeAppArgs, build_application
    from app.serve.auth import KeyFileError, add_key, hash_key

    monkeypatch.delenv("SCALEREC_API_KEYS", raising=False)
    base = {"lake": serve_lake.lake.uri, "name": serve_lake.name, "colocate_scoring": True}
    empty = tmp_path / "empty.yaml"
    empty.write_text("keys: []\n")
    with pytest.raises(KeyFileError, match="holds no API key: create one with"):
        build_application(ServeAppArgs(**base, auth={"key_file": str(empty)}))
    # a local lake's default key file: the builder makes the demo key rather than fail
    demo = build_application(ServeAppArgs(**base))
    assert [k.client for k in demo._bound_deployment.init_kwargs["keys"]] == ["demo"]
    named = tmp_path / "missing.yaml"
    with pytest.raises(KeyFileError, match="key file not found"):
        build_application(ServeAppArgs(**base, auth={"key_file": str(named)}))
    key = add_key(tmp_path / "keys.yaml", "shop", ["recommend:read"])
    app = build_application(ServeAppArgs(**base, auth={"key_file": str(tmp_path / "keys.yaml")}))
    # the ingress gets the hashes, never the key
    keys = app._bound_deployment.init_kwargs["keys"]
    assert [(k.client, k.sha256) for k in keys] == [("shop", hash_key(key))]
    assert key not in repr(app._bound_deployment.init_args)


def test_demo_key_is_created_once_and_only_for_a_local_default(serve_lake, tmp_path) -> None:
    import os
    import stat

    from app.serve import ServeAppArgs
    from app.serve.auth import hash_key, read_key_file
    from app.serve.deploy import ensure_demo_key

    lake = tmp_path / "lake"
    args = ServeAppArgs(lake=str(lake), name=serve_lake.name)
    key = ensure_demo_key(args)
    assert key is not None and key.startswith("sr_")
    assert ensure_demo_key(args) == key  # printed again by the next run, not a new one
    (entry,) = read_key_file(lake / "api_keys.yaml")
    assert entry.client == "demo" and entry.sha256 == hash_key(key)
    assert not entry.allows("admin") and entry.allows("events:write")
    saved = lake / "demo_api_key"
    assert stat.S_IMODE(os.stat(saved).st_mode) == 0o600
    assert key not in (lake / "api_keys.yaml").read_text()
    saved.write_text("sr_forgotten\n")  # a lost or stale saved key: a new demo key
    assert ensure_demo_key(args) not in (None, key, "sr_forgotten")
    assert ensure_demo_key(ServeAppArgs(lake=str(lake), auth={"required": False})) is None
    managed = ServeAppArgs(lake=str(lake), auth={"key_file": str(tmp_path / "k.yaml")})
    assert ensure_demo_key(managed) is None and not (tmp_path / "k.yaml").exists()
