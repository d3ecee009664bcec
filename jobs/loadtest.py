"""Closed-loop HTTP load test: C keep-alive clients for S seconds → QPS, latency percentiles.

python -m jobs.loadtest --url http://127.0.0.1:8000 --concurrency 8 --duration 20 \
    --path "/recommend/{user}?k=10" --users u0,u1,u2 --out /tmp/load.json --png /tmp/load.png

Prints one JSON object (qps, p50/p95/p99/max ms, error rate, status counts). Each client sends
its next request as soon as the previous answer arrives; with ``--rate R`` requests go out on
a fixed schedule of R per second instead (open loop, for overload). Targets are loopback unless
``--allow-remote``; duration and concurrency are bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time
from collections import Counter
from typing import Any
from urllib.parse import urlparse

MAX_DURATION_S = 600.0
MAX_CONCURRENCY = 512
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


async def run_load(
    url: str,
    paths: list[str],
    concurrency: int,
    duration_s: float,
    warmup_s: float = 1.0,
    timeout_s: float = 10.0,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run the closed loop; ``paths`` are drawn at random per request (a repeat mix)."""
    import aiohttp

    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    conn = aiohttp.TCPConnector(limit=concurrency, force_close=False, keepalive_timeout=60)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    start = time.perf_counter()
    measure_from = start + warmup_s
    stop_at = measure_from + duration_s

    async def client(seed: int, session: aiohttp.ClientSession) -> None:
        rng = random.Random(seed)
        while True:
            t0 = time.perf_counter()
            if t0 >= stop_at:
                return
            try:
                async with session.get(url + rng.choice(paths)) as r:
                    await r.read()
                    status = str(r.status)
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                status = type(exc).__name__
            t1 = time.perf_counter()
            if t0 >= measure_from:
                latencies.append(t1 - t0)
                statuses[status] += 1

    async with aiohttp.ClientSession(connector=conn, timeout=timeout, headers=headers) as session:
        await asyncio.gather(*(client(i, session) for i in range(concurrency)))
    elapsed = min(time.perf_counter(), stop_at + timeout_s) - measure_from
    return summarize(latencies, statuses, elapsed, concurrency)


async def run_open_loop(
    url: str,
    paths: list[str],
    rate: float,
    duration_s: float,
    timeout_s: float = 10.0,
    max_in_flight: int = MAX_CONCURRENCY,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Send ``rate`` requests/s on a fixed schedule, whatever the answers' speed (overload).

    A request is due every ``1/rate`` s; it is sent when due unless ``max_in_flight`` requests
    are already open (then it waits, and ``late_ms`` grows: the generator, not the server, is
    the limit). Latency runs from the actual send. Every request ends with a status or the
    name of its client error, so ``statuses`` accounts for all of them.
    """
    import aiohttp

    latencies: list[float] = []
    late: list[float] = []
    statuses: Counter[str] = Counter()
    by_status: dict[str, list[float]] = {}
    conn = aiohttp.TCPConnector(limit=max_in_flight, keepalive_timeout=60)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    slots = asyncio.Semaphore(max_in_flight)
    rng = random.Random(0)

    async def one(session: aiohttp.ClientSession, path: str, due: float) -> None:
        t0 = time.perf_counter()
        late.append(t0 - due)
        try:
            async with session.get(url + path) as r:
                await r.read()
                status = str(r.status)
                if r.status == 503 and "Retry-After" not in r.headers:
                    status = "503 without Retry-After"
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            status = type(exc).__name__
        finally:
            slots.release()
        dt = time.perf_counter() - t0
        latencies.append(dt)
        statuses[status] += 1
        by_status.setdefault(status, []).append(dt)

    async with aiohttp.ClientSession(connector=conn, timeout=timeout, headers=headers) as session:
        start = time.perf_counter()
        n = int(rate * duration_s)
        tasks = []
        for i in range(n):
            due = start + i / rate
            wait = due - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            await slots.acquire()
            tasks.append(asyncio.create_task(one(session, rng.choice(paths), due)))
        sent_s = time.perf_counter() - start
        await asyncio.gather(*tasks)
    out = summarize(latencies, statuses, sent_s, max_in_flight)
    out.pop("concurrency")
    out["target_rate"] = rate
    out["offered_rate"] = round(n / sent_s, 1) if sent_s > 0 else 0.0
    out["late_p99_ms"] = round(float(sorted(late)[int(0.99 * (len(late) - 1))]) * 1000, 3)
    out["per_status"] = {
        s: summarize(v, Counter({s: len(v)}), sent_s, max_in_flight) for s, v in by_status.items()
    }
    for r in out["per_status"].values():
        for key in ("latencies_ms", "concurrency", "statuses", "error_rate", "duration_s"):
            r.pop(key)
    return out


def summarize(
    latencies: list[float], statuses: Counter[str], elapsed_s: float, concurrency: int
) -> dict[str, Any]:
    """QPS, percentiles (ms) and error rate of one run."""
    import numpy as np

    n = len(latencies)
    ms = np.asarray(latencies) * 1000.0 if n else np.zeros(1)
    ok = sum(c for s, c in statuses.items() if s.startswith("2"))
    return {
        "requests": n,
        "concurrency": concurrency,
        "duration_s": round(elapsed_s, 3),
        "qps": round(n / elapsed_s, 1) if elapsed_s > 0 else 0.0,
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p95_ms": round(float(np.percentile(ms, 95)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
        "max_ms": round(float(ms.max()), 3),
        "error_rate": round(1.0 - ok / n, 6) if n else 1.0,
        "statuses": dict(statuses),
        "latencies_ms": ms.tolist(),
    }


def plot(result: dict[str, Any], path: str, title: str = "") -> None:
    """Latency histogram (log-spaced bins) with p50/p99 marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    ms = np.asarray(result["latencies_ms"])
    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.logspace(np.log10(max(ms.min(), 0.05)), np.log10(ms.max() + 1e-3), 60)
    ax.hist(ms, bins=bins)
    ax.set_xscale("log")
    for q in ("p50_ms", "p99_ms"):
        ax.axvline(result[q], linestyle="--", color="k")
        ax.text(result[q], ax.get_ylim()[1] * 0.9, f" {q[:3]} {result[q]:.1f} ms")
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("requests")
    ax.set_title(title or f"{result['qps']:.0f} QPS, {result['concurrency']} clients")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_paths(template: str, users: list[str]) -> list[str]:
    """Fill ``{user}`` in the path template with each user id."""
    return [template.format(user=u) for u in users] if "{user}" in template else [template]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse arguments, run the load and print the JSON summary."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--path", default="/recommend/{user}?k=10")
    p.add_argument("--users", default="", help="comma-separated user ids for {user}")
    p.add_argument("--n-users", type=int, default=1000, help="else {user} = prefix + 0..N-1")
    p.add_argument("--user-prefix", default="u")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument(
        "--rate", type=float, default=0.0, help="open loop: requests/s on a fixed schedule"
    )
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--out", default="", help="write the JSON summary here")
    p.add_argument("--png", default="", help="write a latency histogram here")
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback host")
    p.add_argument(
        "--api-key",
        default=os.environ.get("SCALEREC_API_KEY", ""),
        help="sent as a bearer token (default: $SCALEREC_API_KEY; make run prints a demo key)",
    )
    ns = p.parse_args(argv)
    host = urlparse(ns.url).hostname or ""
    if host not in LOOPBACK and not ns.allow_remote:
        p.error(f"{host!r} is not loopback; pass --allow-remote to load another host")
    if not 0 < ns.duration <= MAX_DURATION_S or not 0 < ns.concurrency <= MAX_CONCURRENCY:
        p.error(f"need 0 < duration <= {MAX_DURATION_S} and 0 < concurrency <= {MAX_CONCURRENCY}")
    users = [u for u in ns.users.split(",") if u] or [
        f"{ns.user_prefix}{i}" for i in range(ns.n_users)
    ]
    paths = build_paths(ns.path, users)
    headers = {"Authorization": f"Bearer {ns.api_key}"} if ns.api_key else None
    if ns.rate > 0:
        result = asyncio.run(
            run_open_loop(ns.url.rstrip("/"), paths, ns.rate, ns.duration, headers=headers)
        )
    else:
        result = asyncio.run(
            run_load(
                ns.url.rstrip("/"), paths, ns.concurrency, ns.duration, ns.warmup, headers=headers
            )
        )
    if ns.png:
        plot(result, ns.png)
    summary = {k: v for k, v in result.items() if k != "latencies_ms"}
    print(json.dumps(summary, indent=2))
    if ns.out:
        with open(ns.out, "w") as f:
            json.dump(summary, f, indent=2)
    return summary


if __name__ == "__main__":
    main()
