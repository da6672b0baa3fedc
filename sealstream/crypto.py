"""Per-message envelope encryption for Sealstream (envelope formats v1 and v2).

This module and its sibling ``sealstream/file_crypto.py`` (attachment files, which use the
``ChatKey`` defined here) are the only ones in the project that touch HKDF, AES-GCM, salts or
nonces. The byte
format, derivation strings, check order and rationale are specified in ``docs/format.md``; the
test vectors in ``tests/vectors/envelope_v1.json`` and ``envelope_v2.json`` pin it down byte for
byte. Keep the three in step: any change to the bytes produced here needs a new format version,
not an edit of v1 or v2. :func:`seal` writes v2; :func:`open_envelope` opens both.

Summary (see docs/format.md for the normative text)::

    salt   = 16 random bytes per message
    ctx1   = chat_id(16) || message_id(8, BE) || dek_version(4, BE)
    ctx2   = ctx1 || revision(4, BE) || created_at_ms(8, BE) || len(sender)(2, BE) || sender(UTF-8)
    info   = b"sealstream/msg/vN" || ctxN
    okm    = HKDF-SHA256(ikm=DEK, salt=salt, info=info, L=64)
    key    = okm[:32]        (AES-256-GCM key, unique to this one seal)
    commit = okm[32:]        (key commitment, stored and checked before decrypting)
    aad    = b"sealstream/aad/vN" || N || ctxN
    envelope = N || dek_version(4, BE) || salt(16) || nonce(12) || commit(32) || ct||tag
"""

from __future__ import annotations

import base64
import hmac
import os
import struct
import uuid
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sealstream.errors import DecryptionError, InvalidMessage

__all__ = [
    "ENVELOPE_OVERHEAD",
    "FORMAT_V1",
    "FORMAT_V2",
    "FORMAT_VERSION",
    "HEADER_LEN",
    "MAX_DEK_VERSION",
    "MAX_PLAINTEXT_BYTES",
    "MAX_REVISION",
    "MAX_SENDER_ID_BYTES",
    "ChatKey",
    "IndexKey",
    "MessageContext",
    "MessageTooLarge",
    "envelope_dek_version",
    "envelope_format",
    "keyed_term",
    "open_envelope",
    "seal",
]

FORMAT_V1 = 0x01
"""First byte of a v1 envelope (binds chat, message id, DEK version): still opened, never written."""

FORMAT_V2 = 0x02
"""First byte of a v2 envelope, which also binds sender, revision and creation time."""

FORMAT_VERSION = FORMAT_V2
"""The format :func:`seal` writes; a future format gets a new byte and its own code path."""

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

MAX_REVISION = 2**31 - 1
"""Revisions are 1..2**31-1 (1 = as first sent; an edit raises it), a signed 32-bit column."""

MAX_CREATED_AT_MS = 2**63 - 1
"""Creation times are Unix milliseconds 0..2**63-1 (a Java long, a Cassandra timestamp)."""

MAX_SENDER_ID_BYTES = 1024
"""Longest sender id (UTF-8 bytes) a v2 envelope binds; the API allows 128 characters."""

_HEADER = struct.Struct(">BI16s12s32s")  # version | dek_version | salt | nonce | commitment
_VERSION_PREFIX = struct.Struct(">BI")  # version | dek_version
HEADER_LEN = _HEADER.size  # 65
ENVELOPE_OVERHEAD = HEADER_LEN + TAG_LEN  # 81
_MAX_ENVELOPE_LEN = ENVELOPE_OVERHEAD + MAX_PLAINTEXT_BYTES
_SALT_NONCE_LEN = SALT_LEN + NONCE_LEN

# Domain-separation labels: the version suffix keeps each format's keys and AADs apart, so an
# envelope relabelled to another format derives another key and fails its commitment check.
_INFO_LABEL = b"sealstream/msg/v1"
_AAD_LABEL = b"sealstream/aad/v1"
_CONTEXT = struct.Struct(">16sQI")  # chat_id | message_id | dek_version, shared by info and AAD
_AAD_PREFIX = _AAD_LABEL + bytes([FORMAT_V1])
_INFO_LABEL_V2 = b"sealstream/msg/v2"
_AAD_LABEL_V2 = b"sealstream/aad/v2"
# chat_id | message_id | dek_version | revision | created_at_ms | sender length; then the sender.
# The one variable-length field comes last and is length-prefixed, so the encoding is injective.
_CONTEXT_V2 = struct.Struct(">16sQIIQH")
_AAD_PREFIX_V2 = _AAD_LABEL_V2 + bytes([FORMAT_V2])

# The hash object is a stateless algorithm descriptor: sharing one instance caches nothing secret.
_SHA256 = hashes.SHA256()


class MessageTooLarge(InvalidMessage, ValueError):
    """The plaintext is longer than :data:`MAX_PLAINTEXT_BYTES` (catchable as ValueError too)."""


def _checked_key(kind: str, version: object, material: object, length: int) -> bytes:
    """`material` as immutable bytes, after checking a key's version (1..MAX_DEK_VERSION) and
    length. TypeError / ValueError naming `kind` and the field."""
    if isinstance(version, bool) or not isinstance(version, int):
        raise TypeError(f"{kind}.version must be an int")
    if not 1 <= version <= MAX_DEK_VERSION:
        raise ValueError(f"{kind}.version must be between 1 and {MAX_DEK_VERSION}")
    if not isinstance(material, (bytes, bytearray, memoryview)):
        raise TypeError(f"{kind}.material must be bytes")
    if len(material) != length:
        raise ValueError(f"{kind}.material must be exactly {length} bytes")
    return bytes(material)


@dataclass(frozen=True, repr=False)
class ChatKey:
    """One version of a chat's data-encryption key (DEK): 32 random bytes and its version number.

    The repr never shows the key bytes, so a key that ends up in a log line or a traceback's
    locals leaks nothing.
    """

    version: int
    material: bytes

    def __post_init__(self) -> None:
        # A private immutable copy, so a caller mutating its bytearray cannot change the key.
        object.__setattr__(
            self, "material", _checked_key("ChatKey", self.version, self.material, DEK_LEN)
        )

    def __repr__(self) -> str:
        return f"ChatKey(version={self.version}, material=<redacted>)"

    __str__ = __repr__


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"MessageContext.{name} must be an int")
    if not low <= value <= high:
        raise ValueError(f"MessageContext.{name} must be between {low} and {high}")


@dataclass(frozen=True)
class MessageContext:
    """Everything a message's envelope is bound to besides its key: where the message lives
    (chat, message id), who sent it, which revision of it this is, and when it was created.

    All five are required: a v2 envelope binds all of them, so a sealer and an opener must both
    say what they are (never "whatever the default is"). A v1 envelope binds only the two ids and
    stands for revision 1 only. `created_at_ms` is Unix time in milliseconds; Sealstream uses the
    message id's clock (`schemas.ids.id_millis`). Invalid values raise `TypeError` / `ValueError`
    naming the field and its limits.
    """

    chat_id: uuid.UUID
    message_id: int
    sender_id: str
    revision: int
    created_at_ms: int
    _sender: bytes = field(init=False, repr=False, compare=False)  # sender_id as UTF-8

    def __post_init__(self) -> None:
        if not isinstance(self.chat_id, uuid.UUID):
            raise TypeError("MessageContext.chat_id must be a uuid.UUID")
        if isinstance(self.message_id, bool) or not isinstance(self.message_id, int):
            raise TypeError("MessageContext.message_id must be an int")
        if not 0 <= self.message_id <= MAX_MESSAGE_ID:
            raise ValueError("MessageContext.message_id must be an unsigned 64-bit integer")
        if not isinstance(self.sender_id, str):
            raise TypeError("MessageContext.sender_id must be a str")
        try:
            sender = self.sender_id.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(
                "MessageContext.sender_id must be valid Unicode (no lone surrogates)"
            ) from None
        if not 1 <= len(sender) <= MAX_SENDER_ID_BYTES:
            raise ValueError(
                f"MessageContext.sender_id must be 1 to {MAX_SENDER_ID_BYTES} bytes of UTF-8"
            )
        _check_int("revision", self.revision, 1, MAX_REVISION)
        _check_int("created_at_ms", self.created_at_ms, 0, MAX_CREATED_AT_MS)
        object.__setattr__(self, "_sender", sender)  # encoded once, bound by every v2 seal/open


def _context_bytes(key: ChatKey, context: MessageContext) -> bytes:
    """v1: chat_id | message_id | dek_version (28 bytes)."""
    return _CONTEXT.pack(context.chat_id.bytes, context.message_id, key.version)


def _context_bytes_v2(key: ChatKey, context: MessageContext) -> bytes:
    """v2: the v1 fields, then revision | created_at_ms | sender length | sender (42 + n bytes)."""
    sender = context._sender
    return (
        _CONTEXT_V2.pack(
            context.chat_id.bytes,
            context.message_id,
            key.version,
            context.revision,
            context.created_at_ms,
            len(sender),
        )
        + sender
    )


def _derive(
    key: ChatKey, salt: bytes, ctx: bytes, label: bytes = _INFO_LABEL
) -> tuple[bytes, bytes]:
    """Return (AES-256-GCM key, commitment) for one seal; see docs/format.md, "Key derivation"."""
    # cryptography's one-shot HKDF measured faster than an hmac/hashlib hand-rolled HKDF (~3.9 µs
    # vs ~5.8 µs per call); the tests check it against an independent hmac-based HKDF.
    okm = HKDF(algorithm=_SHA256, length=64, salt=salt, info=label + ctx).derive(key.material)
    return okm[:32], okm[32:]


def _check_seal_inputs(plaintext: bytes, salt: bytes, nonce: bytes) -> None:
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


def _seal_with(
    plaintext: bytes, key: ChatKey, context: MessageContext, salt: bytes, nonce: bytes
) -> bytes:
    """Deterministic core of :func:`seal` (v2); only tests and the vector generator pass
    salt/nonce.

    Never call this with a fixed or reused salt in production code: the random salt is what makes
    every message key unique (see docs/format.md, "Why the salt is mandatory").
    """
    _check_seal_inputs(plaintext, salt, nonce)
    ctx = _context_bytes_v2(key, context)
    # Sender, revision and creation time go into the derivation as well as the AAD, so the
    # commitment is to the whole context: an envelope names one sender, revision and time, and a
    # copy moved to another one fails before any AES work (docs/format.md §10.2).
    message_key, commitment = _derive(key, salt, ctx, _INFO_LABEL_V2)
    header = _HEADER.pack(FORMAT_V2, key.version, salt, nonce, commitment)
    return header + AESGCM(message_key).encrypt(nonce, plaintext, _AAD_PREFIX_V2 + ctx)


def _seal_v1_with(
    plaintext: bytes, key: ChatKey, context: MessageContext, salt: bytes, nonce: bytes
) -> bytes:
    """A v1 envelope (binds chat, message id, DEK version only). Tests and the v1 vector
    generator only: production code writes v2, and v1 exists at rest only from before v2."""
    _check_seal_inputs(plaintext, salt, nonce)
    ctx = _context_bytes(key, context)
    message_key, commitment = _derive(key, salt, ctx)
    header = _HEADER.pack(FORMAT_V1, key.version, salt, nonce, commitment)
    # The AAD binds the format version and the row's ids, so a ciphertext moved elsewhere fails.
    return header + AESGCM(message_key).encrypt(nonce, plaintext, _AAD_PREFIX + ctx)


def seal(plaintext: bytes, key: ChatKey, context: MessageContext) -> bytes:
    """Encrypt ``plaintext`` for the message at ``context`` under ``key``; returns a v2 envelope
    bound to the chat, message id, sender, revision, creation time and DEK version.

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
    is bound into both the key derivation and the AAD. Works for v1 and v2 (same header layout).
    Raises :class:`DecryptionError` if the envelope is malformed (too short, too long, unknown
    format version, version out of range).
    """
    try:
        parsed = _parse_header(envelope)
    except Exception:  # noqa: BLE001 - any parse failure is the one opaque DecryptionError
        parsed = None
    if parsed is None:
        # Raised outside the except block so the exception carries no __context__ at all.
        raise DecryptionError() from None
    return parsed[1]


def envelope_format(envelope: bytes) -> int:
    """Return an envelope's format byte (:data:`FORMAT_V1` or :data:`FORMAT_V2`), e.g. for the
    re-encryption job to find v1 rows to upgrade. Public, like the DEK version, and not trusted
    on its own: each format derives its own key, so a relabelled envelope does not open. Raises
    :class:`DecryptionError` on a malformed header, as :func:`envelope_dek_version` does."""
    try:
        parsed = _parse_header(envelope)
    except Exception:  # noqa: BLE001 - any parse failure is the one opaque DecryptionError
        parsed = None
    if parsed is None:
        raise DecryptionError() from None
    return parsed[0]


def open_envelope(envelope: bytes, key: ChatKey, context: MessageContext) -> bytes:
    """Decrypt and authenticate an envelope sealed for ``context`` under ``key``.

    The format comes from the envelope's first byte, and each format is checked for what it
    binds: v2 for chat, message id, sender, revision, creation time and DEK version; v1 for chat,
    message id and DEK version, and only as revision 1 (a v1 envelope cannot stand for an edited
    message: that would be a downgrade). Every failure (wrong key, wrong DEK version, wrong or
    swapped ids, another sender, revision or time, truncation, unknown format version, any
    tampered bit) raises the same argument-less :class:`DecryptionError` with no ``__cause__`` and
    no ``__context__``, so nothing about the reason leaks to the caller or logs.
    """
    try:
        plaintext = _open(envelope, key, context)
    except Exception:  # noqa: BLE001 - InvalidTag and every parse error become DecryptionError
        plaintext = None
    if plaintext is None:
        # Raised outside the except block so the exception carries no __context__ at all.
        raise DecryptionError() from None
    return plaintext


def _is_bytes_like(value: object) -> bool:
    return isinstance(value, (bytes, bytearray, memoryview))


def _parse_header(envelope: bytes) -> tuple[int, int] | None:
    """(format byte, DEK version) of a well-formed v1 or v2 header, else None."""
    if not _is_bytes_like(envelope):
        return None
    # Bound the length first: shorter cannot hold a header and tag, longer than any seal makes.
    if not ENVELOPE_OVERHEAD <= len(envelope) <= _MAX_ENVELOPE_LEN:
        return None
    version_byte, dek_version = _VERSION_PREFIX.unpack_from(envelope, 0)
    # Only the formats listed here are understood; any other byte is never guessed at.
    if version_byte not in (FORMAT_V1, FORMAT_V2) or not 1 <= dek_version <= MAX_DEK_VERSION:
        return None
    return int(version_byte), int(dek_version)


def _open(envelope: bytes, key: ChatKey, context: MessageContext) -> bytes | None:
    """Return the plaintext, or None (or raise) on failure; the caller maps both to one error."""
    # Same checks as envelope_dek_version: length bounds, format byte, DEK version range.
    parsed = _parse_header(envelope)
    if parsed is None or parsed[1] != key.version:
        # The header's DEK version is public, so rejecting a mismatch early leaks nothing.
        return None
    if parsed[0] == FORMAT_V2:
        ctx = _context_bytes_v2(key, context)
        label, aad_prefix = _INFO_LABEL_V2, _AAD_PREFIX_V2
    else:
        # v1 binds no revision, so it stands for the first one only: an edited message (revision
        # > 1) offered as v1 is a downgrade and fails. Sender and time are not bound by v1.
        if context.revision != 1:
            return None
        ctx = _context_bytes(key, context)
        label, aad_prefix = _INFO_LABEL, _AAD_PREFIX
    _, _, salt, nonce, commitment = _HEADER.unpack_from(envelope, 0)
    message_key, expected = _derive(key, salt, ctx, label)
    # Key commitment, compared in constant time before any decryption: an envelope can then only
    # ever open under the one key and context that sealed it (no "invisible salamanders").
    if not hmac.compare_digest(commitment, expected):
        return None
    # GCM checks the tag over nonce, AAD and ciphertext before returning anything (InvalidTag).
    return AESGCM(message_key).decrypt(nonce, envelope[HEADER_LEN:], aad_prefix + ctx)


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
        object.__setattr__(
            self,
            "material",
            _checked_key("IndexKey", self.version, self.material, INDEX_KEY_LEN),
        )
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
