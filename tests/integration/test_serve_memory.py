"""Memory of an ingress replica stays flat under many distinct users and large request bodies.

One app of its own (``colocate_scoring``, as serve_configs/local.yaml on one machine, so the
replica measured is the only one that allocates per request) gets, after a warm-up of
``N_WARMUP`` requests:

- ``N_USERS`` ``GET /recommend/<user>``: 90 % of them for distinct users unknown to the
  catalogue (about 90,000; their popularity answers share one cache entry), 10 % for the 80 known
  users with a random ``k`` up to ``max_k`` (about 5,700 distinct personal answers, far more
  than ``cache_max_bytes`` holds);
- ``N_LARGE_POSTS`` ``POST /recommend`` whose bodies are as large as ``max_body_bytes`` allows
  (500 context and 500 exclusion ids, padded with JSON whitespace), each a distinct answer under
  a hashed key, plus ``N_OVERSIZED`` bodies one byte over the limit (413).

The bound on the replica's RSS growth (``/proc/<pid>/status`` VmRSS, sampled during the run):
``cache_max_bytes`` (the cache's estimate is about 1.1 times the heap it holds, see
``app.serve.answers.estimate_bytes``) plus ``SLACK_MIB`` for what does not depend on how many
users there are: the allocator's high-water mark after bursts of concurrent requests and
bodies, and Serve's per-request bookkeeping. Without the byte bound the same traffic would keep
those 5,700 personal answers of up to 40 items (about 110 MiB by the estimate), and with one
popularity entry per user another 90,000 answers of 10 items (about 600 MiB).

100k requests over 8 keep-alive sessions take about 2-4 minutes on 2 cores; the load stops at
``LOAD_BUDGET_S`` and the test then requires at least ``MIN_USERS`` distinct users sent.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from serving import NO_AUTH, start_fast_serve, wait_healthy

from app.serve import ServeAppArgs, build_application

pytestmark = pytest.mark.slow

APP = "scalerec-memory"
LOCAL_YAML = Path(__file__).parents[2] / "serve_configs" / "local.yaml"
MAX_K = 100
MAX_BODY_BYTES = 256 * 1024
CACHE_MAX_BYTES = 16 * 1024**2
SLACK_MIB = 64
N_WARMUP = 2_000
N_USERS = 100_000
MIN_USERS = 30_000
N_LARGE_POSTS = 300
N_OVERSIZED = 20
THREADS = 8
LOAD_BUDGET_S = 300.0
TIMEOUT = 30


@dataclass(frozen=True)
class Target:
    """The app under load and the pid of its one ingress replica."""

    url: str
    pid: int
    n_users: int
    n_items: int


def _ingress_pid(app: str) -> int:
    from ray.util.state import list_actors

    actors = list_actors(
        filters=[("class_name", "=", f"ServeReplica:{app}:Ingress"), ("state", "=", "ALIVE")]
    )
    assert len(actors) == 1, actors
    pid = actors[0].pid
    assert pid, actors[0]
    return int(pid)


def rss_bytes(pid: int) -> int:
    """Resident set size of process ``pid`` (``VmRSS`` of ``/proc/<pid>/status``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"no VmRSS for pid {pid}")


@pytest.fixture(scope="module")
def target(ray_cluster: None, serve_lake) -> Iterator[Target]:
    from ray import serve

    url = start_fast_serve()  # the fast path of serve_configs/local.yaml
    args = ServeAppArgs(
        auth=NO_AUTH,
        lake=serve_lake.lake.uri,
        name=serve_lake.name,
        model="production",
        max_k=MAX_K,
        max_body_bytes=MAX_BODY_BYTES,
        max_context_items=500,
        cache_size=1_000_000,  # the byte bound, not the entry count, is what this test checks
        cache_max_bytes=CACHE_MAX_BYTES,
        colocate_scoring=True,
    )
    # as serve_configs/local.yaml: normal CPU priority (Ray starts workers at nice 15, behind
    # this test's client threads) and no per-request access log
    ingress = {
        "ray_actor_options": {
            "num_cpus": 0.5,
            "runtime_env": {"env_vars": {"RAY_worker_niceness": "0"}},
        },
        "logging_config": {"enable_access_log": False},
    }
    app = build_application(args, {"Ingress": ingress})
    serve.run(app, name=APP, route_prefix="/", blocking=False)
    try:
        wait_healthy(url)
        yield Target(url, _ingress_pid(APP), serve_lake.n_users, serve_lake.n_items)
    finally:
        serve.delete(APP)
        serve.shutdown()


Request = tuple[str, str, int]
"""``(method, path, body size)``: a GET (size 0), or a ``POST /recommend#<body number>``."""


def _large_body(target: Target, n: int, size: int) -> bytes:
    """Body number ``n`` of ``POST /recommend``: ``size`` bytes, 500 + 500 ids, JSON whitespace."""
    rng = random.Random(n)  # built when sent: hundreds of 256 KiB bodies stay out of memory
    items = [f"i{i}" for i in range(target.n_items)]
    body = {
        "user_id": f"poster-{n}",
        "k": rng.randint(1, MAX_K),
        "context": rng.choices(items, k=500),
        "exclude": rng.choices(items, k=500),
    }
    raw = json.dumps(body).encode()
    assert len(raw) <= size
    return raw + b" " * (size - len(raw))


def _requests(
    target: Target, n_users: int, seed: int, n_posts: int = N_LARGE_POSTS, n_over: int = N_OVERSIZED
) -> list[Request]:
    """The load, shuffled: ``n_users`` GETs, ``n_posts`` large and ``n_over`` oversized POSTs."""
    rng = random.Random(seed)
    out: list[Request] = []
    for n in range(n_users):
        if rng.random() < 0.9:
            out.append(("GET", f"/recommend/visitor-{seed}-{n}-{rng.getrandbits(32):08x}", 0))
        else:
            user, k = rng.randrange(target.n_users), rng.randint(1, MAX_K)
            out.append(("GET", f"/recommend/u{user}?k={k}", 0))
    # ``#<n>``: which body to build when it is sent (distinct per seed and post)
    posts = [(n, MAX_BODY_BYTES - 64) for n in range(n_posts)]
    posts += [(n_posts + n, MAX_BODY_BYTES + 1) for n in range(n_over)]
    out += [("POST", f"/recommend#{seed * 10_000 + n}", size) for n, size in posts]
    rng.shuffle(out)
    return out


def _send(
    target: Target, work: list[Request], deadline: float
) -> tuple[Counter[int], list[str], int]:
    """Send ``work`` over one keep-alive session until done or ``deadline``."""
    statuses: Counter[int] = Counter()
    errors: list[str] = []
    sent = 0
    headers = {"content-type": "application/json"}
    with requests.Session() as http:
        for method, path, size in work:
            if time.monotonic() > deadline:
                break
            try:
                if method == "GET":
                    r = http.get(f"{target.url}{path}", timeout=TIMEOUT)
                else:
                    route, _, tag = path.partition("#")
                    body = _large_body(target, int(tag), size)
                    r = http.post(
                        f"{target.url}{route}", data=body, headers=headers, timeout=TIMEOUT
                    )
                statuses[r.status_code] += 1
                if r.status_code not in (200, 413) and len(errors) < 5:
                    errors.append(f"{method} {path[:60]}: {r.status_code} {r.text[:200]}")
            except requests.RequestException as exc:
                if len(errors) < 5:
                    errors.append(f"{method} {path[:60]}: {exc!r}")
                statuses[-1] += 1
            sent += 1
    return statuses, errors, sent


def _load(
    target: Target, work: list[Request], budget_s: float
) -> tuple[Counter[int], list[str], int]:
    """Send ``work`` over ``THREADS`` keep-alive sessions for at most ``budget_s``."""
    deadline = time.monotonic() + budget_s
    statuses: Counter[int] = Counter()
    errors: list[str] = []
    sent = 0
    with ThreadPoolExecutor(THREADS) as pool:
        chunks = [work[i::THREADS] for i in range(THREADS)]
        for s, e, n in pool.map(lambda chunk: _send(target, chunk, deadline), chunks):
            statuses += s
            errors += e
            sent += n
    return statuses, errors, sent


def test_rss_stays_flat_under_distinct_users_and_large_bodies(target: Target) -> None:
    # warm-up: every kind of request once in a while, so the baseline holds what any load
    # allocates once (imports on first use, the allocator's arenas, Serve's metrics)
    warmup = _requests(target, N_WARMUP, seed=1, n_posts=20, n_over=2)
    statuses, errors, _ = _load(target, warmup, 120.0)
    assert not errors and set(statuses) <= {200, 413}, (errors, statuses)
    baseline = rss_bytes(target.pid)

    samples = [baseline]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(1.0):
            try:
                samples.append(rss_bytes(target.pid))
            except OSError:  # the replica is gone (killed for memory?): asserted below
                return

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    work = _requests(target, N_USERS, seed=2)
    started = time.monotonic()
    try:
        statuses, errors, sent = _load(target, work, LOAD_BUDGET_S)
    finally:
        stop.set()
        sampler.join(timeout=10)
    elapsed = time.monotonic() - started
    assert os.path.exists(f"/proc/{target.pid}"), "the ingress replica died under the load"
    samples.append(rss_bytes(target.pid))
    mib = 1024**2
    report = (
        f"sent {sent} of {len(work)} in {elapsed:.0f} s ({sent / elapsed:.0f}/s); "
        f"statuses {dict(statuses)}; RSS {baseline / mib:.0f} MiB -> peak "
        f"{max(samples) / mib:.0f} MiB, end {samples[-1] / mib:.0f} MiB"
    )
    print(report)

    assert not errors, (errors, report)
    assert set(statuses) <= {200, 413}, report  # 413: the oversized bodies, documented
    assert sent >= MIN_USERS, f"too slow for the budget: {report}"
    if sent == len(work):
        assert statuses[413] == N_OVERSIZED, report
    growth = max(samples) - baseline
    assert growth < CACHE_MAX_BYTES + SLACK_MIB * mib, report
    assert requests.get(f"{target.url}/recommend/u1?k=5", timeout=TIMEOUT).status_code == 200
