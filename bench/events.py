"""Live events on both online-store backends: ack throughput and latency, freshness, memory.

For each backend (``embedded``: the log in the lake; ``redis``: a redis-server started here on
127.0.0.1 with AOF ``always``), one run on a fresh 2-CPU Ray cluster:

1. **Throughput**: ``concurrency`` clients post batches of ``batch`` events (unique
   ``event_id``, random users out of ``--users``) to ``serve_configs/local.yaml``'s app with two
   ingress replicas for ``--duration`` s; events/s acknowledged and p50/p99 ack latency.
2. **Baseline**: the same load on a plain FastAPI app in one uvicorn process that calls the
   same store's ``append`` (the single-process way to do the work): ``ratio`` = Serve / plain.
3. **Exactly once**: every acknowledged id is read back from the store's log
   (``read_since``): ``lost`` = acknowledged but absent, ``duplicated`` = present more than once
   in what a reader counts (sum of history versions minus distinct events).
4. **Freshness**: a single event for a new user, then ``GET /recommend/{user}`` until four
   answers in a row (spread over the replicas) carry the new history version.

Then, without HTTP, **memory**: one process applies ``--memory-events`` events from
``--users`` users to a store with ``history_cap`` 5 and reports its RSS at each quarter (flat
once the caps fill; for Redis the server's RSS too).

``python -m bench.events`` writes bench/results/events.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from bench.serve import N_ITEMS, config_run, free_port, make_lake, start_ray, wait_ready

RESULTS = Path(__file__).parent / "results" / "events.json"
DATASET = "bench"


def start_redis(folder: str) -> tuple[str, subprocess.Popen[bytes]]:
    """A redis-server on a free loopback port, AOF fsync on every write."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server not found: apt-get install redis-server")
    port = free_port()
    cmd = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", folder]
    cmd += ["--appendonly", "yes", "--appendfsync", "always", "--save", ""]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    import redis

    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.1)
    return f"redis://127.0.0.1:{port}/0", proc


def _batch(rng: np.random.Generator, n_users: int, size: int) -> list[dict[str, Any]]:
    users = rng.integers(n_users, size=size)
    items = rng.integers(N_ITEMS, size=size)
    return [
        {"user_id": f"e{u}", "item_id": f"i{i}", "event": "click", "event_id": uuid.uuid4().hex}
        for u, i in zip(users, items, strict=True)
    ]


async def post_load(
    url: str, concurrency: int, duration: float, batch: int, n_users: int
) -> dict[str, Any]:
    """Closed-loop posting; returns acknowledged ids and ack latencies."""
    import aiohttp

    acked: list[str] = []
    lat: list[float] = []
    errors = 0
    deadline = time.monotonic() + duration

    async def client(seed: int, session: aiohttp.ClientSession) -> None:
        nonlocal errors
        rng = np.random.default_rng(seed)
        while time.monotonic() < deadline:
            events = _batch(rng, n_users, batch)
            t0 = time.perf_counter()
            async with session.post(f"{url}/events", json={"events": events}) as r:
                await r.read()
                if r.status == 202:
                    lat.append((time.perf_counter() - t0) * 1000)
                    acked.extend(e["event_id"] for e in events)
                else:
                    errors += 1

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        t0 = time.monotonic()
        await asyncio.gather(*(client(s, session) for s in range(concurrency)))
        wall = time.monotonic() - t0
    return {
        "acked": acked,
        "events_per_s": round(len(acked) / wall, 1),
        "p50_ack_ms": round(float(np.percentile(lat, 50)), 2) if lat else None,
        "p99_ack_ms": round(float(np.percentile(lat, 99)), 2) if lat else None,
        "errors": errors,
    }


async def freshness(url: str, probes: int = 10) -> float:
    """Median ms from a 202 to four answers in a row showing the new history version."""
    import aiohttp

    out = []
    async with aiohttp.ClientSession() as session:
        for p in range(probes):
            user = f"fresh-{uuid.uuid4().hex[:8]}-{p}"
            event = {"user_id": user, "item_id": "i1", "event": "click"}
            async with session.post(f"{url}/events", json={"events": [event]}) as r:
                assert r.status == 202, await r.text()
            t0, streak = time.perf_counter(), 0
            while streak < 4 and time.perf_counter() - t0 < 30:
                async with session.get(f"{url}/recommend/{user}") as r:
                    body = await r.json()
                streak = streak + 1 if body.get("history_version") == 1 else 0
            out.append((time.perf_counter() - t0) * 1000)
    return round(float(np.median(out)), 1)


def exactly_once(lake: str, events_args: Any, acked: list[str]) -> dict[str, int]:
    """Acknowledged ids missing from the log, and events counted more than once by a reader."""
    from app.events import open_store
    from app.store import Lake

    store = open_store(Lake(lake), DATASET, events_args)
    logged, _ = store.read_since(None)
    ids = {e["event_id"] for e in logged}
    wanted = set(acked)
    users = {e["user_id"] for e in logged if e["event_id"] in wanted}
    store.refresh(force=True)
    counted = sum(store.version(u) for u in users)
    distinct = len({e["event_id"] for e in logged if e["user_id"] in users})
    store.close()
    return {"lost": len(wanted - ids), "duplicated": counted - distinct}


def child_serve(lake: str, backend: dict[str, Any], opts: dict[str, Any]) -> dict[str, Any]:
    """The Serve app (local.yaml, two ingress replicas) under the posting load."""
    import ray
    from ray import serve

    from app.config import EventsArgs
    from app.serve.deploy import start

    start_ray()
    run_cfg = config_run(lake, events=backend)
    run_cfg.deployments["Ingress"]["num_replicas"] = 2
    url = start(run_cfg)
    wait_ready(f"{url}/healthz")
    load = asyncio.run(
        post_load(url, opts["concurrency"], opts["duration"], opts["batch"], opts["users"])
    )
    fresh = asyncio.run(freshness(url))
    serve.shutdown()
    ray.shutdown()
    acked = load.pop("acked")
    return {**load, "freshness_ms": fresh, **exactly_once(lake, EventsArgs(**backend), acked)}


def baseline_app() -> Any:
    """One process, FastAPI + the same store's append (what a plain service would do)."""
    from fastapi import FastAPI

    from app.config import EventsArgs
    from app.events import open_store
    from app.store import Lake

    store = open_store(
        Lake(os.environ["SCALEREC_BENCH_LAKE"]),
        DATASET,
        EventsArgs(**json.loads(os.environ["SCALEREC_BENCH_EVENTS"])),
    )
    api = FastAPI()

    @api.post("/events", status_code=202)
    async def events(body: dict[str, Any]) -> dict[str, int]:
        rows = [{**e, "timestamp": time.time(), "received_at": time.time()} for e in body["events"]]
        return {"accepted": await asyncio.to_thread(store.append, rows)}

    return api


def child_baseline(lake: str, backend: dict[str, Any], opts: dict[str, Any]) -> dict[str, Any]:
    port = free_port()
    env = {**os.environ, "SCALEREC_BENCH_LAKE": lake, "SCALEREC_BENCH_EVENTS": json.dumps(backend)}
    cmd = [sys.executable, "-m", "uvicorn", "bench.events:baseline_app", "--factory"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(120):
            try:
                wait_ready(f"{url}/docs", timeout_s=1)
                break
            except TimeoutError:
                pass
        load = asyncio.run(
            post_load(url, opts["concurrency"], opts["duration"], opts["batch"], opts["users"])
        )
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    load.pop("acked")
    return load


def _rss_mib(pid: int | None = None) -> float:
    if pid is None:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open(f"/proc/{pid}/status") as f:
        line = next(x for x in f if x.startswith("VmRSS"))
    return int(line.split()[1]) / 1024


def child_memory(lake: str, backend: dict[str, Any], opts: dict[str, Any]) -> dict[str, Any]:
    """RSS of one store-holding process (and of redis-server) while 1M events arrive."""
    from app.config import EventsArgs
    from app.events import open_store
    from app.store import Lake

    args = EventsArgs(**{**backend, "history_cap": 5, "dedupe_window": 5})
    store = open_store(Lake(lake), "memory", args)
    rng = np.random.default_rng(7)
    total, step, out = opts["memory_events"], opts["memory_events"] // 4, []
    now = time.time()
    for done in range(0, total, 1000):
        rows = [
            {**e, "timestamp": now, "received_at": now} for e in _batch(rng, opts["users"], 1000)
        ]
        store.append(rows)
        if (done + 1000) % step == 0:
            point = {"events": done + 1000, "replica_rss_mib": round(_rss_mib(os.getpid()), 1)}
            if opts.get("redis_pid"):
                point["redis_rss_mib"] = round(_rss_mib(opts["redis_pid"]), 1)
            out.append(point)
    store.close()
    return {"history_cap": 5, "points": out}


def _child(kind: str, lake: str, backend: dict[str, Any], opts: dict[str, Any]) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter (no state shared between them)."""
    cmd = [sys.executable, "-m", "bench.events", "--child", kind, "--lake", lake]
    cmd += ["--backend-json", json.dumps(backend), "--opts-json", json.dumps(opts)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{kind} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--batch", type=int, default=20)
    p.add_argument("--users", type=int, default=100_000)
    p.add_argument("--memory-events", type=int, default=1_000_000)
    p.add_argument("--backends", default="embedded,redis")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--lake", help=argparse.SUPPRESS)
    p.add_argument("--backend-json", help=argparse.SUPPRESS)
    p.add_argument("--opts-json", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        fn = {"serve": child_serve, "baseline": child_baseline, "memory": child_memory}[a.child]
        print(json.dumps(fn(a.lake, json.loads(a.backend_json), json.loads(a.opts_json))))
        return {}
    opts = {k: getattr(a, k) for k in ("duration", "concurrency", "batch", "users")}
    opts["memory_events"] = a.memory_events
    results: dict[str, Any] = {"load_avg_start": os.getloadavg(), "opts": opts, "backends": {}}
    with tempfile.TemporaryDirectory() as tmp:
        url, redis_proc = start_redis(tmp)
        try:
            chosen = {"embedded": {}, "redis": {"backend": "redis", "redis_url": url}}
            for name in a.backends.split(","):
                backend = chosen[name]
                lake = make_lake(os.path.join(tmp, f"lake-{name}"))
                if name == "redis":
                    import redis

                    redis.Redis.from_url(url).flushall()
                served = _child("serve", lake, backend, opts)
                plain = _child("baseline", os.path.join(tmp, f"plain-{name}"), backend, opts)
                mem = _child("memory", lake, backend, {**opts, "redis_pid": redis_proc.pid})
                served["ratio_vs_plain"] = round(served["events_per_s"] / plain["events_per_s"], 2)
                results["backends"][name] = {**served, "plain_fastapi": plain, "memory": mem}
                print(json.dumps({name: results["backends"][name]}, indent=1), flush=True)
        finally:
            redis_proc.terminate()
            redis_proc.wait(timeout=10)
    results["load_avg_end"] = os.getloadavg()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=2) + "\n")
    _table(results)
    return results


def _table(results: dict[str, Any]) -> None:
    head = f"{'backend':<10}{'events/s':>10}{'plain':>10}{'ratio':>7}{'p50 ms':>8}{'p99 ms':>8}"
    print(head + f"{'fresh ms':>10}{'lost':>6}{'dup':>5}")
    for name, r in results["backends"].items():
        print(
            f"{name:<10}{r['events_per_s']:>10}{r['plain_fastapi']['events_per_s']:>10}"
            f"{r['ratio_vs_plain']:>7}{r['p50_ack_ms']:>8}{r['p99_ack_ms']:>8}"
            f"{r['freshness_ms']:>10}{r['lost']:>6}{r['duplicated']:>5}"
        )


if __name__ == "__main__":
    main()
