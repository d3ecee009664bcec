"""HTTP surface of the serving stage: the ASGI guard, API-key checks and the admin token.

Request and response models live in ``app.serve.schema``.

The guard answers 413 for oversized bodies (by ``Content-Length`` or while streaming) and records
latency and status metrics per endpoint for every request, including the ones FastAPI rejects.

``FastPathAPI`` answers the hot request, ``GET /recommend/<user>`` with no query or only
``k=<digits>``, with the same handler as the FastAPI route (registered by the ingress in
``RUNTIME["recommend"]``) but without FastAPI's middleware, routing, dependency solving and
request objects, a large share of the event loop's time per request. Every other form of the
request (other parameters, a malformed ``k``, a path with more segments) goes to FastAPI,
which validates it. So does a fast-path request whose handler raises: FastAPI runs it again and
answers the error with the app's own exception handlers (errors are rare; one set of handlers),
except a refused API key (``AuthError``), answered at once.

The ``/admin`` endpoints take a bearer token. Only its SHA-256 travels and is kept: the builder
hashes the token found in its own environment, and a replica whose environment holds the token
hashes that one instead (so a token rotated on the nodes wins over the one the app was built with).
"""

import hashlib
import hmac
import os
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, HTTPException
from fastapi.responses import JSONResponse

from app.serve.auth import ApiKey, AuthError, KeyRing
from app.serve.metrics import ServeMetrics

RUNTIME: dict[str, Any] = {"max_body_bytes": 256 * 1024, "metrics": None, "keys": None}
"""The ingress replica of this process, as its ASGI guard reads it: body limit, metrics, API
keys (``KeyRing``) and the fast-path handler (``recommend``). The ingress fills it through this
module object: Serve ships the ingress class by value, so a global of the ingress's own module
would be a copy."""


class Caller:
    """A FastAPI dependency: the request's API key, which must grant ``scope`` (else 401/403).

    A dependency, not a check in the handler, so that a refused caller learns nothing about
    the body's validity (FastAPI validates the body after the dependencies ran). A class, not
    a closure: Serve pickles the routes with the ingress, and a closure would travel by value
    with a copy of ``RUNTIME``.
    """

    def __init__(self, scope: str) -> None:
        self.scope = scope

    def __call__(
        self,
        authorization: Annotated[str | None, Header(description="Bearer <API key>")] = None,
        x_api_key: Annotated[str | None, Header(description="The API key (or Bearer)")] = None,
    ) -> ApiKey:
        """The caller's key, checked against the replica's ``KeyRing``."""
        keys: KeyRing | None = RUNTIME["keys"]
        if keys is None:  # no ingress in this process yet: refuse rather than guess
            raise AuthError(503, "the ingress is starting; retry", {"Retry-After": "1"})
        key = keys.authenticate(authorization, x_api_key)
        keys.require(key, self.scope)
        return key


READER = Depends(Caller("recommend:read"))
"""The dependency of the recommendation routes."""
WRITER = Depends(Caller("events:write"))
"""The dependency of ``POST /events``."""


def is_admin_key(keys: KeyRing, authorization: str | None) -> bool:
    """Whether ``Authorization`` bears an API key with the ``admin`` scope (auth on only)."""
    if not keys.enabled or not authorization:
        return False  # auth off: the admin token alone guards /admin
    try:
        return keys.authenticate(authorization, None).allows("admin")
    except AuthError:
        return False


async def auth_error(_: Any, exc: AuthError) -> JSONResponse:
    """401, 403 or 429 with ``{"detail": ...}`` and the error's headers (Retry-After ...)."""
    return JSONResponse({"detail": exc.detail}, status_code=exc.status, headers=exc.headers)


def endpoint_name(path: str) -> str:
    """Metric label of a request path (bounded: unknown paths are ``other``)."""
    head = "/".join(path.split("/")[:3]) if path.startswith("/admin") else path.split("/")[1]
    name = head if head.startswith("/admin") else f"/{head}"
    known = ("/recommend", "/similar", "/events", "/healthz", "/admin/reload", "/docs")
    return name if name in known else "other"


RECOMMEND_PREFIX = "/recommend/"

FastRecommend = Callable[[str, int | None, str | None, str | None], Awaitable[bytes]]
"""``(user_id, k, authorization, x_api_key) -> JSON body`` of ``GET /recommend/{user_id}``;
raises ``HTTPException`` or ``AuthError``."""


def fast_recommend_args(scope: dict[str, Any]) -> tuple[str, int | None] | None:
    """``(user_id, k)`` when the fast path may answer this request, else None (FastAPI does)."""
    if scope.get("method") != "GET":
        return None
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    if not path.startswith(RECOMMEND_PREFIX):
        return None
    user_id = path[len(RECOMMEND_PREFIX) :]
    if not user_id or "/" in user_id:
        return None
    query: bytes = scope.get("query_string", b"")
    if not query:
        return user_id, None
    digits = query[2:]
    if query.startswith(b"k=") and digits.isdigit() and len(digits) <= 6:
        return user_id, int(digits)
    return None


async def _send(send: Any, body: bytes, status: int = 200, headers: Any = ()) -> None:
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in dict(headers).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def _credentials(scope: dict[str, Any]) -> tuple[str | None, str | None]:
    """The ``Authorization`` and ``X-API-Key`` headers of an ASGI request (latin-1, as HTTP)."""
    found: dict[bytes, str] = {}
    for name, value in scope.get("headers") or ():
        if name in (b"authorization", b"x-api-key"):
            found[name] = value.decode("latin-1")
    return found.get(b"authorization"), found.get(b"x-api-key")


def _record(scope: dict[str, Any], start: float, status: int) -> None:
    """Latency and status metrics of one request (when the replica has set up its metrics)."""
    metrics: ServeMetrics | None = RUNTIME["metrics"]
    if metrics is not None:
        endpoint = endpoint_name(scope.get("path", ""))
        metrics.latency_ms.observe(
            (time.perf_counter() - start) * 1000.0, tags={"endpoint": endpoint}
        )
        metrics.count("requests", endpoint=endpoint, status=str(status))


class FastPathAPI(FastAPI):
    """The FastAPI app, except that the hot request is answered before its middleware stack.

    ``GET /recommend/<user>[?k=N]`` (see ``fast_recommend_args``) goes straight to the handler
    the ingress registered in ``RUNTIME["recommend"]``, the same one the FastAPI route calls;
    everything else, including every malformed form of that request, goes through FastAPI.
    """

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """Handle one ASGI call."""
        handler: FastRecommend | None = RUNTIME.get("recommend")
        if handler is not None and scope["type"] == "http":
            fast = fast_recommend_args(scope)
            if fast is not None and _no_body(scope):
                start = time.perf_counter()
                try:
                    body: bytes | None = await handler(*fast, *_credentials(scope))
                except AuthError as exc:  # answered here: a refusal costs no second pass
                    detail = JSONResponse({"detail": exc.detail}).body
                    await _send(send, bytes(detail), exc.status, exc.headers)
                    _record(scope, start, exc.status)
                    return
                except Exception:  # noqa: BLE001
                    # An error (422 for k, 404, 500) is answered by the FastAPI app, which runs
                    # the same handler again: its exception handlers are the only ones.
                    body = None
                if body is not None:
                    await _send(send, body)
                    _record(scope, start, 200)
                    return
        await super().__call__(scope, receive, send)


def _no_body(scope: dict[str, Any]) -> bool:
    for name, value in scope.get("headers") or ():
        if name in (b"content-length", b"transfer-encoding") and value != b"0":
            return False
    return True


class BodyLimitAndMetrics:
    """ASGI middleware: 413 for oversized bodies, latency and status metrics per endpoint."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """Handle one ASGI call."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = int(RUNTIME["max_body_bytes"])
        start = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status["code"] = int(message["status"])
            await send(message)

        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            response = JSONResponse({"detail": f"request body over {limit} bytes"}, status_code=413)
            await response(scope, receive, send_wrapper)
        else:
            seen = {"n": 0}

            async def limited_receive() -> dict[str, Any]:
                message: dict[str, Any] = await receive()
                seen["n"] += len(message.get("body", b""))
                if seen["n"] > limit:
                    raise HTTPException(413, f"request body over {limit} bytes")
                return message

            await self.app(scope, limited_receive, send_wrapper)
        _record(scope, start, status["code"])


def token_sha256(token: str) -> str:
    """Hex SHA-256 of an admin token."""
    return hashlib.sha256(token.encode()).hexdigest()


def admin_token_sha256(env: str, fallback: str | None = None) -> str | None:
    """Hash of the token in environment variable ``env``, else ``fallback`` (None: admin off)."""
    token = os.environ.get(env)
    return token_sha256(token) if token else fallback


def authorize(authorization: str | None, expected_sha256: str | None, env: str) -> None:
    """Accept an ``Authorization: Bearer <token>`` header whose token hashes to the expected one.

    Args:
        authorization: The request's ``Authorization`` header, if any.
        expected_sha256: Hash of the admin token; None when no token is configured.
        env: Name of the environment variable holding the token (for the error message).

    Raises:
        HTTPException: 401 without a bearer token, 403 when admin is disabled or the token is
            wrong.
    """
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise HTTPException(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
    if expected_sha256 is None:
        raise HTTPException(403, f"admin disabled: {env} is not set")
    if not hmac.compare_digest(token_sha256(token.strip()), expected_sha256):
        raise HTTPException(403, "wrong admin token")
