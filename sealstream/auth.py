"""Signed bearer tokens: HS256 JWTs whose `sub` is the user id (PyJWT does the signing)."""

from __future__ import annotations

import time

import jwt

from sealstream.errors import SealstreamError
from sealstream.settings import AuthSettings

_ALGORITHM = "HS256"
_MAX_USER_ID = 128


class AuthError(SealstreamError):
    """The bearer token is missing, malformed, expired or not signed by us."""


def mint_token(settings: AuthSettings, user_id: str, ttl_seconds: int | None = None) -> str:
    if not 0 < len(user_id) <= _MAX_USER_ID:
        raise ValueError(f"user id must be 1..{_MAX_USER_ID} characters")
    now = int(time.time())
    claims = {
        "sub": user_id,
        "iss": settings.issuer,
        "iat": now,
        "exp": now + (ttl_seconds or settings.token_ttl_seconds),
    }
    return jwt.encode(claims, settings.secret.get_secret_value(), algorithm=_ALGORITHM)


def verify_token(settings: AuthSettings, token: str) -> str:
    """Return the user id of a valid token; raise AuthError saying what was wrong otherwise."""
    try:
        claims = jwt.decode(
            token,
            settings.secret.get_secret_value(),
            algorithms=[_ALGORITHM],  # pinned: never accept "none" or an attacker's choice
            issuer=settings.issuer,
            options={"require": ["sub", "exp", "iss"]},
        )
    except jwt.ExpiredSignatureError:
        raise AuthError("token expired") from None
    except jwt.InvalidTokenError as exc:
        raise AuthError(f"invalid token ({type(exc).__name__})") from None
    user = claims["sub"]
    if not isinstance(user, str) or not 0 < len(user) <= _MAX_USER_ID:
        raise AuthError("invalid token (bad sub)")
    return user
