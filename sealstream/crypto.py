"""Per-message envelope encryption for Sealstream (envelope format v1).

This is the only module in the project that touches HKDF, AES-GCM, salts or nonces. The byte
format, derivation strings, check order and rationale are specified in ``docs/format.md``; the
test vectors in ``tests/vectors/envelope_v1.json`` pin it down byte for byte. Keep the three in
step: any change to the bytes produced here needs a new format version, not an edit of v1.

Summary of v1 (see docs/format.md for the normative text)::

    salt   = 16 random bytes per message
    info   = b"sealstream/msg/v1" || chat_id(16) || message_id(8, BE) || dek_version(4, BE)
    okm    = HKDF-SHA256(ikm=DEK, salt=salt, info=info, L=64)
    key    = okm[:32]        (AES-256-GCM key, unique to this one seal)
    commit = okm[32:]        (key commitment, stored and checked before decrypting)
    aad    = b"sealstream/aad/v1" || 0x01 || chat_id(16) || message_id(8, BE) || dek_version(4, BE)
    envelope = 0x01 || dek_version(4, BE) || salt(16) || nonce(12) || commit(32) || ct||tag
"""

from __future__ import annotations

import base64
import hmac
import os
import struct
import uuid
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sealstream.errors import DecryptionError, InvalidMessage

__all__ = [
    "ENVELOPE_OVERHEAD",
    "FORMAT_VERSION",
    "HEADER_LEN",
    "MAX_DEK_VERSION",
    "MAX_PLAINTEXT_BYTES",
    "ChatKey",
    "IndexKey",
    "MessageContext",
    "MessageTooLarge",
    "envelope_dek_version",
    "keyed_term",
    "open_envelope",
    "seal",
]

FORMAT_VERSION = 0x01
"""First byte of every v1 envelope; a future format gets a new byte and its own code path."""

MAX_PLAINTEXT_BYTES = 65536
"""Largest plaintext (64 KiB) that :func:`seal` accepts; bounds memory and work per message."""

DEK_LEN = 32
SALT_LEN = 16
NONCE_LEN = 12
COMMITMENT_LEN = 32
TAG_LEN = 16

MAX_DEK_VERSION = 2**31 - 1
"""DEK versions are 1..2**31-1 so they fit a signed 32-bit column everywhere they are stored."""

MAX_MESSAGE_ID = 2**64 - 1

_HEADER = struct.Struct(">BI16s12s32s")  # version | dek_version | salt | nonce | commitment
_VERSION_PREFIX = struct.Struct(">BI")  # version | dek_version
HEADER_LEN = _HEADER.size  # 65
ENVELOPE_OVERHEAD = HEADER_LEN + TAG_LEN  # 81
_MAX_ENVELOPE_LEN = ENVELOPE_OVERHEAD + MAX_PLAINTEXT_BYTES
_SALT_NONCE_LEN = SALT_LEN + NONCE_LEN

# Domain-separation labels: the version suffix keeps v1 keys and AADs apart from any later format.
_INFO_LABEL = b"sealstream/msg/v1"
_AAD_LABEL = b"sealstream/aad/v1"
_CONTEXT = struct.Struct(">16sQI")  # chat_id | message_id | dek_version, shared by info and AAD
_AAD_PREFIX = _AAD_LABEL + bytes([FORMAT_VERSION])

# The hash object is a stateless algorithm descriptor: sharing one instance caches nothing secret.
_SHA256 = hashes.SHA256()


class MessageTooLarge(InvalidMessage, ValueError):
    """The plaintext is longer than :data:`MAX_PLAINTEXT_BYTES` (catchable as ValueError too)."""


@dataclass(frozen=True, repr=False)
class ChatKey:
    """One version of a chat's data-encryption key (DEK): 32 random bytes and its version number.

    The repr never shows the key bytes, so a key that ends up in a log line or a traceback's
    locals leaks nothing.
    """

    version: int
    material: bytes

    def __post_init__(self) -> None:
        if isinstance(self.version, bool) or not isinstance(self.version, int):
            raise TypeError("ChatKey.version must be an int")
        if not 1 <= self.version <= MAX_DEK_VERSION:
            raise ValueError(f"ChatKey.version must be between 1 and {MAX_DEK_VERSION}")
        if not _is_bytes_like(self.material):
            raise TypeError("ChatKey.material must be bytes")
        if len(self.material) != DEK_LEN:
            raise ValueError(f"ChatKey.material must be exactly {DEK_LEN} bytes")
        # Freeze a private immutable copy so a caller mutating its bytearray cannot change the key.
        object.__setattr__(self, "material", bytes(self.material))

    def __repr__(self) -> str:
        return f"ChatKey(version={self.version}, material=<redacted>)"

    __str__ = __repr__


@dataclass(frozen=True)
class MessageContext:
    """Where a message lives: the ids that are bound into its key and its AAD."""

    chat_id: uuid.UUID
    message_id: int

    def __post_init__(self) -> None:
        if not isinstance(self.chat_id, uuid.UUID):
            raise TypeError("MessageContext.chat_id must be a uuid.UUID")
        if isinstance(self.message_id, bool) or not isinstance(self.message_id, int):
            raise TypeError("MessageContext.message_id must be an int")
        if not 0 <= self.message_id <= MAX_MESSAGE_ID:
            raise ValueError("MessageContext.message_id must be an unsigned 64-bit integer")


def _context_bytes(key: ChatKey, context: MessageContext) -> bytes:
    return _CONTEXT.pack(context.chat_id.bytes, context.message_id, key.version)


def _derive(key: ChatKey, salt: bytes, ctx: bytes) -> tuple[bytes, bytes]:
    """Return (AES-256-GCM key, commitment) for one seal; see docs/format.md, "Key derivation"."""
    # cryptography's one-shot HKDF measured faster than an hmac/hashlib hand-rolled HKDF (~3.9 µs
    # vs ~5.8 µs per call); the tests check it against an independent hmac-based HKDF.
    okm = HKDF(algorithm=_SHA256, length=64, salt=salt, info=_INFO_LABEL + ctx).derive(key.material)
    return okm[:32], okm[32:]


def _seal_with(
    plaintext: bytes, key: ChatKey, context: MessageContext, salt: bytes, nonce: bytes
) -> bytes:
    """Deterministic core of :func:`seal`; only tests and the vector generator pass salt/nonce.

    Never call this with a fixed or reused salt in production code: the random salt is what makes
    every message key unique (see docs/format.md, "Why the salt is mandatory").
    """
    if not _is_bytes_like(plaintext):
        raise TypeError("plaintext must be bytes")
    size = len(plaintext)
    if size > MAX_PLAINTEXT_BYTES:
        # Names the limit and the size only; the text itself never goes into an exception.
        raise MessageTooLarge(
            f"plaintext is {size} bytes; the limit is {MAX_PLAINTEXT_BYTES} bytes"
        )
    if len(salt) != SALT_LEN or len(nonce) != NONCE_LEN:
        raise ValueError(f"salt must be {SALT_LEN} bytes and nonce {NONCE_LEN} bytes")
    ctx = _context_bytes(key, context)
    message_key, commitment = _derive(key, salt, ctx)
    header = _HEADER.pack(FORMAT_VERSION, key.version, salt, nonce, commitment)
    # The AAD binds the format version and the row's ids, so a ciphertext moved elsewhere fails.
    return header + AESGCM(message_key).encrypt(nonce, plaintext, _AAD_PREFIX + ctx)


def seal(plaintext: bytes, key: ChatKey, context: MessageContext) -> bytes:
    """Encrypt ``plaintext`` for the message at ``context`` under ``key``; returns a v1 envelope.

    Every call draws a fresh random salt (so a fresh message key) and a fresh random nonce, so two
    seals of the same text for the same row differ. Raises :class:`MessageTooLarge` (an
    ``InvalidMessage`` and a ``ValueError``) above :data:`MAX_PLAINTEXT_BYTES`.
    """
    # One read from the OS CSPRNG for salt and nonce together: fresh randomness for every message.
    rnd = os.urandom(_SALT_NONCE_LEN)
    return _seal_with(plaintext, key, context, rnd[:SALT_LEN], rnd[SALT_LEN:])


def envelope_dek_version(envelope: bytes) -> int:
    """Return the DEK version named in an envelope's header, so the reader can fetch that key.

    The value is not trusted on its own: :func:`open_envelope` re-checks it against the key and it
    is bound into both the key derivation and the AAD. Raises :class:`DecryptionError` if the
    envelope is malformed (too short, too long, unknown format version, version out of range).
    """
    try:
        dek_version = _parse_dek_version(envelope)
    except Exception:  # noqa: BLE001 - any parse failure is the one opaque DecryptionError
        dek_version = None
    if dek_version is None:
        # Raised outside the except block so the exception carries no __context__ at all.
        raise DecryptionError() from None
    return dek_version


def open_envelope(envelope: bytes, key: ChatKey, context: MessageContext) -> bytes:
    """Decrypt and authenticate a v1 envelope sealed for ``context`` under ``key``.

    Every failure (wrong key, wrong DEK version, wrong or swapped ids, truncation, unknown format
    version, any tampered bit) raises the same argument-less :class:`DecryptionError` with no
    ``__cause__`` and no ``__context__``, so nothing about the reason leaks to the caller or logs.
    """
    try:
        plaintext = _open_v1(envelope, key, context)
    except Exception:  # noqa: BLE001 - InvalidTag and every parse error become DecryptionError
        plaintext = None
    if plaintext is None:
        # Raised outside the except block so the exception carries no __context__ at all.
        raise DecryptionError() from None
    return plaintext


def _is_bytes_like(value: object) -> bool:
    return isinstance(value, (bytes, bytearray, memoryview))


def _parse_dek_version(envelope: bytes) -> int | None:
    if not _is_bytes_like(envelope):
        return None
    # Bound the length first: shorter cannot hold a header and tag, longer than any seal makes.
    if not ENVELOPE_OVERHEAD <= len(envelope) <= _MAX_ENVELOPE_LEN:
        return None
    version_byte, dek_version = _VERSION_PREFIX.unpack_from(envelope, 0)
    # Only v1 is understood here; a v2 envelope must go to a v2 reader, never be guessed at.
    if version_byte != FORMAT_VERSION or not 1 <= dek_version <= MAX_DEK_VERSION:
        return None
    return int(dek_version)


def _open_v1(envelope: bytes, key: ChatKey, context: MessageContext) -> bytes | None:
    """Return the plaintext, or None (or raise) on failure; the caller maps both to one error."""
    # Same checks as envelope_dek_version: length bounds, format byte, DEK version range.
    if _parse_dek_version(envelope) != key.version:
        # The header's DEK version is public, so rejecting a mismatch early leaks nothing.
        return None
    _, _, salt, nonce, commitment = _HEADER.unpack_from(envelope, 0)
    ctx = _context_bytes(key, context)
    message_key, expected = _derive(key, salt, ctx)
    # Key commitment, compared in constant time before any decryption: an envelope can then only
    # ever open under the one key that sealed it (no "invisible salamanders").
    if not hmac.compare_digest(commitment, expected):
        return None
    # GCM checks the tag over nonce, AAD and ciphertext before returning anything (InvalidTag).
    return AESGCM(message_key).decrypt(nonce, envelope[HEADER_LEN:], _AAD_PREFIX + ctx)


_FINGERPRINT_INFO = b"sealstream idempotency fingerprint v1"


class TextFingerprints:
    """Keyed fingerprints of message texts: HMAC-SHA256 under a key derived (HKDF-SHA256, own
    `info` label) from a server secret. The gateway stores them to tell a retry (same text) from
    a conflicting reuse of a client message id; a plain hash would let whoever reads the claim
    table confirm guessed texts (a dictionary attack), a keyed one needs the secret too. Each
    fingerprint is bound to its `context` (the gateway's: chat, sender, client message id), so
    equal texts of other claims do not show: without it, a participant who reads the table
    could post a guess and compare fingerprints, confirming it without the key."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("the fingerprint secret must be at least 16 bytes")
        self._key = HKDF(algorithm=_SHA256, length=32, salt=None, info=_FINGERPRINT_INFO).derive(
            secret
        )

    def of(self, text: str, context: str) -> bytes:
        """32 bytes; `text` and `context` must be valid UTF-8 (checked by the gateway before)."""
        bound = context.encode("utf-8")
        return hmac.new(
            self._key, len(bound).to_bytes(4, "big") + bound + text.encode("utf-8"), "sha256"
        ).digest()


# --- blind index tokens (docs/format.md, "Blind index tokens") ---------------------------------

INDEX_KEY_LEN = 32
INDEX_TOKEN_BYTES = 16
"""HMAC-SHA256 output kept per token: 128 bits (docs/format.md explains the length)."""

_INDEX_TERM_LABEL = b"sealstream/index-term/v1"
_INDEX_TERM_HEADER = struct.Struct(">H")  # tenant id length (UTF-8 bytes)
_INDEX_TERM_VERSION = struct.Struct(">I")


@dataclass(frozen=True, repr=False)
class IndexKey:
    """One version of a tenant's blind-index key: 32 random bytes from the KMS, memory only.

    Like :class:`ChatKey`, its repr never shows the key bytes."""

    tenant_id: str
    version: int
    material: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.tenant_id, str) or not 1 <= len(self.tenant_id.encode()) <= 255:
            raise ValueError("IndexKey.tenant_id must be 1 to 255 UTF-8 bytes")
        if isinstance(self.version, bool) or not isinstance(self.version, int):
            raise TypeError("IndexKey.version must be an int")
        if not 1 <= self.version <= MAX_DEK_VERSION:
            raise ValueError(f"IndexKey.version must be between 1 and {MAX_DEK_VERSION}")
        if not _is_bytes_like(self.material):
            raise TypeError("IndexKey.material must be bytes")
        if len(self.material) != INDEX_KEY_LEN:
            raise ValueError(f"IndexKey.material must be exactly {INDEX_KEY_LEN} bytes")
        object.__setattr__(self, "material", bytes(self.material))
        tenant = self.tenant_id.encode("utf-8")
        # The message prefix binds the label, the tenant and the key version (fixed per key).
        prefix = (
            _INDEX_TERM_LABEL
            + _INDEX_TERM_HEADER.pack(len(tenant))
            + tenant
            + _INDEX_TERM_VERSION.pack(self.version)
        )
        object.__setattr__(self, "_prefix", prefix)

    def __repr__(self) -> str:
        return (
            f"IndexKey(tenant_id={self.tenant_id!r}, version={self.version}, material=<redacted>)"
        )

    __str__ = __repr__


def keyed_term(key: IndexKey, term: str) -> str:
    """The blind-index token of one index term: what OpenSearch holds instead of the word.

    ``base64url(HMAC-SHA256(key, "sealstream/index-term/v1" || len(tenant) (2, BE) || tenant ||
    key version (4, BE) || term (UTF-8))[:16])`` without padding: 22 ASCII characters. The term
    must already be normalised (NFKC + case folding, accent folding for the folded form): equal
    words give equal tokens only under the same tenant and key version.
    """
    if not isinstance(term, str):
        raise TypeError("term must be a str")
    prefix: bytes = object.__getattribute__(key, "_prefix")
    mac = hmac.new(key.material, prefix + term.encode("utf-8"), "sha256").digest()
    return base64.urlsafe_b64encode(mac[:INDEX_TOKEN_BYTES]).rstrip(b"=").decode("ascii")
