"""cluster.yaml and the KubeRay manifests: valid, locked down, and in step with each other.

cluster.yaml (Ray cluster launcher, AWS), k8s/rayjob-pipeline.yaml and k8s/rayservice.yaml
describe the same cluster three times; these checks keep images, node sizes, environment and
the lake equal across them, and none of them starts Ray or reaches a cloud.
"""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.config import load_config
from app.store.registry import registry_name

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ["k8s/rayjob-pipeline.yaml", "k8s/rayservice.yaml"]
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
SHARED_ENV = ("RAY_AUTH_MODE", "SCALEREC_LAKE")
"""Environment that cluster.yaml gives every node and the manifests every Ray container."""


def _yaml(path: str) -> Any:
    return yaml.safe_load((ROOT / path).read_text())


def _pin(package: str) -> str:
    """The ``==`` version pyproject.toml pins ``package`` to (``ray[...]`` included)."""
    found = re.search(rf'"{package}(\[[^\]]*\])?==([^";]+)"', (ROOT / "pyproject.toml").read_text())
    assert found, f"pyproject.toml pins no {package}"
    return found.group(2)


def _docker_env(options: list[str]) -> dict[str, str]:
    """``--env K=V`` / ``-e K=V`` pairs of docker run options."""
    tokens = shlex.split(" ".join(options))
    pairs = [tokens[i + 1] for i, flag in enumerate(tokens[:-1]) if flag in ("--env", "-e")]
    pairs += [t.split("=", 1)[1] for t in tokens if t.startswith("--env=")]
    return dict(p.split("=", 1) for p in pairs)


def _node_env(cluster: dict[str, Any], node_type: str) -> dict[str, str]:
    """The container environment a node of ``node_type`` starts with (later options win)."""
    docker = cluster["docker"]
    options = list(docker.get("run_options", []))
    if node_type == cluster["head_node_type"]:
        options += docker.get("head_run_options", [])
    else:
        options += docker.get("worker_run_options", [])
        own = cluster["available_node_types"][node_type].get("docker", {})
        options += own.get("worker_run_options", [])
    return _docker_env(options)


def _image(cluster: dict[str, Any], node_type: str) -> str:
    docker = cluster["docker"]
    if node_type == cluster["head_node_type"]:
        return docker.get("head_image") or docker["image"]
    own = cluster["available_node_types"][node_type].get("docker", {})
    return own.get("worker_image") or docker.get("worker_image") or docker["image"]


def _quantity(value: Any) -> float:
    """A Kubernetes quantity (``3``, ``500m``, ``26Gi``) as a number."""
    text = str(value)
    for suffix, factor in (("Ki", 2**10), ("Mi", 2**20), ("Gi", 2**30), ("Ti", 2**40)):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    if text.endswith("m"):
        return float(text[:-1]) / 1000
    return float(text)


def _ray_cluster_spec(manifest: dict[str, Any]) -> dict[str, Any]:
    spec = manifest["spec"]
    return spec["rayClusterSpec"] if manifest["kind"] == "RayJob" else spec["rayClusterConfig"]


def _groups(manifest: dict[str, Any], head_type: str) -> dict[str, dict[str, Any]]:
    """cluster.yaml node-type name -> the manifest's group (the head under ``head_type``)."""
    spec = _ray_cluster_spec(manifest)
    return {head_type: spec["headGroupSpec"]} | {
        g["groupName"]: g for g in spec.get("workerGroupSpecs", [])
    }


def _ray_container(group: dict[str, Any]) -> dict[str, Any]:
    return group["template"]["spec"]["containers"][0]  # KubeRay's Ray container comes first


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


@pytest.fixture(scope="module")
def cluster() -> dict[str, Any]:
    return _yaml("cluster.yaml")


@pytest.fixture(scope="module")
def production() -> dict[str, Any]:
    return _yaml("serve_configs/production.yaml")


@pytest.fixture(scope="module", params=MANIFESTS)
def manifest(request: pytest.FixtureRequest) -> dict[str, Any]:
    return _yaml(request.param)


# cluster.yaml


def test_cluster_yaml_passes_rays_own_schema(cluster):
    from ray.autoscaler._private.util import prepare_config, validate_config

    # What `ray up` checks before it launches anything. For the aws provider prepare_config
    # only merges Ray's bundled aws defaults (a YAML file) and fills per-type worker limits;
    # the steps that call boto3 (key pairs, subnets, IAM) come later in `ray up`, so this
    # runs offline, without credentials.
    validate_config(prepare_config(copy.deepcopy(cluster)))


def test_head_runs_no_tasks_and_gpus_scale_from_zero(cluster):
    types = cluster["available_node_types"]
    assert types[cluster["head_node_type"]]["resources"]["CPU"] == 0
    gpu = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu and all(t["min_workers"] == 0 < t["max_workers"] for t in gpu)
    assert all(t["docker"]["worker_image"].endswith("-gpu") for t in gpu)


def test_dashboard_listens_on_the_private_address_only(cluster):
    start = " ".join(cluster["head_start_ray_commands"])
    hosts = re.findall(r"--dashboard-host[= ](\$\([^)]*\)|\"[^\"]*\"|'[^']*'|\S+)", start)
    assert hosts, "pin --dashboard-host to the private address"
    assert all(h.strip("\"'") not in ("", "0.0.0.0", "::", "[::]") for h in hosts), hosts


def test_every_node_gets_token_auth_and_an_s3_lake(cluster):
    for name in cluster["available_node_types"]:
        env = _node_env(cluster, name)
        assert env["RAY_AUTH_MODE"] == "token", name
        assert env["SCALEREC_LAKE"].startswith("s3://"), name
    # the token `ray get-auth-token --generate` writes, on every node
    assert cluster["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


def test_nodes_install_the_mounted_tree_with_pyprojects_torch(cluster):
    assert cluster["file_mounts"]["~/scalerec"] == "."
    torch = f"torch=={_pin('torch')}"
    cpu, gpu = cluster["setup_commands"], cluster["available_node_types"]["gpu-worker"]
    for commands, index in ((cpu, True), (gpu["worker_setup_commands"], False)):
        text = " ".join(commands)
        assert torch in text and (CPU_INDEX in text) == index
        assert commands[-1].endswith("pip install -q -e ~/scalerec")


# the KubeRay manifests


def test_rayservice_embeds_production_yaml(production):
    from ray.serve.schema import ServeDeploySchema

    embedded = yaml.safe_load(_yaml("k8s/rayservice.yaml")["spec"]["serveConfigV2"])
    assert embedded == production
    ServeDeploySchema.model_validate(embedded)


def test_rayjob_runs_the_pipeline_into_what_the_service_serves(production, monkeypatch):
    job = _yaml("k8s/rayjob-pipeline.yaml")["spec"]
    argv = shlex.split(job["entrypoint"])
    assert argv[:3] == ["python", "-m", "jobs.pipeline"]
    config = argv[argv.index("--config") + 1]
    assert (ROOT / config).is_file(), config
    overrides = [a for a in argv[3:] if a not in ("--config", config)]
    monkeypatch.chdir(ROOT)  # the job runs in the working tree that runtimeEnvYAML ships
    cfg = load_config(ROOT / config, overrides)
    app = production["applications"][0]["args"]
    assert cfg.lake == app["lake"]
    assert registry_name(cfg.data.name, cfg.model.name) == app["name"]
    assert cfg.serve.after_pipeline == "sample"  # the step that promotes, and returns
    env = _env(_ray_container(job["rayClusterSpec"]["headGroupSpec"]))
    assert yaml.safe_load(job["runtimeEnvYAML"])["working_dir"] == env["SCALEREC_CODE"]["value"]


def test_manifests_turn_token_auth_on_and_keep_the_head_free(manifest):
    spec = _ray_cluster_spec(manifest)
    assert spec["rayVersion"] == _pin("ray")
    auth = spec["authOptions"]
    assert auth["mode"] == "token"
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    for name, group in _groups(manifest, "head").items():
        env = _env(_ray_container(group))
        assert env["RAY_AUTH_MODE"]["value"] == "token", name
        ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": auth["secretName"], "key": "auth_token"}, name


def test_serving_secrets_come_from_secret_refs(manifest, production):
    args = production["applications"][0]["args"]
    for name, group in _groups(manifest, "head").items():
        env = _env(_ray_container(group))
        for var in (args["admin_token_env"], args["auth"]["keys_env"]):
            assert "value" not in env[var] and env[var]["valueFrom"]["secretKeyRef"], (name, var)


def test_manifests_match_cluster_yaml(manifest, cluster, production):
    types = cluster["available_node_types"]
    torch = f"torch=={_pin('torch')}"
    for name, group in _groups(manifest, cluster["head_node_type"]).items():
        node_type, container = types[name], _ray_container(group)
        image = _image(cluster, name)
        assert container["image"] == image, name
        assert image.startswith(f"rayproject/ray:{_pin('ray')}-py311-"), image
        limits = container["resources"]["limits"]
        ray_cpus = group["rayStartParams"].get("num-cpus", limits["cpu"])
        assert _quantity(ray_cpus) == node_type["resources"]["CPU"], name
        assert _quantity(limits["memory"]) == node_type["resources"]["memory"], name
        assert _quantity(limits.get("nvidia.com/gpu", 0)) == node_type["resources"].get("GPU", 0)
        env, node_env = _env(container), _node_env(cluster, name)
        for var in SHARED_ENV:
            assert env[var]["value"] == node_env[var], (name, var)
        # the lake the pipeline writes is the one the service reads
        assert node_env["SCALEREC_LAKE"] == production["applications"][0]["args"]["lake"]
        install = " ".join(container["args"])
        assert torch in install and (CPU_INDEX in install) == ("GPU" not in node_type["resources"])
