"""Generate tests/vectors/envelope_v2.json, the test vectors of envelope format v2.

Same style as ``generate.py`` (v1): every input is fixed, keys, salts and nonces come from
SHA-256 in counter mode over a label (``_det``), so re-running this script reproduces the file
byte for byte. The envelopes are made by ``sealstream.crypto._seal_with`` (the v2 core);
``tests/unit/test_crypto_v2.py`` then re-derives every vector with an independent implementation
written from docs/format.md, so a bug in the module cannot make the file self-consistent nonsense.

Usage (from the repository root)::

    python tests/vectors/generate_v2.py           # rewrite envelope_v2.json
    python tests/vectors/generate_v2.py --check   # exit 1 if the file is not what this would write

The format itself is specified in docs/format.md (section "Envelope format v2").
"""

from __future__ import annotations

import hashlib
import json
import sys
import uuid
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # allow `python tests/vectors/generate_v2.py` from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sealstream import crypto
from sealstream.crypto import ChatKey, MessageContext

OUT = Path(__file__).with_name("envelope_v2.json")

CHAT_A = uuid.UUID("0f8e6b2a-3c1d-4e5f-8a7b-9c0d1e2f3a4b")
CHAT_B = uuid.UUID("6a1b2c3d-4e5f-4071-8293-a4b5c6d7e8f9")
SNOWFLAKE = 1_234_567_890_123_456_789  # a typical Snowflake-style id (fits in 63 bits)
# Sealstream binds the id's own clock: (id >> 22) + 1 767 225 600 000 (schemas/ids.py id_millis).
SNOWFLAKE_MS = (SNOWFLAKE >> 22) + 1_767_225_600_000  # 2061569522167
SENDER = "alice"


def _det(label: str, n: int) -> bytes:
    """``n`` deterministic pseudo-random bytes: SHA-256(label || counter) blocks, counter 4 BE."""
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
    dek: bytes | None = None,
    dek_version: int = 1,
    chat_id: uuid.UUID = CHAT_A,
    message_id: int = SNOWFLAKE,
    sender_id: str = SENDER,
    revision: int = 1,
    created_at_ms: int = SNOWFLAKE_MS,
    salt: bytes | None = None,
    nonce: bytes | None = None,
) -> dict[str, Any]:
    return {
        "name": name,
        "description": description,
        "plaintext": plaintext,
        "dek": dek if dek is not None else _det("v2/dek/default", 32),
        "dek_version": dek_version,
        "chat_id": chat_id,
        "message_id": message_id,
        "sender_id": sender_id,
        "revision": revision,
        "created_at_ms": created_at_ms,
        "salt": salt if salt is not None else _det(f"v2/salt/{name}", 16),
        "nonce": nonce if nonce is not None else _det(f"v2/nonce/{name}", 12),
    }


def _same(name: str, description: str, **changes: Any) -> dict[str, Any]:
    """The `pair-base` inputs (same salt and nonce) with one input changed."""
    inputs: dict[str, Any] = {
        "message_id": 42,
        "created_at_ms": 1_767_225_600_000,
        "salt": _det("v2/salt/pair", 16),
        "nonce": _det("v2/nonce/pair", 12),
    }
    inputs.update(changes)
    return _case(name, description, b"same text, one input changed", **inputs)


def _cases() -> list[dict[str, Any]]:
    ascii_200 = (b"The quick brown fox jumps over the lazy dog. " * 5)[:200]
    return [
        _case("empty", "empty plaintext: the envelope is header and tag only", b""),
        _case("one-byte", "a single ASCII byte", b"a"),
        _case("hello", "short ASCII text (the worked example in docs/format.md)", b"hello, world"),
        _case("block-15", "15 bytes, one short of an AES block", b"0123456789abcde"),
        _case("block-16", "16 bytes, exactly one AES block", b"0123456789abcdef"),
        _case("block-17", "17 bytes, one past an AES block", b"0123456789abcdefg"),
        _case("ascii-200", "200 bytes of ASCII text (the benchmark size)", ascii_200),
        _case(
            "max-64k",
            "exactly MAX_PLAINTEXT_BYTES = 65536 bytes of binary data (the largest allowed)",
            _det("v2/plaintext/max-64k", 65536),
        ),
        _case(
            "emoji",
            "emoji: 4-byte UTF-8, ZWJ family sequence, skin-tone modifier, flag",
            "hi 👋🏽 👨‍👩‍👧‍👦 🇫🇷 🔐".encode(),
        ),
        _case(
            "cjk",
            "CJK: Chinese, Japanese and Korean text",
            "你好，世界。こんにちは。안녕하세요".encode(),  # noqa: RUF001 - non-ASCII on purpose
        ),
        _case(
            "arabic-rtl",
            "right-to-left Arabic with an RLM mark",
            "\u200fمرحبا بالعالم!".encode(),  # noqa: RUF001 - on purpose
        ),
        _case("not-utf8", "bytes that are not valid UTF-8 (utf8 field is null)", b"\xff\xfe\xc3("),
        _case(
            "message-id-0",
            "message_id = 0, created_at_ms = 0",
            b"first",
            message_id=0,
            created_at_ms=0,
        ),
        _case(
            "message-id-max",
            "message_id = 2**64 - 1 (largest unsigned 64-bit)",
            b"last",
            message_id=2**64 - 1,
        ),
        _case(
            "message-id-2-63",
            "message_id = 2**63 (top bit set: must be encoded unsigned)",
            b"top bit",
            message_id=2**63,
        ),
        _case("dek-version-2", "dek_version = 2", b"rotation", dek_version=2),
        _case(
            "dek-version-max",
            "dek_version = 2**31 - 1 (largest)",
            b"rotation",
            dek_version=2**31 - 1,
        ),
        _case("revision-2", "revision = 2 (the first edit)", b"edited text", revision=2),
        _case(
            "revision-max",
            "revision = 2**31 - 1 (largest)",
            b"edited often",
            revision=2**31 - 1,
        ),
        _case(
            "created-max",
            "created_at_ms = 2**63 - 1 (largest)",
            b"far future",
            created_at_ms=2**63 - 1,
        ),
        _case("sender-1-byte", "a one-byte sender id", b"short sender", sender_id="x"),
        _case(
            "sender-unicode",
            "a non-ASCII sender id: encoded as UTF-8, its length in bytes (not characters)",
            b"unicode sender",
            sender_id="Zoë 🚀 用户",
        ),
        _case(
            "sender-nfd",
            "the sender 'Zoë' in NFD (e + U+0308): other bytes than NFC, so another sender",
            b"unicode sender",
            sender_id="Zoe\u0308",
        ),
        _case(
            "sender-max",
            "a sender id of exactly MAX_SENDER_ID_BYTES = 1024 bytes",
            b"long sender",
            sender_id="s" * 1024,
        ),
        _same("pair-base", "base of the pairs below: each changes exactly one input"),
        _same("pair-sender", "as pair-base, sender 'bob'", sender_id="bob"),
        _same("pair-revision", "as pair-base, revision 2", revision=2),
        _same("pair-created", "as pair-base, created_at_ms + 1", created_at_ms=1_767_225_600_001),
        _same("pair-chat", "as pair-base, in chat B", chat_id=CHAT_B),
        _same("pair-message", "as pair-base, message_id 43", message_id=43),
        _same("pair-dek-version", "as pair-base, same DEK bytes as version 2", dek_version=2),
        _same("pair-dek", "as pair-base, another DEK", dek=_det("v2/dek/other", 32)),
    ]


def _utf8(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _context(case: dict[str, Any]) -> MessageContext:
    return MessageContext(
        case["chat_id"],
        case["message_id"],
        case["sender_id"],
        case["revision"],
        case["created_at_ms"],
    )


def _inputs_json(case: dict[str, Any]) -> dict[str, Any]:
    return {
        "dek": case["dek"].hex(),
        "dek_version": case["dek_version"],
        "chat_id": str(case["chat_id"]),
        # Decimal strings: JSON numbers above 2**53 lose precision in many parsers.
        "message_id": str(case["message_id"]),
        "sender_id": case["sender_id"],
        "revision": case["revision"],
        "created_at_ms": str(case["created_at_ms"]),
    }


def _vector(case: dict[str, Any]) -> dict[str, Any]:
    key = ChatKey(version=case["dek_version"], material=case["dek"])
    context = _context(case)
    ctx = crypto._context_bytes_v2(key, context)
    message_key, commitment = crypto._derive(key, case["salt"], ctx, crypto._INFO_LABEL_V2)
    envelope = crypto._seal_with(case["plaintext"], key, context, case["salt"], case["nonce"])
    return {
        "name": case["name"],
        "description": case["description"],
        **_inputs_json(case),
        "sender_id_utf8": case["sender_id"].encode("utf-8").hex(),
        "salt": case["salt"].hex(),
        "nonce": case["nonce"].hex(),
        "plaintext_len": len(case["plaintext"]),
        "plaintext": case["plaintext"].hex(),
        "utf8": _utf8(case["plaintext"]),
        "context": ctx.hex(),
        "info": (crypto._INFO_LABEL_V2 + ctx).hex(),
        "message_key": message_key.hex(),
        "commitment": commitment.hex(),
        "aad": (crypto._AAD_PREFIX_V2 + ctx).hex(),
        "envelope": envelope.hex(),
    }


def _v1_envelope(case: dict[str, Any]) -> bytes:
    key = ChatKey(version=case["dek_version"], material=case["dek"])
    return crypto._seal_v1_with(case["plaintext"], key, _context(case), case["salt"], case["nonce"])


def _v1_compat() -> list[dict[str, Any]]:
    """v1 envelopes (written before v2) that a v2-era reader must still open, as revision 1,
    with whatever sender and time the row holds (v1 binds neither)."""
    base = _case("v1-hello", "", b"hello, world")
    other = {**base, "sender_id": "bob", "created_at_ms": 0}
    out = []
    for name, description, inputs in (
        ("v1-as-revision-1", "a v1 envelope opened as revision 1", base),
        ("v1-any-sender", "the same v1 envelope opened with another sender and time", other),
    ):
        out.append(
            {
                "name": name,
                "description": description,
                **_inputs_json(inputs),
                "plaintext": base["plaintext"].hex(),
                "envelope": _v1_envelope(base).hex(),
            }
        )
    return out


def _invalid(valid: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Envelopes that a reader must reject, each with the key and context to try them with."""
    by_name = {v["name"]: v for v in valid}
    base = by_name["hello"]
    env = bytes.fromhex(base["envelope"])
    inputs = ("dek", "dek_version", "chat_id", "message_id", "sender_id", "revision")

    def flip(offset: int) -> str:
        out = bytearray(env)
        out[offset] ^= 0x01
        return out.hex()

    def derived(name: str, description: str, envelope: str, **changes: Any) -> dict[str, Any]:
        item = {k: base[k] for k in (*inputs, "created_at_ms")}
        item.update(changes)
        return {"name": name, "description": description, **item, "envelope": envelope}

    header_as_v2 = (env[:1] + (2).to_bytes(4, "big") + env[5:]).hex()
    v1 = _v1_envelope(_case("v1-hello", "", b"hello, world"))
    return [
        derived("format-version-0", "version byte 0x00", "00" + env[1:].hex()),
        derived("format-version-3", "version byte 0x03 (unknown)", "03" + env[1:].hex()),
        derived(
            "downgrade-v2-as-v1",
            "the v2 envelope relabelled v1 (byte 0 = 0x01): a downgrade",
            "01" + env[1:].hex(),
        ),
        derived(
            "downgrade-v1-for-revision-2",
            "a valid v1 envelope of this row offered for revision 2: v1 stands for revision 1 only",
            v1.hex(),
            revision=2,
        ),
        derived(
            "upgrade-v1-as-v2",
            "a v1 envelope relabelled v2 (byte 0 = 0x02)",
            "02" + v1[1:].hex(),
        ),
        derived(
            "header-dek-version",
            "header dek_version changed 1 -> 2, opened with the version-1 key",
            header_as_v2,
        ),
        derived(
            "context-dek-version",
            "sealed under version 1, opened with the same DEK bytes labelled version 2",
            env.hex(),
            dek_version=2,
        ),
        derived("wrong-sender", "opened as sent by another sender", env.hex(), sender_id="bob"),
        derived("wrong-sender-case", "sender 'Alice' for 'alice'", env.hex(), sender_id="Alice"),
        derived(
            "wrong-sender-suffix",
            "sender 'alice ' (trailing space)",
            env.hex(),
            sender_id="alice ",
        ),
        derived("wrong-revision", "opened as revision 2", env.hex(), revision=2),
        derived(
            "wrong-created",
            "opened with a creation time 1 ms later",
            env.hex(),
            created_at_ms=str(int(base["created_at_ms"]) + 1),
        ),
        derived(
            "wrong-chat",
            "opened as the same message_id in another chat",
            env.hex(),
            chat_id=str(CHAT_B),
        ),
        derived(
            "wrong-message-id",
            "opened as another message of the same chat",
            env.hex(),
            message_id=str(SNOWFLAKE + 1),
        ),
        derived(
            "wrong-dek",
            "right everything except the DEK",
            env.hex(),
            dek=_det("v2/dek/other", 32).hex(),
        ),
        derived("salt-bit", "one bit of the salt flipped", flip(5)),
        derived("nonce-bit", "one bit of the nonce flipped", flip(21)),
        derived("commitment-bit", "one bit of the commitment flipped", flip(33)),
        derived("ciphertext-bit", "one bit of the ciphertext flipped", flip(65)),
        derived("tag-bit", "one bit of the last tag byte flipped", flip(len(env) - 1)),
        derived("truncated-tag", "last byte removed", env[:-1].hex()),
        derived("header-only", "only the 65-byte header", env[:65].hex()),
        derived("empty", "zero bytes", ""),
    ]


def build() -> dict[str, Any]:
    vectors = [_vector(case) for case in _cases()]
    return {
        "format": "sealstream envelope v2",
        "spec": "docs/format.md",
        "generator": "tests/vectors/generate_v2.py",
        "notes": (
            "All byte strings are lower-case hex. message_id and created_at_ms are decimal"
            " strings (unsigned 64-bit / Unix milliseconds). sender_id is the text, sender_id_utf8"
            " its UTF-8 bytes. utf8 is the plaintext decoded as UTF-8, or null when it is not"
            " valid UTF-8. context, info, message_key, commitment and aad are intermediate values"
            " for implementers. Every entry of 'v1_compat' must open to 'plaintext'; every entry"
            " of 'invalid' must fail to open with the given key and context."
        ),
        "vectors": vectors,
        "v1_compat": _v1_compat(),
        "invalid": _invalid(vectors),
    }


def render() -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not OUT.exists() or OUT.read_text(encoding="utf-8") != text:
            print(f"{OUT} is out of date; run {Path(__file__).name}", file=sys.stderr)
            return 1
        print(f"{OUT} is up to date")
        return 0
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT} ({len(build()['vectors'])} vectors)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
