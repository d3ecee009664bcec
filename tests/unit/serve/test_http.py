"""The ASGI guard's fast path takes only the plain recommend GET; the rest goes to FastAPI."""

from __future__ import annotations

from typing import Any

import pytest

from app.serve.http import fast_recommend_args


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
