"""API keys of the serving stage: who may call which route, and how often.

Keys come from ``python -m jobs.keys add``; only their SHA-256 is kept (a JSON or YAML key file,
``$SCALEREC_API_KEYS``). Each ingress replica holds a ``KeyRing`` and a ``RateLimiter`` set by
``AuthArgs`` and turns ``AuthError`` into its response (no FastAPI here); see docs/api-keys.md.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import secrets
import tempfile
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

Scope = Literal["events:write", "recommend:read", "history:read", "admin"]
SCOPES: tuple[str, ...] = get_args(Scope)
"""Every scope; ``admin`` (``POST /admin/reload``) implies all the others."""

DEFAULT_ENV = "SCALEREC_API_KEYS"
"""Environment variable that may hold a key file's JSON inline."""


class AuthArgs(BaseModel):
    """API keys and rate limits of the HTTP ingress (``serve.auth`` / Serve ``args.auth``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    required: bool = True
    """Require an API key on user-scoped routes; false turns keys and limits off (local demos)."""
    key_file: str | None = None
    """JSON or YAML file of key hashes (``python -m jobs.keys add``), readable on every node."""
    keys_env: str = DEFAULT_ENV
    """Environment variable that may hold the key file's JSON inline (read before the file)."""
    rate_per_s: float = Field(100.0, gt=0)
    """Requests per second per client, per ingress replica, unless the key sets its own."""
    burst: int = Field(200, ge=1)
    """Requests a client may send at once, unless the key sets its own."""
    user_events_per_s: float = Field(10.0, gt=0)
    """Events per second one user id may get through ``POST /events``, per ingress replica."""
    user_burst: int = Field(50, ge=1)
    """Events one user id may get at once."""


class AuthError(Exception):
    """A refused request: the ingress answers ``status`` with ``{"detail": detail}``."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(f"{status}: {detail}")
        self.status, self.detail, self.headers = status, detail, headers or {}


class KeyFileError(ValueError):
    """A key file or inline key JSON that does not validate; the message names source and entry."""


@dataclass(frozen=True)
class ApiKey:
    """One client's key as stored: its hash, never the key."""

    client: str
    sha256: str
    scopes: frozenset[str]
    rate_per_s: float | None = None
    burst: int | None = None

    def allows(self, scope: str) -> bool:
        """Whether this key grants ``scope`` (``admin`` grants every scope)."""
        return scope in self.scopes or "admin" in self.scopes


ANONYMOUS = ApiKey("anonymous", "", frozenset(SCOPES))
"""The key of every request when auth is off (``KeyRing.disabled``)."""


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    client: str = Field(min_length=1, max_length=128)
    sha256: str = Field(pattern="^[0-9a-fA-F]{64}$")
    scopes: list[Scope] = Field(min_length=1)
    rate_per_s: float | None = Field(None, gt=0)
    burst: int | None = Field(None, ge=1)


def new_key() -> str:
    """A fresh random key: ``sr_`` and 256 random bits, URL-safe."""
    return "sr_" + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """Hex SHA-256 of a key: what the key file stores and lookups use."""
    return hashlib.sha256(key.encode()).hexdigest()


def _parse(data: Any, source: str) -> list[ApiKey]:
    if not isinstance(data, dict) or set(data) != {"keys"} or not isinstance(data["keys"], list):
        raise KeyFileError(f'{source}: expected {{"keys": [...]}} and nothing else')
    out = []
    for i, raw in enumerate(data["keys"]):
        try:
            e = _Entry.model_validate(raw)
        except ValidationError as exc:
            who = f" (client {raw.get('client')!r})" if isinstance(raw, dict) else ""
            # the input is shown for scopes only: a plain key pasted as sha256 must not be logged
            errs = "; ".join(
                f"{'.'.join(map(str, err['loc']))}: {err['msg']}"
                + (f" (got {err['input']!r})" if err["loc"][0] == "scopes" else "")
                for err in exc.errors()
            )
            raise KeyFileError(f"{source}: keys[{i}]{who}: {errs}") from None
        out.append(ApiKey(e.client, e.sha256.lower(), frozenset(e.scopes), e.rate_per_s, e.burst))
    return out


def read_key_file(path: str | os.PathLike[str]) -> list[ApiKey]:
    """The keys of one JSON or YAML key file (YAML reads both); a missing file has none."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text() if p.exists() else "")
    except yaml.YAMLError as exc:
        raise KeyFileError(f"{p}: not valid JSON or YAML: {exc}") from None
    return _parse({"keys": []} if data is None else data, str(p))


def load_keys(key_file: str | None, env: str = DEFAULT_ENV) -> KeyRing:
    """Keys from ``$env`` (inline JSON), then ``key_file``; ``KeyFileError`` names a bad entry."""
    keys: list[tuple[str, ApiKey]] = []
    if inline := os.environ.get(env, "").strip():
        try:
            keys += [(f"${env}", k) for k in _parse(json.loads(inline), f"${env}")]
        except json.JSONDecodeError as exc:
            raise KeyFileError(f"${env}: not valid JSON: {exc}") from None
    if key_file is not None:
        if not Path(key_file).is_file():
            raise KeyFileError(f"{key_file}: key file not found")
        keys += [(key_file, k) for k in read_key_file(key_file)]
    seen: dict[str, tuple[str, str]] = {}
    for source, key in keys:
        if key.sha256 in seen:
            first, client = seen[key.sha256]
            raise KeyFileError(f"{source}: {key.client!r} repeats a key of {client!r} ({first})")
        seen[key.sha256] = (source, key.client)
    return KeyRing(k for _, k in keys)


def add_key(
    key_file: str | os.PathLike[str],
    client: str,
    scopes: Iterable[str],
    rate_per_s: float | None = None,
    burst: int | None = None,
) -> str:
    """A new key for ``client``; only its hash goes to ``key_file`` (replaced atomically, 0600)."""
    path, key = Path(key_file), new_key()
    entry: dict[str, Any] = dict(client=client, sha256=hash_key(key), scopes=sorted(set(scopes)))
    entry |= {n: v for n, v in (("rate_per_s", rate_per_s), ("burst", burst)) if v is not None}
    _parse({"keys": [entry]}, f"{path} (new key)")  # a load's checks, before anything is written
    read_key_file(path)  # the file must be valid before it grows; its entries stay as written
    old = yaml.safe_load(path.read_text()) if path.exists() else None
    data = {"keys": [*(old or {"keys": []})["keys"], entry]}
    text = json.dumps(data, indent=2) + "\n" if path.suffix == ".json" else yaml.safe_dump(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic, but two writers at once may lose a key: run it once
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return key


class KeyRing:
    """The keys one ingress replica accepts, by hash."""

    def __init__(self, keys: Iterable[ApiKey], enabled: bool = True) -> None:
        self.enabled = enabled
        self.by_hash = {k.sha256: k for k in keys}

    @classmethod
    def disabled(cls) -> KeyRing:
        """Auth off: every request is ``ANONYMOUS``, with every scope."""
        return cls([], enabled=False)

    def authenticate(self, authorization_header: str | None, x_api_key: str | None) -> ApiKey:
        """The key of ``Authorization: Bearer <key>``, else ``X-API-Key``; ``AuthError`` 401."""
        if not self.enabled:
            return ANONYMOUS
        scheme, _, token = (authorization_header or "").strip().partition(" ")
        bearer = token if scheme.lower() == "bearer" else ""
        presented = bearer.strip() or (x_api_key or "").strip()
        challenge = {"WWW-Authenticate": "Bearer"}
        if not presented:
            detail = "missing API key: send Authorization: Bearer <key> or X-API-Key: <key>"
            raise AuthError(401, detail, challenge)
        digest = hash_key(presented)
        key = self.by_hash.get(digest)
        # constant-time, should the lookup (on hashes: it leaks nothing useful) ever become a scan
        if key is None or not hmac.compare_digest(key.sha256, digest):
            raise AuthError(401, "unknown API key", challenge)
        return key

    def require(self, key: ApiKey, scope: str) -> None:
        """Raise ``AuthError`` 403 unless ``key`` grants ``scope``."""
        if not key.allows(scope):
            raise AuthError(403, f"key {key.client!r} lacks scope {scope}")


def retry_after_header(seconds: float) -> dict[str, str]:
    """``Retry-After`` in whole seconds, at least 1 (0 would invite an immediate retry)."""
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


class RateLimiter:
    """Token buckets by string key (``key:<client>``, ``user:<id>``); not thread-safe.

    A bucket holds up to ``burst`` tokens, refilled at ``rate_per_s``. Past ``max_keys`` buckets
    the least recently used is dropped and comes back full: what it would be anyway after
    ``burst / rate_per_s`` idle seconds, and LRU drops one only after ``max_keys`` other keys
    were used since, so eviction is safe. Per process: cluster-wide, about replicas x rate.
    """

    def __init__(self, max_keys: int = 100_000) -> None:
        self.max_keys = max(1, max_keys)
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, stamp

    def __len__(self) -> int:
        return len(self._buckets)

    def check(
        self, key: str, rate_per_s: float, burst: int, cost: float = 1.0, now: float | None = None
    ) -> float:
        """0.0 when allowed (``cost`` taken), else seconds until allowed; see ``check_many``."""
        return self.check_many([(key, rate_per_s, burst, cost)], now)[0]

    def check_many(
        self, charges: Sequence[tuple[str, float, int, float]], now: float | None = None
    ) -> tuple[float, str | None]:
        """All or none of distinct ``(key, rate, burst, cost)``: ``(0.0, None)``, else longest wait.

        A cost over ``burst`` passes on a full bucket and leaves debt: slowed, never starved.
        """
        now = time.monotonic() if now is None else now
        levels = [self._level(k, rate, burst, now) for k, rate, burst, _ in charges]
        waits = [
            (max(0.0, min(cost, burst) - level) / rate, k)
            for (k, rate, burst, cost), level in zip(charges, levels, strict=True)
        ]
        for k, *_ in charges:
            if k in self._buckets:  # a refused client stays recent: no reset by eviction
                self._buckets.move_to_end(k)
        wait, worst = max(waits, default=(0.0, ""))
        if wait > 0.0:
            return wait, worst
        for (k, _, _, cost), level in zip(charges, levels, strict=True):
            self._buckets[k] = (level - cost, now)
            self._buckets.move_to_end(k)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return 0.0, None

    def _level(self, key: str, rate: float, burst: int, now: float) -> float:
        tokens, stamp = self._buckets.get(key, (float(burst), now))  # new: a full bucket
        return min(float(burst), tokens + max(0.0, now - stamp) * rate)


def enforce_limits(
    limiter: RateLimiter,
    args: AuthArgs,
    key: ApiKey,
    users: Mapping[str, int] | None = None,
    now: float | None = None,
) -> None:
    """Charge the client 1 and each user its events, all or none; else ``AuthError`` 429."""
    if key is ANONYMOUS:  # auth off: no limits either (local demos, load tests)
        return
    rate, burst = key.rate_per_s or args.rate_per_s, key.burst or args.burst
    charges = [(f"key:{key.client}", rate, burst, 1.0)]
    for user, n in (users or {}).items():
        charges.append((f"user:{user}", args.user_events_per_s, args.user_burst, float(n)))
    wait, bucket = limiter.check_many(charges, now)
    if bucket is not None:
        who = f"client {key.client!r}" if bucket.startswith("key:") else f"user {bucket[5:]!r}"
        raise AuthError(429, f"rate limit of {who} exceeded", retry_after_header(wait))
