"""Vault / OpenBao Transit adapter: the KMS that generates, wraps and rewraps chat DEKs.

Master keys are created with `derived=true`, so every operation must present a context; we pass
the chat id and DEK version, which binds each wrapped DEK to its row (a copy moved to another chat
does not unwrap). Transient failures (server down, sealed, 5xx, 429) are retried with backoff and
then raised as `KmsUnavailable`; auth, permission and bad-ciphertext errors raise `KmsError` at once.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any, TypeVar

import hvac
import hvac.exceptions
import requests
from tenacity import (
    RetryError,
    Retrying,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential,
)

from sealstream.errors import KmsError, KmsKeyUnusable, KmsUnavailable
from sealstream.keys.ports import DataKey
from sealstream.metrics import KMS_CALLS
from sealstream.settings import VaultSettings

T = TypeVar("T")

_TRANSIENT: tuple[type[BaseException], ...] = (
    requests.exceptions.ConnectionError,
    requests.exceptions.Timeout,
    hvac.exceptions.VaultDown,
    hvac.exceptions.InternalServerError,
    hvac.exceptions.BadGateway,
    hvac.exceptions.RateLimitExceeded,
)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class TransitKms:
    """The `Kms` port on the Transit secrets engine of Vault or OpenBao."""

    def __init__(
        self, settings: VaultSettings, retry_seconds: float = 5.0, timeout: float = 5.0
    ) -> None:
        self.settings = settings
        self.retry_seconds = retry_seconds
        self._client = hvac.Client(
            url=settings.address,
            token=settings.resolved_token().get_secret_value(),
            timeout=timeout,
        )
        self._mount = settings.transit_mount

    def _call(self, op: str, fn: Callable[[], T]) -> T:
        KMS_CALLS.labels(op=op).inc()
        retrying = Retrying(
            retry=retry_if_exception_type(_TRANSIENT),
            stop=stop_after_delay(self.retry_seconds),
            wait=wait_exponential(multiplier=0.05, max=1.0),
            reraise=False,
        )
        try:
            return retrying(fn)
        except RetryError as exc:
            cause = exc.last_attempt.exception()
            raise KmsUnavailable(
                f"KMS at {self.settings.address} unavailable for {op} after "
                f"{self.retry_seconds:.0f}s of retries ({type(cause).__name__})"
            ) from None
        except (hvac.exceptions.Unauthorized, hvac.exceptions.Forbidden) as exc:
            raise KmsError(
                f"KMS refused {op}: {type(exc).__name__} - check the token and its policy "
                f"(needs transit {op} on mount '{self._mount}')"
            ) from None
        except hvac.exceptions.InvalidRequest as exc:
            # Transit answers 400 about the key or ciphertext named in the request ("encryption
            # key not found", "message authentication failed" when the context does not match,
            # "invalid ciphertext"): that one key is unusable, the KMS itself works.
            raise KmsKeyUnusable(f"KMS rejected {op}: {_first_error(exc)}") from None
        except hvac.exceptions.InvalidPath:
            raise KmsError(f"KMS has no such key or mount for {op}") from None
        except hvac.exceptions.VaultError as exc:
            # Any other refusal (e.g. an unexpected status for a malformed key path) is not a
            # server being down: permanent, by type only (its message may quote the request).
            raise KmsError(f"KMS refused {op} ({type(exc).__name__})") from None

    def ensure_key(self, key_name: str) -> None:
        def create() -> None:
            try:
                self._client.secrets.transit.read_key(name=key_name, mount_point=self._mount)
            except hvac.exceptions.InvalidPath:
                self._client.secrets.transit.create_key(
                    name=key_name, key_type="aes256-gcm96", derived=True, mount_point=self._mount
                )

        self._call("ensure_key", create)

    def generate_data_key(self, key_name: str, context: bytes) -> DataKey:
        response: dict[str, Any] = self._call(
            "datakey",
            lambda: self._client.secrets.transit.generate_data_key(
                name=key_name,
                key_type="plaintext",
                bits=256,
                context=_b64(context),
                mount_point=self._mount,
            ),
        )
        data = response["data"]
        return DataKey(plaintext=base64.b64decode(data["plaintext"]), wrapped=data["ciphertext"])

    def unwrap(self, key_name: str, wrapped: str, context: bytes) -> bytes:
        response: dict[str, Any] = self._call(
            "decrypt",
            lambda: self._client.secrets.transit.decrypt_data(
                name=key_name, ciphertext=wrapped, context=_b64(context), mount_point=self._mount
            ),
        )
        return base64.b64decode(response["data"]["plaintext"])

    def rewrap(self, key_name: str, wrapped: str, context: bytes) -> str:
        response: dict[str, Any] = self._call(
            "rewrap",
            lambda: self._client.secrets.transit.rewrap_data(
                name=key_name, ciphertext=wrapped, context=_b64(context), mount_point=self._mount
            ),
        )
        return str(response["data"]["ciphertext"])

    def rewrap_batch(self, key_name: str, items: list[tuple[str, bytes]]) -> list[str]:
        """Rewrap many DEKs in one request; the plaintext never leaves the KMS."""
        if not items:
            return []
        batch = [{"ciphertext": w, "context": _b64(c)} for w, c in items]
        response: dict[str, Any] = self._call(
            "rewrap_batch",
            lambda: self._client.secrets.transit.rewrap_data(
                name=key_name, ciphertext="", batch_input=batch, mount_point=self._mount
            ),
        )
        results = response["data"]["batch_results"]
        errors = [r["error"] for r in results if r.get("error")]
        if errors:
            raise KmsError(f"KMS rewrap failed for {len(errors)} of {len(items)}: {errors[0]}")
        return [str(r["ciphertext"]) for r in results]

    def rotate_master_key(self, key_name: str) -> int:
        self._call(
            "rotate",
            lambda: self._client.secrets.transit.rotate_key(name=key_name, mount_point=self._mount),
        )
        return self.latest_version(key_name)

    def latest_version(self, key_name: str) -> int:
        info: dict[str, Any] = self._call(
            "read_key",
            lambda: self._client.secrets.transit.read_key(name=key_name, mount_point=self._mount),
        )
        return int(info["data"]["latest_version"])

    def set_min_decryption_version(self, key_name: str, version: int) -> None:
        """Retire older master-key versions: ciphertexts wrapped by them no longer unwrap."""
        self._call(
            "config",
            lambda: self._client.secrets.transit.update_key_configuration(
                name=key_name, min_decryption_version=version, mount_point=self._mount
            ),
        )

    def delete_key(self, key_name: str) -> None:
        """Tests only: remove a run's master key (Transit needs deletion_allowed first)."""

        def delete() -> None:
            self._client.secrets.transit.update_key_configuration(
                name=key_name, deletion_allowed=True, mount_point=self._mount
            )
            self._client.secrets.transit.delete_key(name=key_name, mount_point=self._mount)

        self._call("delete_key", delete)


def _first_error(exc: hvac.exceptions.VaultError) -> str:
    errors = getattr(exc, "errors", None) or [str(exc)]
    text = str(errors[0])
    # hvac appends "on post http://..." ; keep only Vault's own words.
    return text.split(", on ")[0][:200]
