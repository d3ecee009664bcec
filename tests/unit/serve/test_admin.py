"""The admin endpoints' bearer token: 401 without one, 403 when wrong or when admin is off."""

from __future__ import annotations

import pytest
from fastapi import HTTPException

from app.serve.http import admin_token_sha256, authorize, token_sha256

ENV = "SCALEREC_TEST_ADMIN_TOKEN"


@pytest.mark.parametrize(
    ("header", "expected", "status"),
    [
        (None, token_sha256("s3cret"), 401),
        ("Basic abc", token_sha256("s3cret"), 401),
        ("Bearer ", token_sha256("s3cret"), 401),
        ("Bearer nope", token_sha256("s3cret"), 403),
        ("Bearer s3cret", None, 403),  # admin disabled: no token configured
    ],
)
def test_bad_or_missing_tokens_are_refused(header: str | None, expected: str | None, status: int):
    with pytest.raises(HTTPException) as err:
        authorize(header, expected, ENV)
    assert err.value.status_code == status


def test_right_token_passes_any_scheme_case() -> None:
    authorize("Bearer s3cret", token_sha256("s3cret"), ENV)
    authorize("bearer  s3cret ", token_sha256("s3cret"), ENV)


def test_the_environment_wins_over_the_builders_hash(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    assert admin_token_sha256(ENV) is None
    assert admin_token_sha256(ENV, "built") == "built"
    monkeypatch.setenv(ENV, "rotated")
    assert admin_token_sha256(ENV, "built") == token_sha256("rotated")
