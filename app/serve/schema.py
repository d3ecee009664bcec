"""Request and response models of the serving stage's HTTP API, and its 422 handler.

The ingress (``app.serve.ingress``) declares its routes with these models, so they are also
the OpenAPI schema clients and the fuzz test read. Event ids are canonicalised here exactly as
ingestion canonicalises them (surrounding whitespace is not part of an id).
"""

import math
import time
from collections.abc import Collection, Sequence
from typing import Annotated, Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, Field, Strict, field_validator

from app.events import event_id

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
    history_version: int | None = Field(
        description="Live events of this user included in the answer (keys with history:read)."
    )


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


def entry_errors(
    events: Sequence[Event], unknown_items: Collection[str], types: Collection[str]
) -> list[dict[str, Any]]:
    """422 entries naming each event that fails (unknown item, event type not configured).

    A client can drop those and post the rest again.
    """
    return [
        {"type": "value_error", "loc": ("body", "events", i, field), "msg": msg, "input": v}
        for i, e in enumerate(events)
        for field, v, msg in (
            ("item_id", e.item_id, "unknown item id"),
            ("event", e.event, f"unknown event type; one of {', '.join(types)}"),
        )
        if (field == "item_id" and v in unknown_items) or (field == "event" and v not in types)
    ]


def event_rows(events: Sequence[Event], now: float) -> list[dict[str, Any]]:
    """The online store's rows of validated events received at ``now``."""
    return [
        {
            "user_id": e.user_id,
            "item_id": e.item_id,
            "event": e.event,
            # the id is fixed before the arrival time fills a missing timestamp, so that a
            # retry, arriving later, derives the same id
            "event_id": event_id(e.model_dump()),
            "timestamp": e.timestamp if e.timestamp is not None else now,
            "received_at": now,
        }
        for e in events
    ]


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
    401: "No API key or admin token, or an unknown one.",
    403: "The key lacks the route's scope, or a wrong admin token, or admin is disabled.",
    404: "Unknown item, model version or alias (or no such path).",
    413: "The body, or its list of events, is too large.",
    429: "Rate limit of the key or of a user: retry after the seconds in Retry-After.",
    503: "Overloaded: retry after the seconds in Retry-After.",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` of a route for these error statuses (each an ``ErrorDetail``)."""
    return {c: {"model": ErrorDetail, "description": ERROR_DESCRIPTIONS[c]} for c in codes}


class ReloadResponse(BaseModel):
    """Result of a reload."""

    previous: str
    version: str
