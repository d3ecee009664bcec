"""Tests for app.serve.auth: key files, authentication, scopes, token buckets, and the
``jobs.keys`` command line."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from pydantic import ValidationError

from app.serve.auth import (
    ANONYMOUS,
    SCOPES,
    ApiKey,
    AuthArgs,
    AuthError,
    KeyFileError,
    KeyRing,
    RateLimiter,
    add_key,
    enforce_limits,
    hash_key,
    load_keys,
    new_key,
    read_key_file,
    retry_after_header,
)
from jobs import keys as keys_job

ENV = "SCALEREC_TEST_API_KEYS"


@pytest.fixture(autouse=True)
def _no_inline_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)


def _entry(client: str, key: str, *scopes: str, **extra: object) -> dict[str, object]:
    return {"client": client, "sha256": hash_key(key), "scopes": list(scopes), **extra}


def _write(path: Path, *entries: dict[str, object]) -> str:
    path.write_text(json.dumps({"keys": list(entries)}))
    return str(path)


# --- key files ---


@pytest.mark.parametrize("name", ["keys.json", "keys.yaml"])
def test_add_key_round_trip_keeps_only_hashes(tmp_path: Path, name: str) -> None:
    path = tmp_path / "conf" / name
    shop = add_key(path, "shop", ["events:write", "recommend:read"], rate_per_s=50)
    admin = add_key(path, "ops", ["admin"])
    assert shop.startswith("sr_") and len(shop) > 40 and shop != admin
    text = path.read_text()
    assert shop not in text and admin not in text and hash_key(shop) in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == [name]  # no temp file left behind
    if name.endswith(".json"):
        json.loads(text)  # a .json key file stays JSON

    ring = load_keys(str(path), ENV)
    key = ring.authenticate(f"Bearer {shop}", None)
    assert key == ApiKey("shop", hash_key(shop), frozenset({"events:write", "recommend:read"}), 50)
    assert ring.authenticate(None, admin).client == "ops"
    assert [k.client for k in read_key_file(path)] == ["shop", "ops"]


def test_add_key_refuses_a_bad_scope_and_leaves_the_file(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    add_key(path, "shop", ["events:write"])
    before = path.read_text()
    with pytest.raises(KeyFileError, match="recommend:write"):
        add_key(path, "shop", ["recommend:write"])
    assert path.read_text() == before


def test_bad_scope_names_the_file_entry_and_scope(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "keys.json",
        _entry("shop", new_key(), "events:write"),
        _entry("crm", new_key(), "recommend:read", "events:read"),
    )
    with pytest.raises(KeyFileError) as info:
        load_keys(path, ENV)
    msg = str(info.value)
    assert path in msg and "keys[1]" in msg and "'crm'" in msg and "'events:read'" in msg


def test_bad_hash_is_rejected_without_echoing_it(tmp_path: Path) -> None:
    plain = new_key()  # a plain key pasted where its hash belongs must not reach a log
    path = _write(tmp_path / "keys.json", {"client": "shop", "sha256": plain, "scopes": ["admin"]})
    with pytest.raises(KeyFileError, match="sha256") as info:
        load_keys(path, ENV)
    assert plain not in str(info.value)


def test_uppercase_hex_is_accepted(tmp_path: Path) -> None:
    key = new_key()
    path = _write(
        tmp_path / "k.json", {**_entry("shop", key, "admin"), "sha256": hash_key(key).upper()}
    )
    assert load_keys(path, ENV).authenticate(f"Bearer {key}", None).client == "shop"


@pytest.mark.parametrize(
    "bad",
    [{"keys": [{"client": "x", "sha256": "0" * 64, "scopes": []}]}, {"clients": []}, []],
)
def test_malformed_files_are_rejected(tmp_path: Path, bad: object) -> None:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(KeyFileError, match=str(path)):
        load_keys(str(path), ENV)


def test_duplicate_hash_is_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = new_key()
    path = _write(tmp_path / "keys.json", _entry("a", key, "admin"), _entry("b", key, "admin"))
    with pytest.raises(KeyFileError, match="'b' repeats a key of 'a'"):
        load_keys(path, ENV)
    # the same key inline and in the file
    path = _write(tmp_path / "keys.json", _entry("b", key, "admin"))
    monkeypatch.setenv(ENV, json.dumps({"keys": [_entry("a", key, "admin")]}))
    with pytest.raises(KeyFileError, match=rf"'b' repeats a key of 'a' \(\${ENV}\)"):
        load_keys(path, ENV)


def test_inline_env_keys_and_file_together(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    inline, filed = new_key(), new_key()
    monkeypatch.setenv(ENV, json.dumps({"keys": [_entry("crm", inline, "events:write")]}))
    assert load_keys(None, ENV).authenticate(None, inline).client == "crm"
    path = _write(tmp_path / "keys.json", _entry("shop", filed, "recommend:read"))
    ring = load_keys(path, ENV)
    assert {ring.authenticate(f"Bearer {k}", None).client for k in (inline, filed)} == {
        "crm",
        "shop",
    }


def test_bad_inline_json_and_missing_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(KeyFileError, match="key file not found"):
        load_keys(str(tmp_path / "nope.yaml"), ENV)
    monkeypatch.setenv(ENV, "{not json")
    with pytest.raises(KeyFileError, match=rf"\${ENV}: not valid JSON"):
        load_keys(None, ENV)


# --- authentication and scopes ---


@pytest.fixture
def ring_and_keys() -> tuple[KeyRing, dict[str, str]]:
    plain = {"shop": new_key(), "ops": new_key()}
    ring = KeyRing(
        [
            ApiKey("shop", hash_key(plain["shop"]), frozenset({"events:write", "recommend:read"})),
            ApiKey("ops", hash_key(plain["ops"]), frozenset({"admin"})),
        ]
    )
    return ring, plain


def test_bearer_and_x_api_key_are_accepted(ring_and_keys: tuple[KeyRing, dict[str, str]]) -> None:
    ring, plain = ring_and_keys
    assert ring.authenticate(f"Bearer {plain['shop']}", None).client == "shop"
    assert ring.authenticate(f"bearer  {plain['shop']} ", None).client == "shop"
    assert ring.authenticate(None, plain["shop"]).client == "shop"
    # a non-bearer Authorization (a proxy's Basic auth) does not hide the X-API-Key
    assert ring.authenticate("Basic dXNlcjpwdw==", plain["ops"]).client == "ops"


@pytest.mark.parametrize(
    ("authorization", "x_api_key", "detail"),
    [
        (None, None, "missing API key"),
        ("Bearer ", "", "missing API key"),
        ("Basic dXNlcjpwdw==", None, "missing API key"),
        ("Bearer sr_not-a-key", None, "unknown API key"),
        (None, "sr_not-a-key", "unknown API key"),
    ],
)
def test_missing_or_unknown_key_is_401(
    ring_and_keys: tuple[KeyRing, dict[str, str]],
    authorization: str | None,
    x_api_key: str | None,
    detail: str,
) -> None:
    ring, _ = ring_and_keys
    with pytest.raises(AuthError) as info:
        ring.authenticate(authorization, x_api_key)
    assert info.value.status == 401 and detail in info.value.detail
    assert info.value.headers == {"WWW-Authenticate": "Bearer"}


def test_wrong_scope_is_403_and_admin_implies_all(
    ring_and_keys: tuple[KeyRing, dict[str, str]],
) -> None:
    ring, plain = ring_and_keys
    shop = ring.authenticate(f"Bearer {plain['shop']}", None)
    ring.require(shop, "events:write")
    ring.require(shop, "recommend:read")
    for scope in ("history:read", "admin"):
        with pytest.raises(AuthError) as info:
            ring.require(shop, scope)
        assert info.value.status == 403
        assert info.value.detail == f"key 'shop' lacks scope {scope}"
    ops = ring.authenticate(f"Bearer {plain['ops']}", None)
    for scope in SCOPES:
        ring.require(ops, scope)


def test_disabled_ring_lets_everyone_in() -> None:
    ring = KeyRing.disabled()
    key = ring.authenticate(None, None)
    assert key is ANONYMOUS and not ring.enabled
    for scope in SCOPES:
        ring.require(key, scope)


# --- rate limits ---


def test_bucket_allows_burst_then_refuses_then_refills() -> None:
    limiter = RateLimiter()
    assert [limiter.check("k", 2.0, 3, now=0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.check("k", 2.0, 3, now=0.0) == pytest.approx(0.5)  # 1 token at 2/s
    assert limiter.check("k", 2.0, 3, now=0.25) == pytest.approx(0.25)  # refusal takes nothing
    assert limiter.check("k", 2.0, 3, now=0.5) == 0.0
    assert limiter.check("k", 2.0, 3, now=0.5) > 0.0
    assert limiter.check("other", 2.0, 3, now=0.5) == 0.0  # buckets are per key
    # a long idle refills to the burst, not beyond
    assert [limiter.check("k", 2.0, 3, now=100.0) for _ in range(4)][-1] == pytest.approx(0.5)


def test_cost_over_burst_passes_on_a_full_bucket_and_leaves_debt() -> None:
    limiter = RateLimiter()
    assert limiter.check("u", 10.0, 5, cost=20, now=0.0) == 0.0  # slowed, never starved
    assert limiter.check("u", 10.0, 5, cost=1, now=0.0) == pytest.approx(1.6)  # 16 tokens owed
    assert limiter.check("u", 10.0, 5, cost=1, now=1.6) == 0.0


def test_check_many_charges_all_or_none() -> None:
    limiter = RateLimiter()
    assert limiter.check("user:u1", 1.0, 2, cost=2, now=0.0) == 0.0
    wait, key = limiter.check_many([("key:shop", 10.0, 10, 1), ("user:u1", 1.0, 2, 1)], now=0.0)
    assert key == "user:u1" and wait == pytest.approx(1.0)
    # the client was not charged for the refused batch: its 10 tokens are all there
    assert [limiter.check("key:shop", 10.0, 10, now=0.0) for _ in range(10)] == [0.0] * 10
    assert limiter.check_many([], now=0.0) == (0.0, None)


def test_lru_bound_holds_and_an_evicted_bucket_comes_back_full() -> None:
    limiter = RateLimiter(max_keys=3)
    limiter.check("a", 1.0, 1, now=0.0)  # drained
    for k in ("b", "c", "d"):
        limiter.check(k, 1.0, 1, now=0.0)
    assert len(limiter) == 3
    assert limiter.check("a", 1.0, 1, now=0.0) == 0.0  # evicted, so fresh
    for i in range(1000):
        limiter.check(f"user:{i}", 1.0, 1, now=0.0)
    assert len(limiter) == 3


def test_a_refused_key_stays_recent() -> None:
    limiter = RateLimiter(max_keys=2)
    limiter.check("hot", 1.0, 1, now=0.0)
    limiter.check("x", 1.0, 1, now=0.0)
    assert limiter.check("hot", 1.0, 1, now=0.0) > 0  # refused, but touched
    limiter.check("y", 1.0, 1, now=0.0)  # evicts x, the least recent, not hot
    assert limiter.check("hot", 1.0, 1, now=0.0) > 0


@pytest.mark.parametrize(("seconds", "header"), [(0.0, "1"), (0.2, "1"), (1.0, "1"), (1.01, "2")])
def test_retry_after_header(seconds: float, header: str) -> None:
    assert retry_after_header(seconds) == {"Retry-After": header}


def test_enforce_limits_per_client_and_per_user() -> None:
    args = AuthArgs(rate_per_s=1.0, burst=2, user_events_per_s=1.0, user_burst=3)
    limiter = RateLimiter()
    shop = ApiKey("shop", "0" * 64, frozenset({"events:write"}))
    enforce_limits(limiter, args, shop, {"u1": 3}, now=0.0)
    with pytest.raises(AuthError) as info:
        enforce_limits(limiter, args, shop, {"u1": 1, "u2": 1}, now=0.0)
    assert info.value.status == 429 and "user 'u1'" in info.value.detail
    assert info.value.headers == {"Retry-After": "1"}
    enforce_limits(limiter, args, shop, now=0.0)  # the refused batch charged nobody
    with pytest.raises(AuthError, match="client 'shop'") as info:
        enforce_limits(limiter, args, shop, now=0.5)
    assert info.value.headers == {"Retry-After": "1"}
    # a key's own rate wins over the default
    fast = ApiKey("fast", "1" * 64, frozenset({"admin"}), rate_per_s=100.0, burst=50)
    for _ in range(50):
        enforce_limits(limiter, args, fast, now=0.0)
    # auth off: no limits
    for _ in range(100):
        enforce_limits(limiter, args, ANONYMOUS, {"u1": 100}, now=0.0)


def test_auth_args_are_strict_and_documented() -> None:
    args = AuthArgs()
    assert args.required and args.keys_env == "SCALEREC_API_KEYS" and args.key_file is None
    assert (args.rate_per_s, args.burst, args.user_events_per_s, args.user_burst) == (
        100.0,
        200,
        10.0,
        50,
    )
    assert all(field.description for field in AuthArgs.model_fields.values())
    with pytest.raises(ValidationError):
        AuthArgs.model_validate({"key_flie": "keys.yaml"})
    with pytest.raises(ValidationError):
        AuthArgs(rate_per_s=0)
    with pytest.raises(ValidationError):
        args.required = False  # type: ignore[misc]


# --- the jobs.keys entry point ---


def test_cli_add_and_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(tmp_path / "keys.yaml")
    argv = ["add", "--file", path, "--client", "shop", "--scope", "events:write"]
    assert keys_job.main([*argv, "--scope", "recommend:read", "--rate", "50"]) == 0
    out = capsys.readouterr()
    key = out.out.strip()
    assert key.startswith("sr_") and "\n" not in key and path in out.err
    ring = load_keys(path, ENV)
    assert ring.authenticate(f"Bearer {key}", None).rate_per_s == 50

    assert keys_job.main(["list", "--file", path]) == 0
    listing = capsys.readouterr().out
    assert "shop" in listing and "events:write,recommend:read" in listing and "50" in listing
    assert hash_key(key)[:12] in listing and key not in listing

    with pytest.raises(SystemExit) as info:
        keys_job.main(["add", "--file", path, "--client", "shop"])  # no --scope
    assert info.value.code == 2
    with pytest.raises(SystemExit):
        keys_job.main([*argv[:-1], "recommend:write"])  # not a scope
    Path(path).write_text("keys: [{client: x}]")
    assert keys_job.main(["list", "--file", path]) == 2
    assert "keys[0]" in capsys.readouterr().err
