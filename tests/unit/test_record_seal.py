"""Sealed Kafka records (sealstream.record_seal): the vectors, re-derived from docs/format.md by
an independent implementation, and every bound field or byte changed is refused by name."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sealstream.errors import SealRefused
from sealstream.keys.topic_keys import topic_key_cutoff
from sealstream.record_seal import (
    HEADER_EVENT_ID,
    HEADER_KEY_ID,
    SEALED_OVERHEAD,
    RecordOpener,
    RecordSealer,
    TopicKey,
    sealed_event_id,
)
from sealstream.settings import KafkaSettings

VECTORS = Path(__file__).parents[1] / "vectors" / "record_seal_v1.json"
TOPIC = "t.unit.messages"
CHAT = b"0f8e6b2a-3c1d-4e5f-8a7b-9c0d1e2f3a4b"


def spec_aad(topic: str, key_id: str, record_key: bytes, event_id: int) -> bytes:
    """docs/format.md, "Sealed Kafka records", written out again without the module."""
    return (
        b"sealstream/record/v1"
        + b"\x01"
        + len(key_id).to_bytes(1, "big")
        + key_id.encode()
        + len(topic).to_bytes(2, "big")
        + topic.encode()
        + len(record_key).to_bytes(4, "big")
        + record_key
        + event_id.to_bytes(8, "big")
    )


@dataclass
class FakeKeys:
    """Our own `TopicKeySource` port: keys by id, one current key, some destroyed."""

    keys: dict[str, TopicKey] = field(default_factory=dict)
    current_id: str = "k1"
    destroyed: set[str] = field(default_factory=set)

    def current(self, topic: str) -> TopicKey:
        return self.keys[self.current_id]

    def has_current(self, topic: str) -> bool:
        return True

    def by_id(self, topic: str, key_id: str) -> TopicKey:
        if key_id in self.destroyed:
            raise SealRefused(f"header {HEADER_KEY_ID}: the topic key was destroyed")
        if key_id not in self.keys:
            raise SealRefused(f"header {HEADER_KEY_ID}: no such topic key")
        key = self.keys[key_id]
        if key.topic != topic:
            raise SealRefused(f"header {HEADER_KEY_ID}: names a key of another topic")
        return key


def vectors() -> list[dict[str, str]]:
    return list(json.loads(VECTORS.read_text())["vectors"])


@pytest.mark.parametrize("vector", vectors(), ids=lambda v: v["name"])
def test_vector_matches_an_independent_implementation(vector: dict[str, str]) -> None:
    key = bytes.fromhex(vector["key"])
    nonce = bytes.fromhex(vector["nonce"])
    record_key = bytes.fromhex(vector["record_key"])
    aad = spec_aad(vector["topic"], vector["key_id"], record_key, int(vector["event_id"]))
    assert aad.hex() == vector["aad"]
    expected = b"\x01" + nonce + AESGCM(key).encrypt(nonce, bytes.fromhex(vector["plaintext"]), aad)
    assert expected.hex() == vector["sealed"]


@pytest.mark.parametrize("vector", vectors(), ids=lambda v: v["name"])
def test_vector_opens_with_the_opener(vector: dict[str, str]) -> None:
    key = TopicKey(vector["key_id"], vector["topic"], bytes.fromhex(vector["key"]))
    opener = RecordOpener(FakeKeys({key.key_id: key}))
    headers = [(k, v.encode()) for k, v in vector["headers"].items()]
    plain = opener.open(
        vector["topic"],
        bytes.fromhex(vector["record_key"]),
        headers,
        bytes.fromhex(vector["sealed"]),
    )
    assert plain.hex() == vector["plaintext"]


def test_vector_file_is_what_the_generator_writes() -> None:
    script = VECTORS.with_name("generate_record_seal.py")
    done = subprocess.run([sys.executable, str(script), "--check"], check=False)
    assert done.returncode == 0, "tests/vectors/record_seal_v1.json is out of step"


def _pair() -> tuple[RecordSealer, RecordOpener, FakeKeys]:
    keys = FakeKeys(
        {
            "k1": TopicKey("k1", TOPIC, bytes(range(32))),
            # Same key bytes under another id: only the AAD tells them apart.
            "k2": TopicKey("k2", TOPIC, bytes(range(32))),
            "k3": TopicKey("k3", "t.other.messages", bytes(range(32))),
        }
    )
    return RecordSealer(keys), RecordOpener(keys), keys


def test_round_trip_and_headers() -> None:
    sealer, opener, _ = _pair()
    value = b'{"text": "a secret sentence"}'
    sealed, headers = sealer.seal(TOPIC, CHAT, 42, value)
    assert dict(headers) == {HEADER_KEY_ID: b"k1", HEADER_EVENT_ID: b"42"}
    assert b"secret" not in sealed and len(sealed) == len(value) + SEALED_OVERHEAD
    assert opener.open(TOPIC, CHAT, headers, sealed) == value
    assert sealed_event_id(headers) == 42
    again, _ = sealer.seal(TOPIC, CHAT, 42, value)
    assert again != sealed  # a fresh random nonce per record


def _headers(key_id: bytes = b"k1", event_id: bytes = b"42") -> list[tuple[str, bytes]]:
    return [(HEADER_KEY_ID, key_id), (HEADER_EVENT_ID, event_id)]


def _flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ("topic", "authentication failed"),
        ("record key", "authentication failed"),
        ("event id", "authentication failed"),
        ("key id", "authentication failed"),
        ("key of another topic", "another topic"),
        ("version byte", "unknown format version"),
        ("nonce", "authentication failed"),
        ("ciphertext", "authentication failed"),
        ("tag", "authentication failed"),
        ("truncated", "authentication failed"),
        ("truncated below the overhead", "shorter than"),
        ("no key id header", "header sealstream.key_id missing"),
        ("no event id header", "header sealstream.event_id missing"),
        ("event id not decimal", "header sealstream.event_id: not a decimal id"),
        ("event id with a leading zero", "header sealstream.event_id: not a decimal id"),
        ("key id header twice", "present more than once"),
        ("unknown key id", "no such topic key"),
        ("destroyed key", "destroyed"),
        ("no record key", "record key: missing"),
    ],
)
def test_any_change_is_refused_by_name(change: str, reason: str) -> None:
    sealer, opener, keys = _pair()
    value = b'{"text": "a secret sentence"}'
    sealed, _ = sealer.seal(TOPIC, CHAT, 42, value)
    topic, record_key, headers = TOPIC, CHAT, _headers()
    if change == "topic":
        keys.keys["k1"] = TopicKey("k1", "t.moved.messages", bytes(range(32)))
        topic = "t.moved.messages"
    elif change == "record key":
        record_key = b"6a1b2c3d-4e5f-4071-8293-a4b5c6d7e8f9"
    elif change == "event id":
        headers = _headers(event_id=b"43")
    elif change == "key id":
        headers = _headers(key_id=b"k2")
    elif change == "key of another topic":
        headers = _headers(key_id=b"k3")
    elif change == "version byte":
        sealed = b"\x02" + sealed[1:]
    elif change == "nonce":
        sealed = _flip(sealed, 1)
    elif change == "ciphertext":
        sealed = _flip(sealed, 14)
    elif change == "tag":
        sealed = _flip(sealed, len(sealed) - 1)
    elif change == "truncated":
        sealed = sealed[:-1]
    elif change == "truncated below the overhead":
        sealed = sealed[: SEALED_OVERHEAD - 1]
    elif change == "no key id header":
        headers = [(HEADER_EVENT_ID, b"42")]
    elif change == "no event id header":
        headers = [(HEADER_KEY_ID, b"k1")]
    elif change == "event id not decimal":
        headers = _headers(event_id=b"0x2a")
    elif change == "event id with a leading zero":
        headers = _headers(event_id=b"042")
    elif change == "key id header twice":
        headers = [*_headers(), (HEADER_KEY_ID, b"k1")]
    elif change == "unknown key id":
        headers = _headers(key_id=b"k9")
    elif change == "destroyed key":
        keys.destroyed.add("k1")
    elif change == "no record key":
        record_key = None  # type: ignore[assignment]
    with pytest.raises(SealRefused) as refused:
        opener.open(topic, record_key, headers, sealed)
    assert reason in refused.value.reason
    # The reason names a header or field, never the text or a key.
    assert "secret" not in str(refused.value) and "k1" not in refused.value.reason


def test_a_plaintext_record_is_refused_as_not_sealed() -> None:
    _, opener, _ = _pair()
    with pytest.raises(SealRefused, match=r"record is not sealed: header sealstream\.key_id"):
        opener.open(TOPIC, CHAT, None, b'{"text": "plain"}')


def test_topic_key_repr_hides_the_key() -> None:
    key = TopicKey("k1", TOPIC, b"\xab" * 32)
    assert "ab" not in repr(key).lower().replace("material", "")
    with pytest.raises(ValueError, match="material"):
        TopicKey("k1", TOPIC, b"short")
    with pytest.raises(ValueError, match="key_id"):
        TopicKey("bad id!", TOPIC, b"\x00" * 32)


def test_destruction_cutoff_is_retention_plus_segment_roll_plus_grace() -> None:
    kafka = KafkaSettings(retention_ms=24 * 3600 * 1000, topic_key_destroy_grace_ms=600_000)
    now = datetime(2026, 6, 1, 12, tzinfo=UTC)
    # 24 h retention rolls a segment every hour (segment_ms_for): 24 h + 1 h + 10 min.
    assert topic_key_cutoff(kafka, now) == now - timedelta(hours=25, minutes=10)


def test_seal_many_seals_each_record_like_seal() -> None:
    sealer, opener, _ = _pair()
    items = [(CHAT, 40 + i, b'{"text": "record %d"}' % i) for i in range(5)]
    sealed = sealer.seal_many(TOPIC, items)
    assert len({value[1:13] for value, _ in sealed}) == 5  # five distinct nonces
    for (key, event_id, value), (sealed_value, headers) in zip(items, sealed, strict=True):
        assert dict(headers) == {HEADER_KEY_ID: b"k1", HEADER_EVENT_ID: str(event_id).encode()}
        assert opener.open(TOPIC, key, headers, sealed_value) == value
    assert sealer.seal_many(TOPIC, []) == []
