"""The closed loop: events posted to the running app reach the next dataset version and model.

Real local Ray cluster: ingest a small synthetic dataset, train and serve it, post events over
HTTP (one batch twice, as a client retry), then ``data.source=events`` ingests them into a new
version (each once, the manifest's counts adding up) that a training run then uses.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import requests
from serving import NO_AUTH, free_port, wait_healthy

from app import ingest, train
from app.config import load_config
from app.serve import ServeAppArgs, build_application
from app.store import SPLITS, Lake, list_datasets, load_dataset, promote, registry_name

ROOT = Path(__file__).resolve().parents[2]
APP = "scalerec-closed-loop"
pytestmark = pytest.mark.slow


def _cfg(lake: Path, *extra: str):
    small = [
        f"lake={lake}",
        "data.synthetic.n_users=150",
        "data.synthetic.n_items=80",
        "data.synthetic.n_interactions=3000",
        "train.num_workers=1",
        "train.epochs=2",
        *extra,
    ]
    return load_config(ROOT / "jobs/configs/synthetic.yaml", small)


def _pairs(ds) -> Counter:
    t = ds.read_table(*SPLITS)
    users, items = ds.users()["user_id"], ds.items()["item_id"]
    return Counter(
        zip(
            users.take(t["user_idx"]).to_pylist(),
            items.take(t["item_idx"]).to_pylist(),
            strict=True,
        )
    )


def test_posted_events_reach_the_next_version(ray_cluster: None, tmp_path: Path) -> None:
    from ray import serve

    cfg = _cfg(tmp_path / "lake")
    lake = Lake(cfg.lake)
    first = ingest.run(cfg.data, lake, seed=cfg.seed, events=cfg.serve.events)
    record = train.run(cfg, first)
    name = registry_name(cfg.data.name, cfg.model.name)
    promote(lake, name, record.version, "production")

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    url = f"http://127.0.0.1:{port}"
    args = ServeAppArgs(
        auth=NO_AUTH, lake=lake.uri, name=name, model="production", colocate_scoring=True
    )
    serve.run(
        build_application(args, {"Ingress": {"ray_actor_options": {"num_cpus": 0.25}}}),
        name=APP,
        route_prefix="/",
        blocking=False,
    )
    items = first.items()["item_id"].to_pylist()
    seen = _pairs(first)
    fresh = [(f"loop-u{k % 3}", items[k]) for k in range(9)]  # new users: no pair is old
    try:
        wait_healthy(url)
        batch = {"events": [{"user_id": u, "item_id": i, "event": "click"} for u, i in fresh]}
        for attempt in range(2):  # the second is a retry after a lost answer
            r = requests.post(f"{url}/events", json=batch, timeout=30)
            assert r.status_code == 202, r.text
            assert r.json()["duplicates"] == (0 if attempt == 0 else len(fresh))
    finally:
        serve.delete(APP)
        serve.shutdown()

    loop_cfg = _cfg(tmp_path / "lake", "data.source=events")
    second = ingest.run(loop_cfg.data, lake, seed=cfg.seed, events=loop_cfg.serve.events)
    m, m1 = second.manifest, first.manifest
    assert second.version != first.version
    assert m["events_read"] == len(fresh) and m["events_ingested"] == len(fresh)
    assert m["rows_read"] == m["rows_ingested"] + m["rows_quarantined"] + m["duplicates_collapsed"]
    assert m["rows_ingested"] == m1["rows_ingested"] + len(fresh)
    pairs = _pairs(second)
    assert pairs - seen == Counter(fresh)  # each posted event once, nothing else new
    assert not seen - pairs  # nothing of the previous version lost

    # nothing new: the same version again; then training learns from the new version
    again = ingest.run(loop_cfg.data, lake, seed=cfg.seed, events=loop_cfg.serve.events)
    assert again.version == second.version
    assert len(list_datasets(lake, cfg.data.name)) == 2
    trained = train.run(loop_cfg, load_dataset(lake, cfg.data.name, second.version))
    assert trained.lineage["dataset"]["version"] == second.version
