"""Bearer-token check of the ``/admin`` endpoints.

Only the token's SHA-256 travels and is kept: the builder hashes the token found in its own
environment, and a replica whose environment holds the token hashes that one instead (so a
token rotated on the nodes wins over the one the application was built with).
"""

from __future__ import annotations

import hashlib
import hmac
import os

from fastapi import HTTPException


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
