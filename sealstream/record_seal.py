"""Sealed Kafka records: the AEAD over a message-topic record's value, and its sealer / opener.

The only module that touches the nonces and AES-GCM of Kafka records (chat envelopes are in
``sealstream.crypto``). The normative format is docs/format.md, "Sealed Kafka records"; the
vectors in ``tests/vectors/record_seal_v1.json`` pin it byte for byte. Summary::

    key      = the topic data key of the key id (32 bytes, AES-256-GCM), from the KMS
    nonce    = 12 random bytes per record
    aad      = b"sealstream/record/v1" || 0x01 || len(key_id) (1) || key_id (ASCII)
               || len(topic) (2, BE) || topic (ASCII) || len(record key) (4, BE) || record key
               || event_id (8, BE)
    sealed   = 0x01 || nonce (12) || AES-256-GCM(key, nonce, value, aad) (ciphertext || tag 16)
    headers  = sealstream.key_id: key_id (ASCII); sealstream.event_id: event id (decimal ASCII)

Producers call ``RecordSealer.seal``, consumers ``RecordOpener.open``; both get their topic keys
from a ``TopicKeySource`` (``sealstream.keys.topic_keys.TopicKeys``: KMS-made, wrapped in
Postgres, plaintext in this process's memory only). ``record_sealer`` / ``record_opener`` build
them on the real adapters from settings.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sealstream.errors import SealRefused, StoreUnavailable

if TYPE_CHECKING:
    from sealstream.adapters.postgres import Database
    from sealstream.keys.topic_keys import TopicKeys
    from sealstream.settings import Settings

__all__ = [
    "HEADER_EVENT_ID",
    "HEADER_KEY_ID",
    "RECORD_FORMAT_V1",
    "SEALED_OVERHEAD",
    "RecordOpener",
    "RecordSealer",
    "SealRefused",
    "StoreUnavailable",
    "TopicKey",
    "TopicKeySource",
    "has_sealed_format",
    "is_sealed",
    "open_record",
    "record_aad",
    "record_opener",
    "record_sealer",
    "seal_record",
    "sealed_event_id",
    "sealed_key_id",
]

HEADER_KEY_ID = "sealstream.key_id"
"""Kafka header naming the topic key a record is sealed under (ASCII key id)."""

HEADER_EVENT_ID = "sealstream.event_id"
"""Kafka header holding the record's event id (decimal ASCII): a post's message id, an edit's
or deletion's event id (`MessageRecord.change_id`). Bound by the AAD, so the opener needs it
before decrypting; the consumer checks it against the decoded record after."""

RECORD_FORMAT_V1 = 0x01
"""First byte of a sealed record value (format v1). A new format gets a new byte."""

TOPIC_KEY_LEN = 32
NONCE_LEN = 12
TAG_LEN = 16
SEALED_OVERHEAD = 1 + NONCE_LEN + TAG_LEN
"""Bytes a sealed value adds to the plaintext value (29)."""

MAX_EVENT_ID = 2**63 - 1
MAX_KEY_ID_LEN = 64
MAX_TOPIC_LEN = 249  # Kafka's own limit on topic names
_KEY_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")
_EVENT_ID = re.compile(r"[1-9][0-9]{0,18}")

_AAD_LABEL = b"sealstream/record/v1"
_VERSION_BYTE = bytes((RECORD_FORMAT_V1,))
_EVENT = struct.Struct(">Q")


@dataclass(frozen=True, repr=False)
class TopicKey:
    """One topic data key: its id, its topic and the 32 key bytes (memory only; redacted repr)."""

    key_id: str
    topic: str
    material: bytes

    def __post_init__(self) -> None:
        _check_key_id(self.key_id)
        _check_topic(self.topic)
        if not isinstance(self.material, (bytes, bytearray)) or len(self.material) != 32:
            raise ValueError(f"TopicKey.material must be exactly {TOPIC_KEY_LEN} bytes")
        object.__setattr__(self, "material", bytes(self.material))
        # Built once per key, not per record: the key schedule is the costly part of AESGCM().
        object.__setattr__(self, "_aead", AESGCM(self.material))
        # The AAD up to the record key is the same for every record of this key's own topic.
        object.__setattr__(self, "_aad_head", _aad_head(self.topic, self.key_id))

    def __repr__(self) -> str:
        return f"TopicKey(key_id={self.key_id!r}, topic={self.topic!r}, material=<redacted>)"

    __str__ = __repr__


def _check_key_id(key_id: object) -> None:
    if not isinstance(key_id, str) or not _KEY_ID.fullmatch(key_id):
        raise ValueError("key_id must be 1 to 64 characters of [A-Za-z0-9._-]")


def _check_topic(topic: object) -> None:
    if not isinstance(topic, str) or not _TOPIC.fullmatch(topic):
        raise ValueError("topic must be a Kafka topic name: 1 to 249 characters of [A-Za-z0-9._-]")


def _check_event_id(event_id: object) -> None:
    if isinstance(event_id, bool) or not isinstance(event_id, int):
        raise TypeError("event_id must be an int")
    if not 1 <= event_id <= MAX_EVENT_ID:
        raise ValueError(f"event_id must be between 1 and {MAX_EVENT_ID}")


def _aad_head(topic: str, key_id: str) -> bytes:
    key_id_bytes = key_id.encode("ascii")
    topic_bytes = topic.encode("ascii")
    return b"".join(
        (
            _AAD_LABEL,
            bytes((RECORD_FORMAT_V1, len(key_id_bytes))),
            key_id_bytes,
            len(topic_bytes).to_bytes(2, "big"),
            topic_bytes,
        )
    )


def _aad_for(key: TopicKey, topic: str, record_key: bytes, event_id: int) -> bytes:
    head: bytes = (
        object.__getattribute__(key, "_aad_head")
        if topic == key.topic
        else _aad_head(topic, key.key_id)
    )
    return head + len(record_key).to_bytes(4, "big") + record_key + _EVENT.pack(event_id)


def record_aad(topic: str, key_id: str, record_key: bytes, event_id: int) -> bytes:
    """The associated data of a v1 sealed record (docs/format.md). Every variable-length field
    is length-prefixed, so two different bindings never encode to the same bytes.

    What it binds and why: the format version (a value relabelled to another format fails), the
    key id (a value re-labelled with another key's header fails), the topic (a record copied to
    another topic fails), the record key (moved to another chat, i.e. partition key, fails) and
    the event id (replayed under another message's id fails)."""
    return (
        _aad_head(topic, key_id)
        + len(record_key).to_bytes(4, "big")
        + record_key
        + _EVENT.pack(event_id)
    )


def _seal_record_with(
    key: TopicKey, topic: str, record_key: bytes, event_id: int, value: bytes, nonce: bytes
) -> bytes:
    """Deterministic core of :func:`seal_record`: tests and the vector generator only. Never
    pass a fixed or reused nonce elsewhere: GCM under a repeated nonce loses its secrecy and
    its integrity."""
    if topic != key.topic:  # the key's own topic was checked when the key was made
        _check_topic(topic)
    _check_event_id(event_id)
    if not isinstance(record_key, (bytes, bytearray)):
        raise TypeError("record key must be bytes")
    if not isinstance(value, (bytes, bytearray)):
        raise TypeError("value must be bytes")
    if len(nonce) != NONCE_LEN:
        raise ValueError(f"nonce must be {NONCE_LEN} bytes")
    aad = _aad_for(key, topic, bytes(record_key), event_id)
    aead: AESGCM = object.__getattribute__(key, "_aead")
    return _VERSION_BYTE + nonce + aead.encrypt(nonce, bytes(value), aad)


def seal_record(key: TopicKey, topic: str, record_key: bytes, event_id: int, value: bytes) -> bytes:
    """Seal one record value (v1) under `key`, bound to `topic`, `record_key` and `event_id`.

    The nonce is 12 fresh random bytes per record: topic keys rotate every slot (an hour by
    default), so a key seals far fewer than the 2**32 records NIST allows random 96-bit nonces
    per key. TypeError / ValueError name the field that is out of range."""
    return _seal_record_with(key, topic, record_key, event_id, value, os.urandom(NONCE_LEN))


def open_record(
    key: TopicKey, topic: str, record_key: bytes, event_id: int, sealed: bytes
) -> bytes:
    """Authenticate and decrypt a v1 sealed value; raises :class:`SealRefused` naming what is
    wrong (format byte, length, or "authentication failed": the tag does not verify under this
    key and binding, whichever bound field or byte was changed)."""
    if len(sealed) < SEALED_OVERHEAD:
        raise SealRefused(f"sealed value: shorter than the {SEALED_OVERHEAD} bytes of a v1 seal")
    if sealed[0] != RECORD_FORMAT_V1:
        raise SealRefused("sealed value: unknown format version byte")
    aad = _aad_for(key, topic, record_key, event_id)
    aead: AESGCM = object.__getattribute__(key, "_aead")
    plain: bytes | None
    try:
        plain = aead.decrypt(bytes(sealed[1 : 1 + NONCE_LEN]), bytes(sealed[1 + NONCE_LEN :]), aad)
    except Exception:  # noqa: BLE001 - InvalidTag: one reason, whatever was changed
        plain = None
    if plain is not None:
        return plain
    # Raised outside the except block, so the exception carries no __context__.
    raise SealRefused(
        "sealed value: authentication failed (tampered, or not bound to this topic, record key, "
        "event id and key id)"
    ) from None


_Headers = Sequence[tuple[str, bytes | str | None]] | None


def _seal_headers(headers: _Headers) -> tuple[str, int]:
    """(key id, event id) of a sealed record's headers, in one pass; SealRefused naming the
    header that is missing, repeated or malformed."""
    key_id_raw: bytes | str | None = None
    event_raw: bytes | str | None = None
    seen_key = seen_event = False
    for name, value in headers or ():
        if name == HEADER_KEY_ID:
            if seen_key:
                raise SealRefused(f"header {HEADER_KEY_ID}: present more than once")
            seen_key, key_id_raw = True, value
        elif name == HEADER_EVENT_ID:
            if seen_event:
                raise SealRefused(f"header {HEADER_EVENT_ID}: present more than once")
            seen_event, event_raw = True, value
    if not seen_key:
        raise SealRefused(f"record is not sealed: header {HEADER_KEY_ID} missing")
    if not seen_event:
        raise SealRefused(f"record is not sealed: header {HEADER_EVENT_ID} missing")
    return _key_id_of(key_id_raw), _event_id_of(event_raw)


def _text(raw: bytes | str | None) -> str:
    if isinstance(raw, str):
        return raw
    try:
        return bytes(raw or b"").decode("ascii")
    except UnicodeDecodeError:
        return ""


def _key_id_of(raw: bytes | str | None) -> str:
    key_id = _text(raw)
    if not _KEY_ID.fullmatch(key_id):
        raise SealRefused(f"header {HEADER_KEY_ID}: not 1 to 64 characters of [A-Za-z0-9._-]")
    return key_id


def _event_id_of(raw: bytes | str | None) -> int:
    text = _text(raw)
    if not _EVENT_ID.fullmatch(text) or int(text) > MAX_EVENT_ID:
        raise SealRefused(f"header {HEADER_EVENT_ID}: not a decimal id between 1 and 2**63-1")
    return int(text)


def header_pairs(headers: object) -> list[tuple[str, bytes]]:
    """A Kafka client's record headers (confluent-kafka's list of pairs, or aiokafka/Faust's
    pairs or mapping; None) as (name, bytes) pairs. A header without a value reads as empty:
    the one reading of the workers' runtime, the consumer library and the Faust codec, so that
    a null `sealstream.key_id` beside a real one is a repeated header everywhere (refused), never
    a header left out by one reader and not by another."""
    if not headers:
        return []
    pairs = headers.items() if isinstance(headers, dict) else headers
    out: list[tuple[str, bytes]] = []
    for name, value in pairs:  # type: ignore[attr-defined]
        if value is None:
            out.append((str(name), b""))
        elif isinstance(value, str):
            out.append((str(name), value.encode()))
        else:
            out.append((str(name), bytes(value)))
    return out


def sealed_key_id(headers: _Headers) -> str:
    """The key id a record names (`sealstream.key_id`); SealRefused when a seal header is
    missing, repeated or malformed."""
    return _seal_headers(headers)[0]


def sealed_event_id(headers: _Headers) -> int:
    """The event id a record names (`sealstream.event_id`, decimal ASCII 1..2**63-1, no sign or
    leading zero, so one id has one spelling); SealRefused when a seal header is missing,
    repeated or malformed."""
    return _seal_headers(headers)[1]


def has_sealed_format(value: bytes | None) -> bool:
    """Whether `value` is shaped like a v1 sealed value (format byte, at least 29 bytes): what
    a dead letter may keep of a record whose seal did not open. JSON in the clear starts with
    `{`, so a producer's plaintext under copied seal headers is not kept."""
    return value is not None and len(value) >= SEALED_OVERHEAD and value[0] == RECORD_FORMAT_V1


def is_sealed(headers: _Headers) -> bool:
    """Whether a record claims to be sealed (carries a `sealstream.key_id` header)."""
    return any(k == HEADER_KEY_ID for k, _ in (headers or ()))


class TopicKeySource(Protocol):
    """Where sealers and openers get topic keys (`sealstream.keys.topic_keys.TopicKeys`)."""

    def current(self, topic: str) -> TopicKey:
        """The key of `topic`'s current rotation slot (made and stored on first use).
        Raises `StoreUnavailable` when Postgres or the KMS cannot answer."""
        ...

    def has_current(self, topic: str) -> bool:
        """Whether `current(topic)` would answer from memory (no Postgres or KMS call)."""
        ...

    def by_id(self, topic: str, key_id: str) -> TopicKey:
        """The key `key_id` of `topic`. Raises `SealRefused` when it is unknown, belongs to
        another topic, was destroyed or the KMS refuses it for good; `StoreUnavailable` when
        Postgres or the KMS cannot answer."""
        ...


class RecordSealer:
    """Seals the records a producer publishes to the message topic (docs/format.md)."""

    def __init__(self, keys: TopicKeySource, on_close: Callable[[], None] | None = None) -> None:
        self.keys = keys
        self._on_close = on_close

    def seal(
        self, topic: str, key: bytes, event_id: int, value: bytes
    ) -> tuple[bytes, list[tuple[str, bytes]]]:
        """(sealed value, headers to send with it) for one record of `topic` with record key
        `key` (the chat id's UTF-8) and `event_id` (`MessageRecord.change_id`).

        Raises `StoreUnavailable` (retriable) when the slot's key cannot be had (Postgres or KMS
        down); TypeError / ValueError naming a field out of range."""
        topic_key = self.keys.current(topic)
        sealed = seal_record(topic_key, topic, key, event_id, value)
        return sealed, [
            (HEADER_KEY_ID, topic_key.key_id.encode("ascii")),
            (HEADER_EVENT_ID, str(event_id).encode("ascii")),
        ]

    def seal_many(
        self, topic: str, records: Sequence[tuple[bytes, int, bytes]]
    ) -> list[tuple[bytes, list[tuple[str, bytes]]]]:
        """`seal` for many (record key, event id, value) of one topic at once: the slot's key
        is looked up once and the nonces are drawn from the OS in one read (each still 12 fresh
        random bytes). Same errors as `seal`."""
        if not records:
            return []
        topic_key = self.keys.current(topic)
        key_id_header = (HEADER_KEY_ID, topic_key.key_id.encode("ascii"))
        nonces = os.urandom(NONCE_LEN * len(records))
        out: list[tuple[bytes, list[tuple[str, bytes]]]] = []
        for i, (key, event_id, value) in enumerate(records):
            nonce = nonces[i * NONCE_LEN : (i + 1) * NONCE_LEN]
            sealed = _seal_record_with(topic_key, topic, key, event_id, value, nonce)
            out.append((sealed, [key_id_header, (HEADER_EVENT_ID, b"%d" % event_id)]))
        return out

    def ready(self, topic: str) -> bool:
        """Whether `seal` for `topic` runs from memory alone (no Postgres or KMS round trip):
        an event loop seals inline when it does, in a thread otherwise."""
        return self.keys.has_current(topic)

    def close(self) -> None:
        if self._on_close is not None:
            self._on_close()
            self._on_close = None


class RecordOpener:
    """Opens the records a consumer reads from the message topic (docs/format.md)."""

    def __init__(self, keys: TopicKeySource, on_close: Callable[[], None] | None = None) -> None:
        self.keys = keys
        self._on_close = on_close

    def open(
        self,
        topic: str,
        key: bytes | None,
        headers: Sequence[tuple[str, bytes]] | None,
        value: bytes,
    ) -> bytes:
        """The plaintext value of a record read from `topic` with its record key and headers.

        Raises `SealRefused(reason)` (permanent: dead-letter it) when the record is not sealed,
        a header is missing or malformed, it has no record key, its bytes or any bound field
        were changed, or its key is unknown, of another topic or destroyed; `StoreUnavailable`
        (retriable: hold and retry) when Postgres or the KMS cannot answer. The reason names the
        header or field, never a value. The caller must still check that the decoded record's
        event id equals `sealed_event_id(headers)` (the AAD binds the header's id)."""
        return self.open_with_event_id(topic, key, headers, value)[0]

    def open_with_event_id(
        self,
        topic: str,
        key: bytes | None,
        headers: Sequence[tuple[str, bytes]] | None,
        value: bytes,
    ) -> tuple[bytes, int]:
        """As `open`, and the event id the seal bound (`sealstream.event_id`), for the caller's
        check against the decoded record."""
        key_id, event_id = _seal_headers(headers)
        if key is None:
            raise SealRefused("record key: missing (a sealed record binds its record key)")
        topic_key = self.keys.by_id(topic, key_id)
        return open_record(topic_key, topic, key, event_id, value), event_id

    def close(self) -> None:
        if self._on_close is not None:
            self._on_close()
            self._on_close = None


def _topic_keys(settings: Settings, database: Database, kms_deadline: float | None) -> TopicKeys:
    from sealstream.adapters.postgres import TopicKeyRepository
    from sealstream.adapters.vault import TransitKms
    from sealstream.keys.topic_keys import TopicKeys, max_clock_skew_for

    kms = (
        TransitKms(settings.vault)
        if kms_deadline is None
        else TransitKms(settings.vault, retry_seconds=kms_deadline, timeout=kms_deadline)
    )
    return TopicKeys(
        TopicKeyRepository(database),
        kms,
        kms_key_name=settings.vault.default_key,
        rotation_seconds=settings.kafka.topic_key_rotation_seconds,
        cache_seconds=settings.kafka.topic_key_cache_seconds,
        max_clock_skew_seconds=max_clock_skew_for(settings.kafka),
    )


def _database(settings: Settings, database: Database | None) -> tuple[Database, Callable[[], None]]:
    from sealstream.adapters.postgres import Database

    if database is not None:
        return database, lambda: None
    own = Database(settings.postgres, max_size=4)
    own.open()
    return own, own.close


def record_sealer(
    settings: Settings, database: Database | None = None, kms_deadline: float | None = None
) -> RecordSealer:
    """A sealer on the real adapters: topic keys made by the KMS of `settings.vault` under its
    default master key and stored wrapped in Postgres. It opens its own Postgres pool unless
    `database` is given (then closing the sealer leaves it open); `kms_deadline`: seconds per
    KMS call, retries included (the gateway's). Call `close()` when done. Connects now:
    `StoreUnavailable` if Postgres does not answer."""
    db, close = _database(settings, database)
    return RecordSealer(_topic_keys(settings, db, kms_deadline), on_close=close)


def record_opener(settings: Settings, database: Database | None = None) -> RecordOpener:
    """An opener on the real adapters (see `record_sealer`); call `close()` when done."""
    db, close = _database(settings, database)
    return RecordOpener(_topic_keys(settings, db, None), on_close=close)
