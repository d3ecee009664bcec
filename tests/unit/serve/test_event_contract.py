"""``POST /events`` bodies: ids canonical as ingestion makes them, times finite and plausible."""

import json
import time

import pytest
from pydantic import ValidationError

from app.serve.schema import MAX_CLOCK_SKEW_S, EventsRequest


def _body(**event) -> str:
    return json.dumps({"events": [{"user_id": "u1", "item_id": "i1", **event}]})


def test_ids_are_trimmed_like_ingested_ids():
    body = EventsRequest.model_validate_json(_body(user_id="  u1 ", item_id="\ti1\n"))
    assert (body.events[0].user_id, body.events[0].item_id) == ("u1", "i1")


@pytest.mark.parametrize("ts", [0, 1_700_000_000, 1_700_000_000.25, None])
def test_plausible_timestamps_pass(ts):
    assert EventsRequest.model_validate_json(_body(timestamp=ts)).events[0].timestamp == ts


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ("NaN", "finite"),
        ("Infinity", "finite"),
        ("-Infinity", "finite"),
        ("false", "valid number"),
        ("true", "valid number"),
        ('"1700000000"', "valid number"),
        ("-5", "greater than or equal to 0"),
        (str(time.time() + 2 * MAX_CLOCK_SKEW_S), "in the future"),
    ],
)
def test_implausible_timestamps_are_rejected(raw, problem):
    body = _body(timestamp=0).replace("0}]", f"{raw}}}]")
    with pytest.raises(ValidationError, match=problem):
        EventsRequest.model_validate_json(body)


@pytest.mark.parametrize("field", ["user_id", "item_id"])
def test_blank_ids_are_rejected(field):
    with pytest.raises(ValidationError, match="blank"):
        EventsRequest.model_validate_json(_body(**{field: "   "}))


@pytest.mark.parametrize(
    "body",
    [
        _body(timestamp=0).replace("0}]", "NaN}]"),
        _body(timestamp=0).replace("0}]", "-Infinity}]"),
        _body(user_id="   "),
    ],
)
def test_rejections_render_as_422_in_the_documented_shape(body):
    """The app's handler renders what FastAPI's own cannot (NaN inputs, validator errors)."""
    import asyncio

    from fastapi.exceptions import RequestValidationError

    from app.serve.schema import validation_error

    with pytest.raises(ValidationError) as caught:
        EventsRequest.model_validate_json(body)
    response = asyncio.run(validation_error(None, RequestValidationError(caught.value.errors())))
    assert response.status_code == 422
    (error,) = json.loads(response.body)["detail"]
    assert {"loc", "msg", "type"} <= set(error)
