"""The README's launch paths against a Ray cluster the tests did not embed: a ``ray start``
head on loopback with token auth, ``ray job submit`` (CLI) and ``JobSubmissionClient`` (SDK)
with ``--working-dir .``, an absolute and an ``s3://`` lake, then ``serve deploy`` of
serve_configs/local.yaml on the same cluster answering ``/recommend``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml
from ray_nodes import BIN, ROOT, LocalCluster, local_cluster
from serving import free_port, wait_healthy

from app.serve.store import load_catalogue
from app.store import Lake, get_record

pytestmark = pytest.mark.slow
STAGES = ("jobs.ingest", "jobs.train", "jobs.evaluate")

TINY = [
    "--config",
    "jobs/configs/synthetic.yaml",
    "data.synthetic.n_users=200",
    "data.synthetic.n_items=120",
    "data.synthetic.n_interactions=4000",
    "data.synthetic.n_files=1",
    "train.epochs=3",
]


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with local_cluster(head_cpus=4) as c:
        yield c


def ray_cli(cluster: LocalCluster, *args: str, timeout: float = 600) -> str:
    out = subprocess.run(
        [str(BIN / args[0]), *args[1:]],
        cwd=ROOT,
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.returncode == 0, (
        f"{' '.join(args[:3])} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    )
    return out.stdout + out.stderr


def test_a_client_without_the_token_is_refused(cluster: LocalCluster) -> None:
    env = {k: v for k, v in cluster.env.items() if not k.startswith("RAY_AUTH")}
    out = subprocess.run(
        [str(BIN / "ray"), "job", "list", "--address", cluster.dashboard],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0
    assert "token" in (out.stdout + out.stderr).lower()


@pytest.fixture(scope="module")
def submitted(cluster: LocalCluster, tmp_path_factory) -> tuple[Path, str]:
    """``ray job submit`` of the whole pipeline (no serving) on an absolute lake: (lake, log)."""
    lake = tmp_path_factory.mktemp("submitted") / "lake"
    log = ray_cli(
        cluster,
        *("ray", "job", "submit", "--address", cluster.dashboard, "--working-dir", "."),
        *("--", "python", "-m", "jobs.pipeline", *TINY, f"lake={lake}"),
        "serve.after_pipeline=skip",
    )
    return lake, log


def test_cli_submit_runs_the_pipeline_on_an_absolute_lake(submitted) -> None:
    lake, log = submitted
    assert "succeeded" in log.lower(), log[-2000:]
    assert "test metrics, full ranking" in log
    record = get_record(Lake(str(lake)), "synthetic-mf", "latest")
    assert record.metrics["valid_ndcg@10"] > 0 and record.metrics["ndcg@10"] > 0
    assert record.lineage["dataset"]["name"] == "synthetic"


SDK_DRIVER = """
import json, sys, time
from ray.job_submission import JobSubmissionClient

address, lake, stages, env_vars = sys.argv[1], sys.argv[2], sys.argv[3:-1], json.loads(sys.argv[-1])
client = JobSubmissionClient(address)
for entrypoint in stages:
    job = client.submit_job(
        entrypoint=entrypoint.replace("LAKE", lake),
        runtime_env={"working_dir": ".", "env_vars": env_vars},
    )
    deadline = time.monotonic() + 600
    while (status := client.get_job_status(job)) and not status.is_terminal():
        assert time.monotonic() < deadline, f"{entrypoint}: still {status}"
        time.sleep(2)
    logs = client.get_job_logs(job)
    last = logs.strip().splitlines()[-1:]
    print(json.dumps({"status": status.value, "last": last, "tail": logs[-3000:]}))
"""


def test_sdk_submits_the_stages_on_an_s3_lake(cluster: LocalCluster, s3_bucket) -> None:
    # A separate driver, as a user's script would be: Ray reads RAY_AUTH_MODE at start-up.
    lake = f"s3://{s3_bucket}/lake"
    aws = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    stages = [" ".join(["python", "-m", s, *TINY, "lake=LAKE"]) for s in STAGES]
    out = subprocess.run(
        [sys.executable, "-c", SDK_DRIVER, cluster.dashboard, lake, *stages, json.dumps(aws)],
        cwd=ROOT,
        env={**cluster.env, **aws},
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    runs = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    failed = [r["tail"] for r in runs if r["status"] != "SUCCEEDED"]
    assert len(runs) == len(STAGES) and not failed, failed[:1]
    record = get_record(Lake(lake), "synthetic-mf", "latest")
    assert runs[1]["last"] == [record.version]  # jobs.train prints the version last
    assert record.metrics["ndcg@10"] > 0  # test metrics: written by the evaluate job


def test_serve_deploy_of_local_yaml_answers_recommend(
    cluster: LocalCluster, submitted, tmp_path
) -> None:
    lake, _ = submitted
    cfg = yaml.safe_load((ROOT / "serve_configs" / "local.yaml").read_text())
    port = free_port()
    cfg["http_options"]["port"] = port
    cfg["applications"][0]["args"].update(lake=str(lake), model="latest")
    path = tmp_path / "local.yaml"
    path.write_text(yaml.safe_dump(cfg))
    ray_cli(cluster, "serve", "deploy", str(path), "--address", cluster.dashboard)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_healthy(url, timeout=240)
        except TimeoutError:
            status = ray_cli(cluster, "serve", "status", "--address", cluster.dashboard)
            raise AssertionError(f"serve deploy did not answer on {url}:\n{status}") from None
        key = (lake / "demo_api_key").read_text().strip()  # made by the app's builder
        ds = get_record(Lake(str(lake)), "synthetic-mf", "latest").lineage["dataset"]
        user = next(iter(load_catalogue(Lake(str(lake)), ds["name"], ds["version"]).user_index))
        answer = requests.get(
            f"{url}/recommend/{user}?k=5", headers={"Authorization": f"Bearer {key}"}, timeout=30
        )
        assert answer.status_code == 200 and len(answer.json()["items"]) == 5, answer.text
        assert requests.get(f"{url}/recommend/{user}?k=5", timeout=30).status_code == 401
    finally:
        ray_cli(cluster, "serve", "shutdown", "-y", "--address", cluster.dashboard)
