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
        args = {"lake": serve_lake.lake.uri, "name": serve_lake.name, "colocate_scoring": colocate}
        app = call_user_app_builder_with_args_if_necessary(builder, args)
        assert isinstance(app, Application)
    with pytest.raises(Exception, match="max_k"):
        call_user_app_builder_with_args_if_necessary(
            builder, {"lake": serve_lake.lake.uri, "max_k": 0}
        )
    assert ray.is_initialized() == ray_was_up, "building the app started Ray"
