"""The cache of verified tokens keeps every rule of `verify_principal` (sealstream.auth)."""

from __future__ import annotations

import jwt
import pytest
from pydantic import SecretStr

from sealstream.auth import AuthError, VerifiedTokens, mint_token
from sealstream.settings import AuthSettings


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _token(settings: AuthSettings, exp: int, **claims: object) -> str:
    body = {"sub": "alice", "iss": settings.issuer, "exp": exp, **claims}
    return jwt.encode(body, settings.secret.get_secret_value(), algorithm="HS256")


def test_a_cached_token_is_refused_once_its_exp_passed() -> None:
    import time

    settings = AuthSettings()
    exp = int(time.time()) + 60
    clock = Clock(exp - 30)
    tokens = VerifiedTokens(settings, clock=clock)
    token = _token(settings, exp)
    assert tokens.principal(token).user_id == "alice"
    clock.now = exp - 0.001
    assert tokens.principal(token).user_id == "alice"  # cached, still valid
    clock.now = exp  # PyJWT's rule: expired once now >= exp
    with pytest.raises(AuthError, match="token expired"):
        tokens.principal(token)
    assert token not in tokens._principals  # dropped: a later use is verified again


def test_an_expired_token_is_refused_and_not_cached() -> None:
    settings = AuthSettings()
    tokens = VerifiedTokens(settings)
    with pytest.raises(AuthError, match="expired"):
        tokens.principal(mint_token(settings, "alice", ttl_seconds=-10))


def test_other_claims_or_another_signature_are_another_token() -> None:
    settings = AuthSettings()
    tokens = VerifiedTokens(settings)
    alice = mint_token(settings, "alice", tenant="acme")
    assert tokens.principal(alice).tenant == "acme"
    # Changed claims are another token: verified on their own, never served from alice's entry.
    ops = mint_token(settings, "alice", roles=("admin",), tenant="other")
    principal = tokens.principal(ops)
    assert principal.roles == {"admin"} and principal.tenant == "other"
    # A cached token with a byte of its signature changed, or signed with another secret.
    head, body, signature = alice.split(".")
    flipped = f"{head}.{body}.{signature[:-2]}{'A' if signature[-2] != 'A' else 'B'}{signature[-1]}"
    with pytest.raises(AuthError, match="invalid token"):
        tokens.principal(flipped)
    other = AuthSettings(secret=SecretStr("another-secret-that-is-long-enough-000"))
    with pytest.raises(AuthError, match="invalid token"):
        tokens.principal(mint_token(other, "alice", tenant="acme"))
    # A cache for another secret does not know tokens verified by this one.
    with pytest.raises(AuthError, match="invalid token"):
        VerifiedTokens(other).principal(alice)


def test_invalid_tokens_are_refused_every_time_and_the_cache_is_bounded() -> None:
    settings = AuthSettings()
    tokens = VerifiedTokens(settings, max_entries=3)
    bad = _token(settings, 2**40, sub="")
    for _ in range(2):
        with pytest.raises(AuthError, match="bad sub"):
            tokens.principal(bad)
    issued = [_token(settings, 2**40, sub=f"user{i}") for i in range(10)]
    for i, token in enumerate(issued):
        assert tokens.principal(token).user_id == f"user{i}"
    assert len(tokens._principals) == 3
    # Evicted tokens are verified again, and still valid.
    assert tokens.principal(issued[0]).user_id == "user0"


def test_threads_filling_a_full_cache_at_once_all_get_their_principal() -> None:
    """Sync routes verify tokens in the thread pool: evictions racing inserts must not raise."""
    import threading

    settings = AuthSettings()
    cache = VerifiedTokens(settings, max_entries=8)
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(300):
                token = mint_token(settings, f"u{n}-{i}", 60)
                assert cache.principal(token).user_id == f"u{n}-{i}"
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(cache._principals) <= 8
