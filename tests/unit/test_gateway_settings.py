"""The gateway's settings refuse a fingerprint secret that would not do what the operator meant."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from sealstream.settings import Settings


@pytest.mark.parametrize("value", ["", "short"])
def test_an_empty_or_short_fingerprint_secret_is_refused_not_replaced(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    """An empty `SEALSTREAM_GATEWAY__FINGERPRINT_SECRET` (a compose file passing an unset
    variable) used to fall back silently to the auth secret, so rotating that one then turned
    every retry of the window into a 409; a short one failed only when the gateway built it."""
    monkeypatch.setenv("SEALSTREAM_GATEWAY__FINGERPRINT_SECRET", value)
    with pytest.raises(ValidationError, match="fingerprint_secret"):
        Settings()


def test_a_fingerprint_secret_of_16_characters_or_none_is_accepted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SEALSTREAM_GATEWAY__FINGERPRINT_SECRET", "x" * 16)
    settings = Settings()
    assert settings.gateway.fingerprint_key(settings.auth) == b"x" * 16
    monkeypatch.delenv("SEALSTREAM_GATEWAY__FINGERPRINT_SECRET")
    settings = Settings()
    assert settings.gateway.fingerprint_key(settings.auth) == (
        settings.auth.secret.get_secret_value().encode()
    )
