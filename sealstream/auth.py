"""Signed bearer tokens: HS256 JWTs whose `sub` is the user id (PyJWT does the signing).

An optional `roles` claim grants operator rights: `admin` opens the key-lifecycle admin API.
An optional `tenant` claim says which tenant the user belongs to: chats are created in it (a token
without one may create chats in the default tenant only).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import jwt

from sealstream.errors import SealstreamError
from sealstream.settings import AuthSettings
from sealstream.text_rules import storable_text

_ALGORITHM = "HS256"
_MAX_USER_ID = 128
ADMIN_ROLE = "admin"


class AuthError(SealstreamError):
    """The bearer token is missing, malformed, expired or not signed by us."""


@dataclass(frozen=True)
class Principal:
    """Who a valid token speaks for, and the roles it grants."""

    user_id: str
    roles: frozenset[str] = frozenset()
    tenant: str | None = None
    # The token's `exp` (Unix seconds): a WebSocket is closed then. Not part of who it is.
    expires_at: float | None = field(default=None, compare=False)


def mint_token(
    settings: AuthSettings,
    user_id: str,
    ttl_seconds: int | None = None,
    roles: tuple[str, ...] = (),
    tenant: str | None = None,
) -> str:
    if not 0 < len(user_id) <= _MAX_USER_ID or not storable_text(user_id):
        raise ValueError(f"user id must be 1..{_MAX_USER_ID} characters of printable UTF-8")
    now = int(time.time())
    claims: dict[str, object] = {
        "sub": user_id,
        "iss": settings.issuer,
        "iat": now,
        "exp": now + (ttl_seconds or settings.token_ttl_seconds),
    }
    if roles:
        claims["roles"] = sorted(roles)
    if tenant is not None:
        claims["tenant"] = tenant
    return jwt.encode(claims, settings.secret.get_secret_value(), algorithm=_ALGORITHM)


def verify_token(settings: AuthSettings, token: str) -> str:
    """Return the user id of a valid token; raise AuthError saying what was wrong otherwise."""
    return verify_principal(settings, token).user_id


def verify_principal(settings: AuthSettings, token: str) -> Principal:
    """The user and roles of a valid token; raise AuthError saying what was wrong otherwise."""
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
    # Claims reach Postgres (participants, audit actors): refuse at the edge what it cannot hold
    # (NUL, lone surrogates) and what no id should contain (control characters).
    user = claims["sub"]
    if not isinstance(user, str) or not 0 < len(user) <= _MAX_USER_ID or not storable_text(user):
        raise AuthError(f"invalid token (bad sub: 1..{_MAX_USER_ID} characters of printable UTF-8)")
    roles = claims.get("roles", [])
    if not isinstance(roles, list) or not all(
        isinstance(r, str) and len(r) <= _MAX_USER_ID and storable_text(r) for r in roles
    ):
        raise AuthError("invalid token (bad roles: a list of printable strings)")
    tenant = claims.get("tenant")
    if tenant is not None and (
        not isinstance(tenant, str)
        or not 0 < len(tenant) <= _MAX_USER_ID
        or not storable_text(tenant)
    ):
        raise AuthError(
            f"invalid token (bad tenant: 1..{_MAX_USER_ID} characters of printable UTF-8)"
        )
    exp = claims["exp"]
    return Principal(user, frozenset(roles), tenant, float(exp) if exp is not None else None)


class VerifiedTokens:
    """`verify_principal` with a small bounded cache of tokens already verified, keyed by the
    whole token (so a token with other claims, or signed otherwise, is another entry).

    A busy client sends the same token with every request; verifying it again costs an HMAC,
    a JSON decode and the claim checks each time. A cached principal is handed out only
    while its `exp` has not passed (the same rule as PyJWT's: expired once `now >= exp`),
    then dropped and refused as expired. Only valid tokens are cached: a bad token is verified,
    and refused, every time. The cache lives in the process that verified the token, beside the
    secret it was verified with; `AuthSettings` are fixed per process, so a token cannot outlive
    a change of secret or issuer in it.
    """

    def __init__(
        self,
        settings: AuthSettings,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.max_entries = max_entries
        self._clock = clock
        self._principals: dict[str, Principal] = {}
        # Sync routes verify in the thread pool: the eviction's `next(iter(...))` must not see
        # another thread's insert (RuntimeError: dictionary changed size during iteration).
        self._lock = threading.Lock()

    def principal(self, token: str) -> Principal:
        """Who `token` speaks for; `AuthError` as `verify_principal` when it is not valid."""
        principal = self._principals.get(token)
        if principal is not None:
            # `exp` is required, so every cached principal has one; PyJWT reads it as an int.
            if principal.expires_at is not None and self._clock() < int(principal.expires_at):
                return principal
            self._principals.pop(token, None)
            raise AuthError("token expired")
        principal = verify_principal(self.settings, token)
        with self._lock:
            if len(self._principals) >= self.max_entries:
                # Oldest first (insertion order): a flood of fresh tokens cannot grow the cache.
                self._principals.pop(next(iter(self._principals)), None)
            self._principals[token] = principal
        return principal
