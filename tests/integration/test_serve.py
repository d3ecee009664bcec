"""The Serve application on a real local Ray cluster, over real HTTP on its own port.

The pieces that need neither Ray nor a server are tested in tests/unit/serve/.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from serving import NO_AUTH, small_app_args, start_fast_serve, wait_healthy

from app.serve import ServeAppArgs, build_application
from app.serve.auth import add_key
from app.store import (
    Lake,
    load_dataset,
)

N_USERS, ITEMS_PER_GROUP = 80, 12
TOKEN_ENV = "SCALEREC_TEST_ADMIN_TOKEN"
TOKEN = "s3cret-test-token"
NAME = "tiny-mf"
TIMEOUT = 30
LOCAL_YAML = Path(__file__).parents[2] / "serve_configs" / "local.yaml"

# The app's API keys by role, filled by ``served``: most tests call as ``full``.
KEYS: dict[str, str] = {}
ROLES = {
    "full": (["events:write", "history:read", "recommend:read"], 1e6, 10**6),
    "reader": (["recommend:read"], None, None),
    "writer": (["events:write"], None, None),
    "admin": (["admin"], None, None),
    "limited": (["recommend:read"], 0.05, 2),  # a third request within 20 s gets 429
}
# Per user: 20 events at once, then one per 10 s.
AUTH = {"user_events_per_s": 0.1, "user_burst": 20}


def bearer(role: str = "full") -> dict[str, str]:
    """The ``Authorization`` header of a role's key."""
    return {"Authorization": f"Bearer {KEYS[role]}"}


@pytest.fixture(scope="module")
def lake_with_models(serve_lake) -> tuple[Lake, list[str]]:
    # the shared serving lake (tests/conftest.py), whose shape these tests' ids assume
    assert (serve_lake.n_users, serve_lake.items_per_group) == (N_USERS, ITEMS_PER_GROUP)
    return serve_lake.lake, serve_lake.versions


@pytest.fixture(scope="module")
def served(
    ray_cluster: None, lake_with_models: tuple[Lake, list[str]], tmp_path_factory
) -> Iterator[str]:
    from ray import serve

    lake, _ = lake_with_models
    os.environ[TOKEN_ENV] = TOKEN
    key_file = tmp_path_factory.mktemp("keys") / "api_keys.yaml"
    for role, (scopes, rate, burst) in ROLES.items():
        KEYS[role] = add_key(key_file, role, scopes, rate, burst)
    url = start_fast_serve()  # the fast path of serve_configs/local.yaml
    args = small_app_args(lake.uri, NAME, TOKEN_ENV, {**AUTH, "key_file": str(key_file)})
    small = {"ray_actor_options": {"num_cpus": 0.25}}
    # As in serve_configs/: the ingress at normal CPU priority, the others at Ray's nice 15.
    ingress = {"ray_actor_options": {"num_cpus": 0.25, "runtime_env": {"env_vars": NICE_0}}}
    app = build_application(args, {"Ingress": ingress, "Retriever": small, "Ranker": small})
    serve.run(app, name="scalerec-test", route_prefix="/", blocking=False)
    wait_healthy(url)
    yield url
    serve.delete("scalerec-test")
    serve.shutdown()


NICE_0 = {"RAY_worker_niceness": "0"}


def test_ingress_runs_at_normal_priority(served: str) -> None:
    """``RAY_worker_niceness`` in a replica's runtime_env (serve_configs/) lifts Ray's nice 15.

    tests/unit/serve/test_args.py checks that every serve config sets it.
    """
    nice = {}
    for proc in Path("/proc").iterdir():
        try:
            title = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:  # not a process, or gone
            continue
        for name in ("Ingress", "Retriever"):
            if f"ServeReplica:scalerec-test:{name}" in title:
                nice[name] = os.getpriority(os.PRIO_PROCESS, int(proc.name))
    assert nice == {"Ingress": 0, "Retriever": 15}


def _get(url: str, path: str, **kw: object) -> requests.Response:
    kw.setdefault("headers", bearer())
    return requests.get(f"{url}{path}", timeout=TIMEOUT, **kw)  # type: ignore[arg-type]


def _post(url: str, path: str, **kw: object) -> requests.Response:
    kw.setdefault("headers", bearer())
    return requests.post(f"{url}{path}", timeout=TIMEOUT, **kw)  # type: ignore[arg-type]


def _seen(lake: Lake, user: int) -> set[str]:
    h = load_dataset(lake, "tiny").csr("train", "valid", "test")
    return {f"i{i}" for i in h[user].indices}


# ---------------------------------------------------------------------------------------------
# The application over HTTP
# ---------------------------------------------------------------------------------------------


def test_healthz_and_docs(served: str, lake_with_models: tuple[Lake, list[str]]) -> None:
    _, versions = lake_with_models
    r = _get(served, "/healthz")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["model_version"] == versions[0]
    assert _get(served, "/docs").status_code == 200
    paths = _get(served, "/openapi.json").json()["paths"]
    assert {"/recommend/{user_id}", "/recommend", "/similar/{item_id}", "/events"} <= set(paths)


def test_recommend_get_and_post_never_return_seen(
    served: str, lake_with_models: tuple[Lake, list[str]]
) -> None:
    lake, versions = lake_with_models
    for user in (0, 5, 13):
        seen = _seen(lake, user)
        r = _get(served, f"/recommend/u{user}", params={"k": 10})
        assert r.status_code == 200, r.text
        body = r.json()
        ids = [x["item_id"] for x in body["items"]]
        assert len(ids) == 10 and not set(ids) & seen
        assert body["model_version"] == versions[0] and body["strategy"] == "personal"
        assert [x["score"] for x in body["items"]] == sorted(
            (x["score"] for x in body["items"]), reverse=True
        )
        excl = ids[:3]
        r = _post(served, "/recommend", json={"user_id": f"u{user}", "k": 10, "exclude": excl})
        assert r.status_code == 200
        ids2 = [x["item_id"] for x in r.json()["items"]]
        assert not set(ids2) & (seen | set(excl))


def test_fast_path_answers_like_the_fastapi_route(served: str) -> None:
    # ``?k=6`` alone is answered by the ASGI guard; an extra parameter routes the same request
    # through FastAPI. Same list, same errors.
    fast = _get(served, "/recommend/u11", params={"k": 6})
    routed = _get(served, "/recommend/u11", params={"k": 6, "via": "fastapi"})
    assert fast.status_code == routed.status_code == 200
    assert fast.headers["content-type"] == routed.headers["content-type"] == "application/json"
    a, b = fast.json(), routed.json()
    assert a["items"] == b["items"] and len(a["items"]) == 6
    assert (a["cached"], b["cached"]) == (False, True)  # one cache for both paths
    bad = _get(served, "/recommend/u11", params={"k": 0})
    bad_routed = _get(served, "/recommend/u11", params={"k": 0, "via": "fastapi"})
    assert bad.status_code == bad_routed.status_code == 422
    assert bad.json() == bad_routed.json()
    # FastAPI's documented HTTPValidationError shape, as for any other invalid parameter
    (error,) = bad.json()["detail"]
    assert error["loc"] == ["query", "k"] and "between 1 and 20" in error["msg"]


def test_ranker_caps_genres(served: str) -> None:
    r = _get(served, "/recommend/u1", params={"k": 9})
    genres = Counter(int(x["item_id"][1:]) // ITEMS_PER_GROUP for x in r.json()["items"])
    assert max(genres.values()) <= 3


def test_cache_hit_on_repeat(served: str) -> None:
    first = _get(served, "/recommend/u7", params={"k": 4}).json()
    second = _get(served, "/recommend/u7", params={"k": 4}).json()
    assert second["cached"] is True and second["items"] == first["items"]


def test_unknown_user_and_context(served: str) -> None:
    r = _get(served, "/recommend/nobody-here")
    assert r.status_code == 200
    assert r.json()["strategy"] == "popularity" and len(r.json()["items"]) == 10
    r = _post(served, "/recommend", json={"context": ["i0", "i1"], "k": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["strategy"] == "context"
    assert not {"i0", "i1"} & {x["item_id"] for x in body["items"]}


def test_similar(served: str) -> None:
    r = _get(served, "/similar/i3", params={"k": 5})
    assert r.status_code == 200
    ids = [x["item_id"] for x in r.json()["items"]]
    assert len(ids) == 5 and "i3" not in ids
    assert _get(served, "/similar/no-such-item").status_code == 404


def test_events_reflected_and_cache_not_stale(served: str) -> None:
    before = _get(served, "/recommend/u2", params={"k": 5}).json()
    _get(served, "/recommend/u2", params={"k": 5})  # now cached
    top = [x["item_id"] for x in before["items"]][:2]
    r = _post(served, "/events", json={"events": [{"user_id": "u2", "item_id": i} for i in top]})
    assert r.status_code == 202, r.text
    assert r.json()["history_versions"]["u2"] == before["history_version"] + 2
    after = _get(served, "/recommend/u2", params={"k": 5}).json()
    assert after["cached"] is False and after["history_version"] == before["history_version"] + 2
    assert not set(top) & {x["item_id"] for x in after["items"]}
    # A brand-new user: popularity first, then folded in from their events.
    assert _get(served, "/recommend/newcomer").json()["strategy"] == "popularity"
    _post(served, "/events", json={"events": [{"user_id": "newcomer", "item_id": "i5"}]})
    fresh = _get(served, "/recommend/newcomer").json()
    assert fresh["strategy"] == "context" and "i5" not in [x["item_id"] for x in fresh["items"]]


def test_events_are_durable(served: str, lake_with_models: tuple[Lake, list[str]]) -> None:
    lake, _ = lake_with_models
    _post(served, "/events", json={"events": [{"user_id": "u9", "item_id": "i9"}]})
    files = list(Path(lake.path("events", "tiny")).glob("*/*.log"))
    text = "".join(f.read_text() for f in files)
    assert '"user_id":"u9"' in text and '"item_id":"i9"' in text


def test_events_retried_after_a_lost_response_count_once(served: str) -> None:
    batch = {"events": [{"user_id": "u8", "item_id": "i3", "event_id": "retry-1"}]}
    first = _post(served, "/events", json=batch).json()
    # the client never saw ``first`` (a lost response) and retries, maybe on another replica
    again = _post(served, "/events", json=batch).json()
    assert again["history_versions"] == first["history_versions"]
    assert (first["duplicates"], again["duplicates"]) == (0, 1)
    no_id = {"events": [{"user_id": "u8", "item_id": "i4", "timestamp": 1_700_000_000}]}
    assert _post(served, "/events", json=no_id).json()["duplicates"] == 0
    assert _post(served, "/events", json=no_id).json()["duplicates"] == 1
    answer = _get(served, "/recommend/u8").json()
    assert answer["history_version"] == first["history_versions"]["u8"] + 1


@pytest.mark.parametrize(
    ("method", "path", "kw", "status"),
    [
        ("get", "/recommend/u1", {"params": {"k": 0}}, 422),
        ("get", "/recommend/u1", {"params": {"k": 21}}, 422),
        ("get", "/recommend/u1", {"params": {"k": "ten"}}, 422),
        (
            "post",
            "/recommend",
            {"data": b"{not json", "headers": {"content-type": "application/json"}},
            422,
        ),
        ("post", "/recommend", {"json": {"user_id": "u1", "context": ["nope"]}}, 422),
        ("post", "/recommend", {"json": {"user_id": "u1", "exclude": ["nope"]}}, 422),
        ("post", "/recommend", {"json": {"user_id": "u1", "k": 10**6}}, 422),
        ("post", "/recommend", {"json": [1, 2]}, 422),
        ("post", "/events", {"json": {"events": []}}, 422),
        ("post", "/events", {"json": {"events": [{"user_id": "u1", "item_id": "nope"}]}}, 422),
        ("post", "/events", {"json": {"events": [{"user_id": "u1"}]}}, 422),
        (
            "post",
            "/events",
            {
                "data": b'{"events": [{"user_id": "u1", "item_id": "i1", "timestamp": NaN}]}',
                "headers": {"content-type": "application/json"},
            },
            422,
        ),
        (
            "post",
            "/events",
            {"json": {"events": [{"user_id": "u1", "item_id": "i1", "timestamp": False}]}},
            422,
        ),
        ("post", "/events", {"json": {"events": [{"user_id": "u", "item_id": "i1"}] * 51}}, 413),
        (
            "post",
            "/events",
            {"data": b"x" * 20_000, "headers": {"content-type": "application/json"}},
            413,
        ),
        ("get", "/similar/i1", {"params": {"k": -1}}, 422),
        ("get", "/no/such/route", {}, 404),
    ],
)
def test_bad_input_is_4xx(served: str, method: str, path: str, kw: dict, status: int) -> None:
    headers = {**bearer(), **kw.pop("headers", {})}
    r = getattr(requests, method)(f"{served}{path}", timeout=TIMEOUT, headers=headers, **kw)
    assert r.status_code == status, r.text
    assert "detail" in r.json()


# ---------------------------------------------------------------------------------------------
# API keys: who may call which route, and how often
# ---------------------------------------------------------------------------------------------

USER_ROUTES = [
    ("get", "/recommend/u1", {}),  # the ASGI fast path
    ("get", "/recommend/u1", {"params": {"via": "fastapi"}}),  # the same route through FastAPI
    ("post", "/recommend", {"json": {"user_id": "u1"}}),
    ("get", "/similar/i1", {}),
    ("post", "/events", {"json": {"events": [{"user_id": "u1", "item_id": "i1"}]}}),
]


@pytest.mark.parametrize(("method", "path", "kw"), USER_ROUTES)
def test_user_routes_need_a_known_key(served: str, method: str, path: str, kw: dict) -> None:
    for headers in ({}, {"Authorization": "Bearer sr_not-a-key"}, {"X-API-Key": "nope"}):
        r = getattr(requests, method)(f"{served}{path}", timeout=TIMEOUT, headers=headers, **kw)
        assert r.status_code == 401, (headers, r.text)
        assert r.headers["www-authenticate"] == "Bearer" and "API key" in r.json()["detail"]
    # a refused caller learns nothing about the body: 401 before 422
    bad = {"json": {"events": [{"user_id": "u1", "item_id": "no-such-item"}]}}
    assert _post(served, "/events", headers={}, **bad).status_code == 401
    # liveness and the API's description stay open
    for open_path in ("/healthz", "/docs", "/openapi.json"):
        assert requests.get(f"{served}{open_path}", timeout=TIMEOUT).status_code == 200


def test_keys_are_scoped(served: str) -> None:
    events = {"events": [{"user_id": "u3", "item_id": "i2"}]}
    r = _post(served, "/events", json=events, headers=bearer("reader"))
    assert r.status_code == 403 and "events:write" in r.json()["detail"]
    for path in ("/recommend/u3", "/recommend/u3?via=fastapi", "/similar/i2"):
        assert _get(served, path, headers=bearer("writer")).status_code == 403, path
    # a writer's acknowledgement says nothing of the user's history
    r = _post(served, "/events", json=events, headers=bearer("writer"))
    assert r.status_code == 202 and r.json()["history_versions"] == {}
    # nor does a reader's answer; include_seen, which shows the history, needs history:read
    assert _get(served, "/recommend/u3", headers=bearer("reader")).json()["history_version"] is None
    seen = {"user_id": "u3", "include_seen": True}
    assert _post(served, "/recommend", json=seen, headers=bearer("reader")).status_code == 403
    full = _post(served, "/recommend", json=seen)
    assert full.status_code == 200 and full.json()["history_version"] >= 1
    # X-API-Key works where Authorization is taken by something else (fast path and FastAPI)
    for path in ("/recommend/u3", "/recommend/u3?via=fastapi"):
        assert _get(served, path, headers={"X-API-Key": KEYS["reader"]}).status_code == 200


def test_rate_limits_answer_429_with_retry_after(served: str) -> None:
    # ``limited``: a burst of 2, then one request per 20 s, counted on both paths
    codes = [
        _get(served, path, headers=bearer("limited"))
        for path in ("/recommend/u4", "/recommend/u4?via=fastapi", "/recommend/u4")
    ]
    assert [r.status_code for r in codes] == [200, 200, 429]
    assert 1 <= int(codes[2].headers["retry-after"]) <= 20
    assert "limited" in codes[2].json()["detail"]
    r = _get(served, "/recommend/u4?via=fastapi", headers=bearer("limited"))
    assert r.status_code == 429 and "retry-after" in r.headers
    # per user: 20 events at once pass, the next is refused; another user is not held back
    flood = {"events": [{"user_id": "flood", "item_id": f"i{i}"} for i in range(20)]}
    assert _post(served, "/events", json=flood).status_code == 202
    one = {"events": [{"user_id": "flood", "item_id": "i30"}]}
    r = _post(served, "/events", json=one)
    assert r.status_code == 429 and "'flood'" in r.json()["detail"]
    assert int(r.headers["retry-after"]) >= 1
    other = {"events": [{"user_id": "calm", "item_id": "i30"}]}
    assert _post(served, "/events", json=other).status_code == 202
    # the refused event was not written: the user's history holds the 20
    assert _get(served, "/recommend/flood").json()["history_version"] == 20


def test_admin_auth(served: str, lake_with_models: tuple[Lake, list[str]]) -> None:
    lake, versions = lake_with_models
    body = {"model": "production"}
    assert _post(served, "/admin/reload", json=body, headers={}).status_code == 401
    bad = {"Authorization": "Basic abc"}
    assert _post(served, "/admin/reload", json=body, headers=bad).status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert _post(served, "/admin/reload", json=body, headers=wrong).status_code == 403
    ok = {"Authorization": f"Bearer {TOKEN}"}
    r = _post(served, "/admin/reload", json={"model": "no-such-version"}, headers=ok)
    assert r.status_code == 404 and "unknown model version" in r.json()["detail"]
    # the answer names neither the storage nor the model history
    assert lake.uri not in r.text and not any(v in r.text for v in versions)
    assert _post(served, "/admin/reload", json=body, headers=ok).status_code == 200
    # an API key with the admin scope may reload too; one without it may not
    assert _post(served, "/admin/reload", json=body, headers=bearer("admin")).status_code == 200
    assert _post(served, "/admin/reload", json=body, headers=bearer("full")).status_code == 403


def test_reload_zero_failures(served: str, lake_with_models: tuple[Lake, list[str]]) -> None:
    _, versions = lake_with_models
    auth = {"Authorization": f"Bearer {TOKEN}"}
    statuses: Counter[int] = Counter()
    seen_versions: list[str] = []
    errors: list[str] = []
    stop = threading.Event()

    def load() -> None:
        s = requests.Session()
        s.headers.update(bearer())
        n = 0
        while not stop.is_set() and n < 2000:
            n += 1
            try:
                r = s.get(f"{served}/recommend/u{n % N_USERS}", params={"k": 5}, timeout=TIMEOUT)
                statuses[r.status_code] += 1
                if r.status_code == 200:
                    seen_versions.append(r.json()["model_version"])
            except requests.RequestException as exc:
                errors.append(repr(exc))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        r = _post(served, "/admin/reload", json={"model": "staging"}, headers=auth)
        assert r.status_code == 200, r.text
        assert r.json() == {"previous": versions[0], "version": versions[1]}
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    try:
        assert not errors and set(statuses) == {200}, (statuses, errors[:3])
        assert seen_versions[0] == versions[0] and seen_versions[-1] == versions[1]
        assert _get(served, "/healthz").json()["model_version"] == versions[1]
    finally:
        back = _post(served, "/admin/reload", json={"model": "production"}, headers=auth)
        assert back.status_code == 200


@pytest.mark.slow
def test_autoscaling_up_and_down(served: str, lake_with_models: tuple[Lake, list[str]]) -> None:
    from ray import serve

    lake, _ = lake_with_models
    args = ServeAppArgs(auth=NO_AUTH, lake=lake.uri, name=NAME, model="production", cache_size=0)
    auto = {
        "autoscaling_config": {
            "min_replicas": 1,
            "max_replicas": 2,
            "target_ongoing_requests": 2,
            "upscale_delay_s": 1,
            "downscale_delay_s": 3,
            "metrics_interval_s": 0.5,
            "look_back_period_s": 2,
        },
        "ray_actor_options": {"num_cpus": 0.25},
    }
    small = {"ray_actor_options": {"num_cpus": 0.25}}
    app = build_application(args, {"Ingress": auto, "Retriever": small, "Ranker": small})
    serve.run(app, name="scalerec-auto", route_prefix="/auto", blocking=False)

    def replicas() -> int:
        dep = serve.status().applications["scalerec-auto"].deployments["Ingress"]
        return int(dep.replica_states.get("RUNNING", 0))

    wait_healthy(f"{served}/auto")
    stop = threading.Event()

    def load() -> None:
        s = requests.Session()
        i = 0
        while not stop.is_set():
            i += 1
            try:
                s.get(f"{served}/auto/recommend/u{i % N_USERS}", timeout=TIMEOUT)
            except requests.RequestException:
                pass

    threads = [threading.Thread(target=load, daemon=True) for _ in range(12)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 90
        while replicas() < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert replicas() == 2
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    deadline = time.monotonic() + 120
    while replicas() > 1 and time.monotonic() < deadline:
        time.sleep(1.0)
    assert replicas() == 1
    serve.delete("scalerec-auto")


def test_colocated_scoring_answers_like_the_deployment_graph(
    served: str, lake_with_models: tuple[Lake, list[str]]
) -> None:
    """``colocate_scoring``: the same answers (retrieval, ranker rules, similar) in one replica."""
    from ray import serve

    lake, _ = lake_with_models
    serving = requests.get(f"{served}/healthz", timeout=TIMEOUT).json()["model_version"]
    args = ServeAppArgs(
        auth=NO_AUTH,
        lake=lake.uri,
        name=NAME,
        model=serving,  # whatever earlier reload tests left the graph app serving
        admin_token_env=TOKEN_ENV,
        max_k=20,
        max_per_genre=3,
        cache_size=0,
        colocate_scoring=True,
        batch_wait_timeout_s=0.002,
    )
    small = {"ray_actor_options": {"num_cpus": 0.25}}
    app = build_application(args, {"Ingress": small})
    serve.run(app, name="scalerec-colocated", route_prefix="/co", blocking=False)
    try:
        wait_healthy(f"{served}/co")
        status = serve.status().applications["scalerec-colocated"]
        assert set(status.deployments) == {"Ingress"}  # no Retriever / Ranker replicas
        personal = {}
        for user in ("u0", "u5", "u42", "nobody"):
            graph = _get(served, f"/recommend/{user}?k=8").json()
            local = requests.get(f"{served}/co/recommend/{user}?k=8", timeout=TIMEOUT).json()
            personal[user] = local
            assert [i["item_id"] for i in local["items"]] == [i["item_id"] for i in graph["items"]]
            assert local["strategy"] == graph["strategy"]
            assert local["model_version"] == graph["model_version"] == serving
        assert personal["u0"]["strategy"] == "personal"
        genres = Counter(int(i["item_id"][1:]) // ITEMS_PER_GROUP for i in personal["u0"]["items"])
        assert max(genres.values()) <= 3  # the ranker's genre cap applied in the replica
        sim = requests.get(f"{served}/co/similar/i3?k=5", timeout=TIMEOUT).json()
        ref = _get(served, "/similar/i3?k=5").json()
        assert [i["item_id"] for i in sim["items"]] == [i["item_id"] for i in ref["items"]]
        # Concurrent requests are batched in the replica and each gets its own answer.
        users = [f"u{i}" for i in range(0, N_USERS, 3)]
        with ThreadPoolExecutor(8) as pool:
            answers = list(
                pool.map(
                    lambda u: requests.get(f"{served}/co/recommend/{u}", timeout=TIMEOUT).json(),
                    users,
                )
            )
        assert [a["user_id"] for a in answers] == users
    finally:
        serve.delete("scalerec-colocated")
