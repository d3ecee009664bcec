"""Serve settings: the Serve configs validate, and their sources apply in one order."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from app.config import ConfigError, ServeArgs
from app.serve import load_serve_config, pipeline_serve_config, resolve_settings
from app.store import Lake

ROOT = Path(__file__).resolve().parents[3]
NICE_0 = {"RAY_worker_niceness": "0"}


@pytest.mark.parametrize("path", ["serve_configs/local.yaml", "serve_configs/production.yaml"])
def test_serve_configs_validate(path: str) -> None:
    run = load_serve_config(ROOT / path, ["model=staging", "cache_size=0"])
    assert run.args.model == "staging" and run.args.cache_size == 0
    # A colocated app is one deployment; the graph has all three.
    expected = {"Ingress"} if run.args.colocate_scoring else {"Ingress", "Retriever", "Ranker"}
    assert set(run.deployments) == expected
    for name in sorted(expected - {"Ranker"}):
        options = run.deployments[name]
        auto = options.get("autoscaling_config")
        if auto is None:  # one machine: a fixed replica count
            assert options["num_replicas"] >= 1
        else:
            assert auto["min_replicas"] <= auto["max_replicas"]
            assert options["max_ongoing_requests"] > auto["target_ongoing_requests"]
    ingress = run.deployments["Ingress"]  # overload: a bounded queue, then 503 + Retry-After
    assert ingress["max_queued_requests"] >= 1
    assert ingress["backpressure_config"]["status_code"] == 503
    assert ingress["backpressure_config"]["retry_after_s"] >= 1
    assert run.http_options["request_timeout_s"] > 0
    for options in run.deployments.values():  # serving at normal CPU priority
        env = options["ray_actor_options"]["runtime_env"]["env_vars"]
        assert env.get("RAY_worker_niceness") == NICE_0["RAY_worker_niceness"]


def test_overrides_beat_http_options_beat_args() -> None:
    args = {"host": "10.0.0.1", "port": 9000, "cache_size": 5}
    app_args, http = resolve_settings(args, {"host": "0.0.0.0"})
    assert http == {"host": "0.0.0.0", "port": 9000}  # http_options, else the args
    assert (app_args.host, app_args.port, app_args.cache_size) == ("10.0.0.1", 9000, 5)
    app_args, http = resolve_settings(args, {"host": "0.0.0.0"}, [("args.host", "::1")])
    assert http["host"] == "::1" and app_args.host == "::1"
    app_args, http = resolve_settings({}, {}, [("port", "8123"), ("cache_size", 0)])
    assert http == {"host": "127.0.0.1", "port": 8123} and app_args.cache_size == 0


def _serve_config(tmp_path: Path, args: dict) -> str:
    path = tmp_path / "serve.yaml"
    app = {"name": "scalerec", "import_path": "app.serve.deploy:build_app", "args": args}
    doc = {"http_options": {"host": "0.0.0.0", "port": 8000}, "applications": [app]}
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def test_pipeline_run_overrides_lake_model_and_its_serve_keys(tmp_path: Path) -> None:
    path = _serve_config(tmp_path, {"lake": "/srv/lake", "default_k": 7, "cache_size": 50})
    serve = ServeArgs(config=path, host="127.0.0.1", port=8111, cache_size=0, default_k=3)
    run = pipeline_serve_config(serve, str(tmp_path / "lake"), "tiny-mf", "v1")
    assert (run.args.lake, run.args.name, run.args.model) == (
        str(tmp_path / "lake"),
        "tiny-mf",
        "v1",
    )
    assert run.args.cache_size == 0 and run.http_options == {"host": "127.0.0.1", "port": 8111}
    assert run.args.default_k == 7  # other keys of the pipeline's section leave the file alone
    assert run.url == "http://127.0.0.1:8111"
    lake = Lake(str(tmp_path / "lake"))
    assert pipeline_serve_config(serve, lake, "tiny-mf", "v1").args.lake == lake.uri


def test_invalid_args_name_the_file(tmp_path: Path) -> None:
    path = _serve_config(tmp_path, {"lake": "/srv/lake", "max_k": 0})
    with pytest.raises(ConfigError, match="invalid args"):
        load_serve_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_serve_config(tmp_path / "missing.yaml")


def test_local_yaml_starts_the_fast_path_with_the_installed_launcher() -> None:
    run = load_serve_config(ROOT / "serve_configs/local.yaml")
    env = run.controller_options["runtime_env"]["env_vars"]
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    assert env["RAY_SERVE_HAPROXY_BINARY_PATH"].endswith("scalerec-haproxy")
    assert run.proxy_location == "HeadOnly" and run.http_options["host"] == "127.0.0.1"
