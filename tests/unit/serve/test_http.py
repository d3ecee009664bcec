"""The ASGI guard's fast path takes only the plain recommend GET; the rest goes to FastAPI.

Errors on the fast path are answered by the FastAPI app's own handlers."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from fastapi import HTTPException, Response
from fastapi.responses import JSONResponse

from app.serve.auth import AuthError, retry_after_header
from app.serve.http import RUNTIME, FastPathAPI, fast_recommend_args
from app.store import RegistryError


def _scope(path: str, query: bytes = b"", method: str = "GET", root: str = "") -> dict[str, Any]:
    return {"type": "http", "method": method, "path": path, "query_string": query} | {
        "root_path": root
    }


@pytest.mark.parametrize(
    ("scope", "expected"),
    [
        (_scope("/recommend/u1"), ("u1", None)),
        (_scope("/recommend/u1", b"k=25"), ("u1", 25)),
        (_scope("/recommend/u1", b"k=0"), ("u1", 0)),  # the handler answers 422 for it
        (_scope("/recommend/user 7"), ("user 7", None)),  # ASGI paths arrive decoded
        (_scope("/api/recommend/u1", b"k=3", root="/api"), ("u1", 3)),
    ],
)
def test_plain_recommend_gets_take_the_fast_path(
    scope: dict[str, Any], expected: tuple[str, int | None]
) -> None:
    assert fast_recommend_args(scope) == expected


@pytest.mark.parametrize(
    "scope",
    [
        _scope("/recommend/u1", method="POST"),
        _scope("/recommend/"),  # no user: FastAPI's 404 / redirect rules apply
        _scope("/recommend/u1/extra"),
        _scope("/recommend"),
        _scope("/similar/i1"),
        _scope("/recommend/u1", b"k=abc"),  # FastAPI's validation error, not ours
        _scope("/recommend/u1", b"k=-1"),
        _scope("/recommend/u1", b"k=1&k=2"),
        _scope("/recommend/u1", b"k=99999999999"),
        _scope("/recommend/u1", b"debug=1"),
    ],
)
def test_everything_else_goes_to_fastapi(scope: dict[str, Any]) -> None:
    assert fast_recommend_args(scope) is None


def _call(
    app: Any, path: str, query: bytes = b"", headers: list[tuple[bytes, bytes]] | None = None
) -> tuple[int, bytes]:
    """One GET through the ASGI app: (status, body)."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = _scope(path, query) | {"headers": headers or [], "scheme": "http", "server": ("t", 80)}
    asyncio.run(app(scope, receive, send))
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    SENT[:] = sent
    return sent[0]["status"], body


SENT: list[dict[str, Any]] = []
"""The ASGI messages of the last ``_call``."""


@pytest.fixture
def fast_app(monkeypatch: pytest.MonkeyPatch) -> tuple[FastPathAPI, list[str]]:
    """A FastPathAPI whose route and fast path share one handler that fails for some users."""
    calls: list[str] = []

    async def handler(
        user_id: str, k: int | None, authorization: str | None = None, x_api_key: str | None = None
    ) -> bytes:
        calls.append(user_id)
        if user_id == "private" and authorization != "Bearer sr_ok":
            raise AuthError(429, "slow down", retry_after_header(2.5))
        if user_id == "bad-k":
            raise HTTPException(422, "k must be in 1..100")
        if user_id == "gone":
            raise RegistryError("no model version 'x'")
        if user_id == "boom":
            raise RuntimeError("bug")
        return json.dumps({"user_id": user_id, "k": k}).encode()

    app = FastPathAPI()

    @app.exception_handler(RegistryError)
    async def registry_error(_: Any, exc: RegistryError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.get("/recommend/{user_id}")
    async def recommend(user_id: str, k: int | None = None) -> Response:
        return Response(await handler(user_id, k), media_type="application/json")

    monkeypatch.setitem(RUNTIME, "recommend", handler)
    return app, calls


def test_fast_path_answers_success_once(fast_app: tuple[FastPathAPI, list[str]]) -> None:
    app, calls = fast_app
    assert _call(app, "/recommend/u1", b"k=5") == (200, b'{"user_id": "u1", "k": 5}')
    assert calls == ["u1"]  # one handler call: FastAPI's route did not run


@pytest.mark.parametrize(
    ("user", "status", "detail"),
    [
        ("bad-k", 422, "k must be in 1..100"),
        ("gone", 404, "no model version 'x'"),
    ],
)
def test_fast_path_errors_are_answered_by_the_apps_handlers(
    fast_app: tuple[FastPathAPI, list[str]], user: str, status: int, detail: str
) -> None:
    app, calls = fast_app
    code, body = _call(app, f"/recommend/{user}")
    assert (code, json.loads(body)) == (status, {"detail": detail})
    assert calls == [user, user]  # tried on the fast path, answered by FastAPI


def test_fast_path_bug_is_a_500_from_fastapi(fast_app: tuple[FastPathAPI, list[str]]) -> None:
    app, _ = fast_app
    with pytest.raises(RuntimeError, match="bug"):  # Starlette answers 500, then re-raises
        _call(app, "/recommend/boom")


def test_fast_path_answers_a_refused_key_itself(fast_app: tuple[FastPathAPI, list[str]]) -> None:
    app, calls = fast_app
    code, body = _call(app, "/recommend/private")
    assert (code, json.loads(body)) == (429, {"detail": "slow down"})
    headers = dict(SENT[0]["headers"])
    assert headers[b"retry-after"] == b"3" and headers[b"content-type"] == b"application/json"
    assert calls == ["private"]  # no second pass through FastAPI
    # the credentials reach the handler from the raw headers
    ok = [(b"authorization", b"Bearer sr_ok"), (b"x-other", b"1")]
    assert _call(app, "/recommend/private", headers=ok)[0] == 200
