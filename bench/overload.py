"""Overload: the default serving config at 4x its sustainable load sheds load, answers all.

python -m bench.overload [--capacity-s 15 --overload-s 20 --factor 4]  → bench/results/overload.json

Same workload as bench/serve.py (100k items x 64 dims, 20k users, top-10, cache off so every
request is scored) on serve_configs/local.yaml's own options, Ray limited to 2 CPUs. The load
comes from ``h2load`` (nghttp2's HTTP benchmark, in C: ``apt-get install nghttp2-client``),
because a Python generator sending thousands of requests per second takes the cores the
server needs:

1. capacity: 8 keep-alive clients in a closed loop, the sustainable load (QPS and p99);
2. overload: ``factor`` x that QPS in an open loop (``--rps`` per connection over
   ``--connections`` connections), whatever the answers' speed. Each replica runs and queues
   a bounded number of requests (``max_ongoing_requests``, ``max_queued_requests``); the rest
   get a 503 with Retry-After at once.

Targets: p99 of the accepted (200) requests under overload <= 2x the capacity p99; every
request answered with 200 or 503 within the request timeout. Per-request times come from
h2load's log (send to last byte).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.serve import N_USERS, K, config_run, make_lake, start_ray, wait_ready

P99_RATIO_TARGET = 2.0


def h2load(url_file: str, log: str, duration_s: float, connections: int, rps: float = 0) -> dict:
    """One h2load run (closed loop, or ``rps`` per connection); its per-request log, parsed."""
    exe = shutil.which("h2load")
    if exe is None:
        raise SystemExit("bench.overload needs h2load: apt-get install nghttp2-client")
    cmd = [exe, "--h1", "-c", str(connections), "-D", str(round(duration_s)), "-i", url_file]
    cmd += ["--log-file", log] + (["--rps", f"{rps:g}"] if rps else ["--warm-up-time", "3"])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + 120)
    if proc.returncode != 0 or not os.path.exists(log):
        raise RuntimeError(f"h2load failed ({proc.returncode}): {proc.stderr[-500:]}")
    rows = np.loadtxt(log, ndmin=2) if os.path.getsize(log) else np.zeros((0, 3))
    status, ms = rows[:, 1].astype(int), rows[:, 2] / 1000.0
    tail = [x for x in proc.stdout.splitlines() if x.startswith(("requests:", "status codes"))]
    # h2load's own rate: the log may also hold the warm-up's requests
    rate = re.search(r"finished in [\d.]+s, ([\d.]+) req/s", proc.stdout)
    out: dict[str, Any] = {
        "requests": len(ms),
        "qps": float(rate.group(1)) if rate else round(len(ms) / duration_s, 1),
        "h2load": tail,
        "max_ms": round(float(ms.max()), 3) if len(ms) else None,
        "per_status": {},
    }
    for code in sorted(set(status.tolist())):
        m = ms[status == code]
        out["per_status"][str(code)] = {
            "requests": len(m),
            "qps": round(len(m) / duration_s, 1),
            **{f"p{q}_ms": round(float(np.percentile(m, q)), 3) for q in (50, 95, 99)},
            "max_ms": round(float(m.max()), 3),
        }
    # requests h2load started but that never got a status (errors, timeouts)
    done = re.search(
        r"(\d+) total, (\d+) started, (\d+) done, \d+ succeeded, \d+ failed, "
        r"(\d+) errored, (\d+) timeout",
        proc.stdout,
    )
    out["errored"] = int(done.group(4)) if done else None
    out["timed_out"] = int(done.group(5)) if done else None
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--capacity-s", type=float, default=15.0)
    p.add_argument("--overload-s", type=float, default=20.0)
    p.add_argument("--factor", type=float, default=4.0)
    p.add_argument("--concurrency", type=int, default=8, help="closed-loop clients (capacity)")
    p.add_argument("--connections", type=int, default=512, help="open-loop connections")
    p.add_argument("--out", default="bench/results/overload.json")
    ns = p.parse_args(argv)
    os.environ.pop("RAY_ADDRESS", None)

    import ray
    from ray import serve

    from app.serve.deploy import start

    tmp = tempfile.mkdtemp(prefix="scalerec-bench-overload-")
    try:
        lake = make_lake(os.path.join(tmp, "lake"))
        start_ray()
        run_cfg = config_run(lake)
        url = start(run_cfg)
        wait_ready(f"{url}/recommend/u0")
        timeout_s = float(run_cfg.http_options.get("request_timeout_s") or 10.0)
        rng = np.random.default_rng(1)
        urls = os.path.join(tmp, "urls.txt")
        Path(urls).write_text(
            "\n".join(f"{url}/recommend/u{u}?k={K}" for u in rng.integers(N_USERS, size=50_000))
        )
        load_before = os.getloadavg()[0]
        cap = h2load(urls, os.path.join(tmp, "cap.tsv"), ns.capacity_s, ns.concurrency)
        rate = ns.factor * cap["qps"]
        time.sleep(2)
        load_mid = os.getloadavg()[0]
        over = h2load(
            urls,
            os.path.join(tmp, "over.tsv"),
            ns.overload_s,
            ns.connections,
            rps=rate / ns.connections,
        )
        serve.shutdown()
        ray.shutdown()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    cap_ok = cap["per_status"].get("200", {})
    ok = over["per_status"].get("200", {})
    per_status = over["per_status"]
    unanswered = {s: r["requests"] for s, r in per_status.items() if s not in ("200", "503")}
    if over["errored"] or over["timed_out"]:
        unanswered["errored or timed out"] = (over["errored"] or 0) + (over["timed_out"] or 0)
    ratio = round(ok["p99_ms"] / cap_ok["p99_ms"], 3) if ok and cap_ok else None
    out = {
        "workload": f"serve_configs/local.yaml options, cache off; capacity: {ns.concurrency} "
        f"closed-loop clients for {ns.capacity_s:.0f}s; overload: {ns.factor:g}x its QPS "
        f"open-loop over {ns.connections} connections for {ns.overload_s:.0f}s (h2load); Ray "
        f"num_cpus=2, {os.cpu_count()} cores",
        "settings": {
            "ingress": {
                k: run_cfg.deployments["Ingress"].get(k)
                for k in ("max_ongoing_requests", "max_queued_requests", "backpressure_config")
            },
            "request_timeout_s": timeout_s,
        },
        "capacity": cap,
        "overload": over,
        "summary": {
            "capacity_qps": cap_ok.get("qps"),
            "capacity_p99_ms": cap_ok.get("p99_ms"),
            "target_rate": round(rate, 1),
            "offered_rate": over["qps"],
            "accepted_qps": ok.get("qps", 0.0),
            "accepted_p99_ms": ok.get("p99_ms"),
            "accepted_p99_vs_capacity": ratio,
            "shed_share": round(
                over["per_status"].get("503", {}).get("requests", 0) / max(over["requests"], 1), 3
            ),
            "max_ms": over["max_ms"],
            "unanswered": unanswered,
            "p99_target_met": ratio is not None and ratio <= P99_RATIO_TARGET,
            "all_answered_in_time": not unanswered and (over["max_ms"] or 0) <= timeout_s * 1000,
        },
        "loadavg_1m_before": {"capacity": round(load_before, 2), "overload": round(load_mid, 2)},
    }
    Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
    Path(ns.out).write_text(json.dumps(out, indent=2))
    s = out["summary"]
    print(f"{'phase':<10} {'sent/s':>8} {'200/s':>8} {'503 share':>10} {'p99 200 ms':>11}")
    q = cap["qps"]
    print(
        f"{'capacity':<10} {q:>8.0f} {cap_ok.get('qps', 0):>8.0f} {'-':>10} "
        f"{cap_ok.get('p99_ms') or float('nan'):>11.1f}"
    )
    print(
        f"{'overload':<10} {s['offered_rate']:>8.0f} {s['accepted_qps']:>8.0f} "
        f"{s['shed_share']:>10.3f} {s['accepted_p99_ms'] or float('nan'):>11.1f}"
    )
    print(json.dumps(s, indent=2))
    return out


if __name__ == "__main__":
    main()
