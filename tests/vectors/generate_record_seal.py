"""Generate tests/vectors/record_seal_v1.json, the test vectors of sealed Kafka records (v1).

Every input is fixed; keys and nonces come from SHA-256 in counter mode over a label, so
re-running this script reproduces the file byte for byte. The sealed values are made by
``sealstream.record_seal._seal_record_with``; ``tests/unit/test_record_seal.py`` re-derives each
one with an independent implementation written from docs/format.md ("Sealed Kafka records").

Usage (from the repository root)::

    python tests/vectors/generate_record_seal.py           # rewrite record_seal_v1.json
    python tests/vectors/generate_record_seal.py --check   # exit 1 if the file differs
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # allow running it from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sealstream.record_seal import TopicKey, _seal_record_with, record_aad

OUT = Path(__file__).with_name("record_seal_v1.json")
TOPIC = "sealstream.messages.v1"
CHAT = b"0f8e6b2a-3c1d-4e5f-8a7b-9c0d1e2f3a4b"
SNOWFLAKE = 1_234_567_890_123_456_789
KEY_ID = "3f2a9c1e5b7d4a60b8e1c2d3f4a5b6c7"


def _det(label: str, n: int) -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < n:
        out += hashlib.sha256(label.encode() + counter.to_bytes(4, "big")).digest()
        counter += 1
    return bytes(out[:n])


def _case(
    name: str,
    description: str,
    plaintext: bytes,
    *,
    topic: str = TOPIC,
    record_key: bytes = CHAT,
    event_id: int = SNOWFLAKE,
    key_id: str = KEY_ID,
) -> dict[str, Any]:
    key = _det(f"record-key/{name}", 32)
    nonce = _det(f"record-nonce/{name}", 12)
    sealed = _seal_record_with(
        TopicKey(key_id, topic, key), topic, record_key, event_id, plaintext, nonce
    )
    return {
        "name": name,
        "description": description,
        "key": key.hex(),
        "key_id": key_id,
        "topic": topic,
        "record_key": record_key.hex(),
        "event_id": str(event_id),
        "nonce": nonce.hex(),
        "plaintext": plaintext.hex(),
        "aad": record_aad(topic, key_id, record_key, event_id).hex(),
        "sealed": sealed.hex(),
        "headers": {"sealstream.key_id": key_id, "sealstream.event_id": str(event_id)},
    }


def build() -> dict[str, Any]:
    post = (
        b'{"schema_version":1,"kind":"post","message_id":1234567890123456789,"event_id":null,'
        b'"chat_id":"0f8e6b2a-3c1d-4e5f-8a7b-9c0d1e2f3a4b","tenant_id":"default",'
        b'"sender_id":"alice","text":"hello","client_message_id":null,'
        b'"sent_at":"2026-01-01T00:00:00Z"}'
    )
    vectors = [
        _case("post", "a post as the gateway publishes it", post),
        _case("empty", "empty value: the sealed value is version, nonce and tag only", b""),
        _case(
            "edit",
            "an edit: the event id is the change's id, not the message id",
            b'{"kind":"edit"}',
            event_id=SNOWFLAKE + 4_194_304,
        ),
        _case("empty-key", "an empty record key (length 0 in the AAD)", b"x", record_key=b""),
        _case(
            "max-ids",
            "largest event id and a 64-character key id",
            b"\x00\xff binary \x00",
            event_id=2**63 - 1,
            key_id="K" * 64,
        ),
        _case("other-topic", "another topic name", b"same bytes", topic="t.abc123.messages"),
    ]
    return {
        "format": "sealstream sealed Kafka record v1",
        "spec": "docs/format.md, section 'Sealed Kafka records'",
        "generator": "tests/vectors/generate_record_seal.py",
        "notes": (
            "Byte strings are lower-case hex; event_id is a decimal string (1..2**63-1); "
            "key_id and topic are ASCII text. aad is an intermediate value for implementers. "
            "sealed = 0x01 || nonce || AES-256-GCM(key, nonce, plaintext, aad)."
        ),
        "vectors": vectors,
    }


def main() -> int:
    text = json.dumps(build(), indent=2) + "\n"
    if "--check" in sys.argv:
        return 0 if OUT.read_text() == text else 1
    OUT.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
