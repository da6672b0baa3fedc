"""Generate tests/vectors/envelope_v1.json, the test vectors of envelope format v1.

Every input is fixed: keys, salts and nonces come from SHA-256 in counter mode over a label (see
``_det``), so re-running this script reproduces the file byte for byte. The envelopes are made by
``sealstream.crypto._seal_v1_with``; ``tests/unit/test_crypto.py`` then re-derives every vector with
an independent implementation (stdlib HMAC for HKDF, cryptography's low-level GCM cipher), so a
bug in the module cannot make the file self-consistent nonsense.

Usage (from the repository root)::

    python tests/vectors/generate.py           # rewrite envelope_v1.json
    python tests/vectors/generate.py --check   # exit 1 if the file is not what this would write

The format itself is specified in docs/format.md.
"""

from __future__ import annotations

import hashlib
import json
import sys
import uuid
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # allow `python tests/vectors/generate.py` from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sealstream import crypto
from sealstream.crypto import ChatKey, MessageContext

OUT = Path(__file__).with_name("envelope_v1.json")

CHAT_A = uuid.UUID("0f8e6b2a-3c1d-4e5f-8a7b-9c0d1e2f3a4b")
CHAT_B = uuid.UUID("6a1b2c3d-4e5f-4071-8293-a4b5c6d7e8f9")
CHAT_C = uuid.UUID("00000000-0000-0000-0000-000000000000")  # nil UUID
CHAT_D = uuid.UUID("ffffffff-ffff-ffff-ffff-ffffffffffff")  # all bits set
SNOWFLAKE = 1_234_567_890_123_456_789  # a typical Snowflake-style id (fits in 63 bits)


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
    salt: bytes | None = None,
    nonce: bytes | None = None,
) -> dict[str, Any]:
    return {
        "name": name,
        "description": description,
        "plaintext": plaintext,
        "dek": dek if dek is not None else _det("dek/default", 32),
        "dek_version": dek_version,
        "chat_id": chat_id,
        "message_id": message_id,
        "salt": salt if salt is not None else _det(f"salt/{name}", 16),
        "nonce": nonce if nonce is not None else _det(f"nonce/{name}", 12),
    }


def _cases() -> list[dict[str, Any]]:
    ascii_200 = (b"The quick brown fox jumps over the lazy dog. " * 5)[:200]
    return [
        _case("empty", "empty plaintext: the envelope is header and tag only", b""),
        _case("one-byte", "a single ASCII byte", b"a"),
        _case("one-nul", "a single NUL byte", b"\x00"),
        _case("hello", "short ASCII text", b"hello, world"),
        _case("block-15", "15 bytes, one short of an AES block", b"0123456789abcde"),
        _case("block-16", "16 bytes, exactly one AES block", b"0123456789abcdef"),
        _case("block-17", "17 bytes, one past an AES block", b"0123456789abcdefg"),
        _case("ascii-200", "200 bytes of ASCII text (the benchmark size)", ascii_200),
        _case("binary-200", "200 bytes of binary data", _det("plaintext/binary-200", 200)),
        _case(
            "max-64k",
            "exactly MAX_PLAINTEXT_BYTES = 65536 bytes of binary data (the largest allowed)",
            _det("plaintext/max-64k", 65536),
        ),
        _case(
            "emoji",
            "emoji: 4-byte UTF-8, ZWJ family sequence, skin-tone modifier, flag, keycap",
            "hi 👋🏽 👨‍👩‍👧‍👦 🇫🇷 1️⃣ 🔐".encode(),
        ),
        _case(
            "cjk",
            "CJK: Chinese, Japanese and Korean text",
            "你好，世界。こんにちは。안녕하세요".encode(),  # noqa: RUF001 - non-ASCII on purpose
        ),
        _case(
            "arabic-rtl",
            "right-to-left Arabic with an RLM mark and Arabic-Indic digits",
            "\u200fمرحبا بالعالم! الرسالة رقم ١٢٣".encode(),  # noqa: RUF001 - on purpose
        ),
        _case(
            "hebrew-rtl", "right-to-left Hebrew mixed with LTR Latin", "שלום world עולם".encode()
        ),
        _case(
            "combining-marks",
            "combining marks: decomposed e + U+0301, stacked diacritics, Devanagari",
            (
                "e\u0301 vs \u00e9; Z\u0351\u0352\u0353a\u0300\u0301\u0302l\u0303g\u0304o; नमस्ते"
            ).encode(),
        ),
        _case("nul-inside", "NUL bytes inside text", b"before\x00middle\x00\x00after\x00"),
        _case("all-nul", "32 NUL bytes", b"\x00" * 32),
        _case("not-utf8", "bytes that are not valid UTF-8 (utf8 field is null)", b"\xff\xfe\xc3("),
        _case(
            "control-and-json",
            "quotes, backslashes, CR LF, tab and a UTF-8 BOM",
            '\ufeff"quoted" \\back\\slash\r\nline\ttab'.encode(),
        ),
        _case("message-id-0", "message_id = 0 (smallest)", b"first message", message_id=0),
        _case(
            "message-id-max",
            "message_id = 2**64 - 1 (largest unsigned 64-bit)",
            b"last message",
            message_id=2**64 - 1,
        ),
        _case(
            "message-id-2-63",
            "message_id = 2**63 (top bit set: must be encoded unsigned)",
            b"top bit",
            message_id=2**63,
        ),
        _case("dek-version-1", "dek_version = 1 (smallest)", b"rotation", dek_version=1),
        _case(
            "dek-version-2",
            "dek_version = 2: same DEK bytes and inputs as dek-version-1, other version",
            b"rotation",
            dek_version=2,
            salt=_det("salt/dek-version-1", 16),
            nonce=_det("nonce/dek-version-1", 12),
        ),
        _case(
            "dek-version-max",
            "dek_version = 2**31 - 1 (largest allowed)",
            b"rotation",
            dek_version=2**31 - 1,
        ),
        _case(
            "chat-a",
            "same text and ids in chat A (see chat-b, chat-nil, chat-max)",
            b"same text, other chat",
            chat_id=CHAT_A,
            message_id=42,
            salt=_det("salt/chat", 16),
            nonce=_det("nonce/chat", 12),
        ),
        _case(
            "chat-b",
            "as chat-a but in chat B",
            b"same text, other chat",
            chat_id=CHAT_B,
            message_id=42,
            salt=_det("salt/chat", 16),
            nonce=_det("nonce/chat", 12),
        ),
        _case(
            "chat-nil",
            "as chat-a but in the nil-UUID chat",
            b"same text, other chat",
            chat_id=CHAT_C,
            message_id=42,
            salt=_det("salt/chat", 16),
            nonce=_det("nonce/chat", 12),
        ),
        _case(
            "chat-max",
            "as chat-a but in the all-ones-UUID chat",
            b"same text, other chat",
            chat_id=CHAT_D,
            message_id=42,
            salt=_det("salt/chat", 16),
            nonce=_det("nonce/chat", 12),
        ),
        _case(
            "other-salt",
            "as chat-a but another salt",
            b"same text, other chat",
            chat_id=CHAT_A,
            message_id=42,
            salt=_det("salt/other", 16),
            nonce=_det("nonce/chat", 12),
        ),
        _case(
            "other-nonce",
            "as chat-a but another nonce",
            b"same text, other chat",
            chat_id=CHAT_A,
            message_id=42,
            salt=_det("salt/chat", 16),
            nonce=_det("nonce/other", 12),
        ),
        _case(
            "other-dek",
            "as chat-a but another DEK",
            b"same text, other chat",
            chat_id=CHAT_A,
            message_id=42,
            dek=_det("dek/other", 32),
            salt=_det("salt/chat", 16),
            nonce=_det("nonce/chat", 12),
        ),
        _case(
            "dek-zero",
            "all-zero DEK, salt and nonce (edge values)",
            b"zeros",
            dek=b"\x00" * 32,
            salt=b"\x00" * 16,
            nonce=b"\x00" * 12,
        ),
        _case(
            "dek-ones",
            "all-0xff DEK, salt and nonce (edge values)",
            b"ones",
            dek=b"\xff" * 32,
            salt=b"\xff" * 16,
            nonce=b"\xff" * 12,
        ),
    ]


def _utf8(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _vector(case: dict[str, Any]) -> dict[str, Any]:
    key = ChatKey(version=case["dek_version"], material=case["dek"])
    # v1 binds no sender, revision or time: any valid values give the same bytes.
    context = MessageContext(case["chat_id"], case["message_id"], "-", 1, 0)
    ctx = crypto._CONTEXT.pack(context.chat_id.bytes, context.message_id, key.version)
    message_key, commitment = crypto._derive(key, case["salt"], ctx)
    envelope = crypto._seal_v1_with(case["plaintext"], key, context, case["salt"], case["nonce"])
    return {
        "name": case["name"],
        "description": case["description"],
        "dek": case["dek"].hex(),
        "dek_version": case["dek_version"],
        "chat_id": str(case["chat_id"]),
        # A decimal string: JSON numbers above 2**53 lose precision in many parsers.
        "message_id": str(case["message_id"]),
        "salt": case["salt"].hex(),
        "nonce": case["nonce"].hex(),
        "plaintext_len": len(case["plaintext"]),
        "plaintext": case["plaintext"].hex(),
        "utf8": _utf8(case["plaintext"]),
        "info": (crypto._INFO_LABEL + ctx).hex(),
        "message_key": message_key.hex(),
        "commitment": commitment.hex(),
        "aad": (crypto._AAD_PREFIX + ctx).hex(),
        "envelope": envelope.hex(),
    }


def _invalid(valid: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Envelopes that a reader must reject, each with the key and context to try them with."""
    by_name = {v["name"]: v for v in valid}
    base = by_name["hello"]
    env = bytes.fromhex(base["envelope"])

    def flip(offset: int) -> str:
        out = bytearray(env)
        out[offset] ^= 0x01
        return out.hex()

    def derived(name: str, description: str, envelope: str, **changes: Any) -> dict[str, Any]:
        item = {k: base[k] for k in ("dek", "dek_version", "chat_id", "message_id")}
        item.update(changes)
        return {"name": name, "description": description, **item, "envelope": envelope}

    header_v2 = bytes.fromhex(by_name["dek-version-2"]["envelope"])
    header_as_v2 = (env[:1] + (2).to_bytes(4, "big") + env[5:]).hex()
    return [
        derived("format-version-0", "version byte 0x00", "00" + env[1:].hex()),
        derived(
            "format-version-2", "version byte 0x02 (unknown to a v1 reader)", "02" + env[1:].hex()
        ),
        derived(
            "header-dek-version",
            "header dek_version changed 1 -> 2, opened with the version-1 key",
            header_as_v2,
        ),
        derived(
            "header-and-context-dek-version",
            "header dek_version changed 1 -> 2, opened with the same DEK bytes labelled version 2",
            header_as_v2,
            dek_version=2,
        ),
        derived(
            "context-dek-version",
            "sealed under version 1, opened with the same DEK bytes labelled version 2",
            env.hex(),
            dek_version=2,
        ),
        derived(
            "dek-version-swap",
            "a version-2 envelope opened with a version-1 key of the same bytes",
            header_v2.hex(),
        ),
        derived("salt-bit", "one bit of the salt flipped", flip(5)),
        derived("nonce-bit", "one bit of the nonce flipped", flip(21)),
        derived(
            "commitment-bit", "one bit of the commitment flipped (ciphertext intact)", flip(33)
        ),
        derived("ciphertext-bit", "one bit of the ciphertext flipped", flip(65)),
        derived("tag-bit", "one bit of the last tag byte flipped", flip(len(env) - 1)),
        derived("truncated-tag", "last byte removed", env[:-1].hex()),
        derived("header-only", "only the 65-byte header", env[:65].hex()),
        derived("empty", "zero bytes", ""),
        derived(
            "wrong-dek",
            "right everything except the DEK",
            env.hex(),
            dek=_det("dek/other", 32).hex(),
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
    ]


def build() -> dict[str, Any]:
    vectors = [_vector(case) for case in _cases()]
    return {
        "format": "sealstream envelope v1",
        "spec": "docs/format.md",
        "generator": "tests/vectors/generate.py",
        "notes": (
            "All byte strings are lower-case hex. message_id is a decimal string (unsigned 64-bit)."
            " utf8 is the plaintext decoded as UTF-8, or null when it is not valid UTF-8."
            " info, message_key, commitment and aad are intermediate values for implementers."
            " Every entry of 'invalid' must fail to open with the given key and context."
        ),
        "vectors": vectors,
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
