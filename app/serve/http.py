"""HTTP surface of the serving stage: request/response models and the ASGI guard.

The guard answers 413 for oversized bodies (by ``Content-Length`` or while streaming) and records
latency and status metrics per endpoint for every request, including the ones FastAPI rejects.

``FastPathAPI`` answers the hot request, ``GET /recommend/<user>`` with no query or only
``k=<digits>``, with the same handler as the FastAPI route (registered by the ingress in
``RUNTIME["recommend"]``) but without FastAPI's middleware, routing, dependency solving and
request objects, a large share of the event loop's time per request. Every other form of the
request (other parameters, a malformed ``k``, a path with more segments) goes to FastAPI,
which validates it. So does a fast-path request whose handler raises: FastAPI runs it again and
answers the error with the app's own exception handlers (errors are rare; one set of handlers).

The ``/admin`` endpoints take a bearer token. Only its SHA-256 travels and is kept: the builder
hashes the token found in its own environment, and a replica whose environment holds the token
hashes that one instead (so a token rotated on the nodes wins over the one the app was built with).
"""

import hashlib
import hmac
import math
import os
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import FastAPI, HTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, Field, Strict, field_validator

from app.serve.metrics import ServeMetrics

RUNTIME: dict[str, Any] = {"max_body_bytes": 256 * 1024, "metrics": None}
"""The ingress replica of this process, as its ASGI guard reads it: body limit, metrics and the
fast-path handler (``recommend``). The ingress fills it through this module object: Serve ships
the ingress class by value, so a global of the ingress's own module would be a copy."""

ID = Field(min_length=1, max_length=256)


class RecommendRequest(BaseModel):
    """Body of ``POST /recommend``."""

    user_id: str | None = Field(None, max_length=256, description="Omit for anonymous users.")
    k: int | None = Field(None, description="List length (1..max_k; default default_k).")
    context: list[str] = Field(default_factory=list, description="Item ids the user just saw.")
    exclude: list[str] = Field(default_factory=list, description="Item ids never to return.")
    include_seen: bool = Field(False, description="Allow items the user interacted with.")


class ItemScore(BaseModel):
    """One recommended item."""

    item_id: str
    score: float


class RecommendResponse(BaseModel):
    """A recommendation list."""

    user_id: str | None
    items: list[ItemScore]
    model_version: str
    cached: bool
    strategy: str = Field(description="personal, context (fold-in of the history) or popularity.")
    history_version: int = Field(description="Live events of this user included in the answer.")


class SimilarResponse(BaseModel):
    """Items similar to one item."""

    item_id: str
    items: list[ItemScore]
    model_version: str
    cached: bool


def invalid(loc: tuple[str | int, ...], msg: str, value: Any) -> RequestValidationError:
    """A 422 whose body has the documented ``HTTPValidationError`` shape, like FastAPI's own."""
    return RequestValidationError([{"type": "value_error", "loc": loc, "msg": msg, "input": value}])


def _json_safe(value: Any) -> Any:
    """``value`` with what strict JSON cannot hold (NaN, infinities, objects) as text."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


async def validation_error(_: Any, exc: RequestValidationError) -> JSONResponse:
    """422 in FastAPI's documented shape, also when the rejected input was NaN or infinite.

    FastAPI's own handler fails (a 500) on a body such as ``{"timestamp": NaN}``: the error
    echoes the value, and strict JSON has no NaN.
    """
    return JSONResponse({"detail": _json_safe(list(exc.errors()))}, status_code=422)


MAX_CLOCK_SKEW_S = 86_400.0
"""How far in the future an event's timestamp may lie (client clocks drift; a year does not)."""


def _canonical_id(value: str) -> str:
    # the same canonical form as ingestion: surrounding whitespace is not part of an id
    value = value.strip()
    if not value:
        raise ValueError("must not be blank")
    return value


CanonicalId = Annotated[str, Field(min_length=1, max_length=256), AfterValidator(_canonical_id)]


class Event(BaseModel):
    """One user action."""

    user_id: CanonicalId
    item_id: CanonicalId
    event: str = Field("interaction", max_length=64)
    event_id: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        description="Idempotency key: a retried event with the same id counts once. "
        "Default: derived from user, item, event and timestamp.",
    )
    # strict: a JSON true/false is not a time; finite and from 1970 to now + MAX_CLOCK_SKEW_S
    timestamp: Annotated[float, Strict(), Field(ge=0, allow_inf_nan=False)] | None = Field(
        None, description="Unix seconds; default: arrival time."
    )

    @field_validator("timestamp")
    @classmethod
    def _not_far_future(cls, value: float | None) -> float | None:
        if value is not None and value > time.time() + MAX_CLOCK_SKEW_S:
            raise ValueError(f"lies more than {MAX_CLOCK_SKEW_S:.0f} s in the future")
        return value


class EventsRequest(BaseModel):
    """Body of ``POST /events``."""

    events: list[Event] = Field(min_length=1)


class EventsResponse(BaseModel):
    """Acknowledgement of durably appended events."""

    accepted: int = Field(description="Events of the request now in the log (new or not).")
    duplicates: int = Field(0, description="Of those, events the log held already (retries).")
    history_versions: dict[str, int]


class HealthResponse(BaseModel):
    """Liveness and what is served."""

    status: str
    model: str
    model_version: str
    dataset_version: str


class ReloadRequest(BaseModel):
    """Body of ``POST /admin/reload``."""

    model: str = Field(min_length=1, max_length=128, description="Version id, prefix or alias.")


class ErrorDetail(BaseModel):
    """An error other than a validation error, in words for a person."""

    detail: str


ERROR_DESCRIPTIONS = {
    400: "The body is not valid JSON.",
    401: "No bearer token.",
    403: "Wrong token, or admin is disabled.",
    404: "Unknown item, model version or alias (or no such path).",
    413: "The body, or its list of events, is too large.",
    503: "Overloaded: retry after the seconds in Retry-After.",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` of a route for these error statuses (each an ``ErrorDetail``)."""
    return {c: {"model": ErrorDetail, "description": ERROR_DESCRIPTIONS[c]} for c in codes}


class ReloadResponse(BaseModel):
    """Result of a reload."""

    previous: str
    version: str


def endpoint_name(path: str) -> str:
    """Metric label of a request path (bounded: unknown paths are ``other``)."""
    head = "/".join(path.split("/")[:3]) if path.startswith("/admin") else path.split("/")[1]
    name = head if head.startswith("/admin") else f"/{head}"
    known = ("/recommend", "/similar", "/events", "/healthz", "/admin/reload", "/docs")
    return name if name in known else "other"


RECOMMEND_PREFIX = "/recommend/"

FastRecommend = Callable[[str, int | None], Awaitable[bytes]]
"""``(user_id, k) -> JSON body`` of ``GET /recommend/{user_id}``; raises ``HTTPException``."""


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


async def _send_ok(send: Any, body: bytes) -> None:
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": raw})
    await send({"type": "http.response.body", "body": body})


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
                    body: bytes | None = await handler(*fast)
                except Exception:  # noqa: BLE001
                    # An error (422 for k, 404, 500) is answered by the FastAPI app, which runs
                    # the same handler again: its exception handlers are the only ones.
                    body = None
                if body is not None:
                    await _send_ok(send, body)
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
