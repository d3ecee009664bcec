"""HTTP surface of the serving stage: request/response models and the ASGI guard.

The guard answers 413 for oversized bodies (by ``Content-Length`` or while streaming) and records
latency and status metrics per endpoint for every request, including the ones FastAPI rejects.
"""

import time
from typing import Any

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from app.serve import args as _replica
from app.serve.metrics import ServeMetrics

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


class Event(BaseModel):
    """One user action."""

    user_id: str = ID
    item_id: str = ID
    event: str = Field("interaction", max_length=64)
    timestamp: float | None = Field(None, description="Unix seconds; default: arrival time.")


class EventsRequest(BaseModel):
    """Body of ``POST /events``."""

    events: list[Event] = Field(min_length=1)


class EventsResponse(BaseModel):
    """Acknowledgement of durably appended events."""

    accepted: int
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


class BodyLimitAndMetrics:
    """ASGI middleware: 413 for oversized bodies, latency and status metrics per endpoint."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """Handle one ASGI call."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = int(_replica.RUNTIME["max_body_bytes"])
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
        metrics: ServeMetrics | None = _replica.RUNTIME["metrics"]
        if metrics is not None:
            endpoint = endpoint_name(scope.get("path", ""))
            tags = {"endpoint": endpoint}
            metrics.latency_ms.observe((time.perf_counter() - start) * 1000.0, tags=tags)
            metrics.requests.inc(tags={**tags, "status": str(status["code"])})
