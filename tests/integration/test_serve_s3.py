"""Serving from a lake on S3 (a moto server on 127.0.0.1): reloads and events across polls.

On a remote lake a replica polls the serving pointer and the event log from a worker thread
(app/serve/ingress.py), never on the event loop; this checks that what it polls still
reaches the answers: a reload switches the served version, posted events reach the user's
next answer.
"""

from __future__ import annotations

import os
import time

import requests
from serving import NO_AUTH, start_fast_serve, wait_healthy

from app.serve import ServeAppArgs, build_application

TOKEN_ENV = "SCALEREC_TEST_S3_ADMIN_TOKEN"
TOKEN = "s3-test-token"
APP = "scalerec-s3"
TIMEOUT = 30


def _until(check, what: str, timeout_s: float = 30.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s} s"
        time.sleep(0.3)


def test_reload_and_events_on_an_s3_lake(ray_cluster, serve_lake, s3_bucket) -> None:
    import fsspec
    from ray import serve

    fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]})
    fs.put(serve_lake.lake.path(), f"{s3_bucket}/lake", recursive=True)
    production, staging = serve_lake.versions
    os.environ[TOKEN_ENV] = TOKEN
    # The cluster started before the bucket existed: hand the replica the S3 settings.
    aws = {k: os.environ[k] for k in os.environ if k.startswith("AWS_")}
    url = start_fast_serve()
    args = ServeAppArgs(
        auth=NO_AUTH,
        lake=f"s3://{s3_bucket}/lake",
        name=serve_lake.name,
        model="production",
        admin_token_env=TOKEN_ENV,
        pointer_poll_s=0.2,
        cache_size=0,
        colocate_scoring=True,  # one deployment, as serve_configs/local.yaml
    )
    options = {
        "ray_actor_options": {
            "num_cpus": 0.25,
            "runtime_env": {"env_vars": {**aws, TOKEN_ENV: TOKEN}},
        }
    }
    app = build_application(args, {"Ingress": options})
    serve.run(app, name=APP, route_prefix="/", blocking=False)
    try:
        wait_healthy(url, timeout=120)
        health = requests.get(f"{url}/healthz", timeout=TIMEOUT).json()
        assert health["model_version"] == production
        r = requests.post(
            f"{url}/admin/reload",
            json={"model": "staging"},
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=TIMEOUT,
        )
        assert r.status_code == 200, r.text
        _until(
            lambda: (
                requests.get(f"{url}/healthz", timeout=TIMEOUT).json()["model_version"] == staging
            ),
            "the reload",
        )
        assert fs.exists(f"{s3_bucket}/lake/serving/{serve_lake.name}/{APP}.json")

        event = {"user_id": "u1", "item_id": "i3", "event": "click", "timestamp": time.time()}
        r = requests.post(f"{url}/events", json={"events": [event]}, timeout=TIMEOUT)
        assert r.status_code == 202, r.text
        assert r.json()["accepted"] == 1
        answer = _until(
            lambda: (
                (a := requests.get(f"{url}/recommend/u1", params={"k": 5}, timeout=TIMEOUT).json())[
                    "history_version"
                ]
                >= 1
                and a
            ),
            "the event in the next answer",
        )
        assert "i3" not in [x["item_id"] for x in answer["items"]]
        assert answer["model_version"] == staging
    finally:
        serve.delete(APP)
        serve.shutdown()
