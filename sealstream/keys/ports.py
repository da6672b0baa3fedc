"""The KMS port: what the key service needs from a key-management system, and its value types."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True, repr=False)
class DataKey:
    """A fresh DEK as the KMS returns it: the plaintext (memory only) and its wrapped form."""

    plaintext: bytes = field(repr=False)
    wrapped: str

    def __repr__(self) -> str:
        return "DataKey(plaintext=<redacted>, wrapped=<...>)"


class Kms(Protocol):
    """Envelope encryption with a master key (CMK) that never leaves the KMS.

    `context` binds a wrapped DEK to its chat and version: unwrapping with another context fails.
    """

    def ensure_key(self, key_name: str) -> None: ...

    def generate_data_key(self, key_name: str, context: bytes) -> DataKey: ...

    def unwrap(self, key_name: str, wrapped: str, context: bytes) -> bytes: ...

    def rewrap(self, key_name: str, wrapped: str, context: bytes) -> str: ...

    def rewrap_batch(self, key_name: str, items: list[tuple[str, bytes]]) -> list[str]: ...

    def rotate_master_key(self, key_name: str) -> int: ...
