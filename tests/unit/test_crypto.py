"""Tests of sealstream.crypto, envelope format v1 (docs/format.md); v2 in test_crypto_v2.py.

Since v2, `seal` writes v2 envelopes: the tests below that seal and tamper (bits, truncation,
keys, ids) therefore exercise v2; the vectors, the reference implementation and the worked
example are v1, sealed by the module's v1 core (`_seal_v1_with`), which production never calls.

The vectors in tests/vectors/envelope_v1.json are checked twice: through the module, and through
an independent implementation written here from the spec (stdlib HMAC for HKDF, GHASH and CTR in
pure Python over the raw AES block function), itself pinned by RFC 5869 and GCM known answers.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib.util
import json
import os
import struct
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sealstream import crypto
from sealstream.crypto import (
    MAX_PLAINTEXT_BYTES,
    ChatKey,
    MessageContext,
    MessageTooLarge,
    envelope_dek_version,
    open_envelope,
    seal,
)
from sealstream.errors import DecryptionError, InvalidMessage, SealstreamError

VECTOR_DIR = Path(__file__).resolve().parents[1] / "vectors"
VECTOR_FILE = VECTOR_DIR / "envelope_v1.json"
DATA: dict[str, Any] = json.loads(VECTOR_FILE.read_text(encoding="utf-8"))
VECTORS: list[dict[str, Any]] = DATA["vectors"]
INVALID: list[dict[str, Any]] = DATA["invalid"]

CHAT_1 = uuid.UUID("11111111-2222-4333-8444-555555555555")
CHAT_2 = uuid.UUID("99999999-8888-4777-8666-555555555555")


def _key(version: int = 1, material: bytes | None = None) -> ChatKey:
    return ChatKey(version=version, material=material if material is not None else os.urandom(32))


def _ctx(chat_id: uuid.UUID = CHAT_1, message_id: int = 7_000_000_000_000_001) -> MessageContext:
    return MessageContext(chat_id, message_id, "alice", 1, 1_767_225_600_000)


# --------------------------------------------------------------------------------------------
# Independent reference implementation, written from docs/format.md (no sealstream.crypto use).
# --------------------------------------------------------------------------------------------


def ref_hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    """RFC 5869 HKDF with SHA-256, from the stdlib ``hmac`` module only."""
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    okm, block, counter = b"", b"", 1
    while len(okm) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        okm += block
        counter += 1
    return okm[:length]


def _aes_blocks(key: bytes, data: bytes) -> bytes:
    """The raw AES block function applied to each 16-byte block (what GCM is built from)."""
    enc = Cipher(algorithms.AES(key), modes.ECB()).encryptor()  # noqa: S305 - building GCM by hand
    return enc.update(data) + enc.finalize()


_GCM_R = 0xE1 << 120


def gf_mul(x: int, y: int) -> int:
    """Multiplication in GF(2^128) with GCM's bit order (NIST SP 800-38D, Algorithm 1)."""
    z, v = 0, y
    for i in range(127, -1, -1):
        if (x >> i) & 1:
            z ^= v
        v = (v >> 1) ^ _GCM_R if v & 1 else v >> 1
    return z


def gf_pow(x: int, e: int) -> int:
    result = 1 << 127  # the field's 1 in GCM bit order
    while e:
        if e & 1:
            result = gf_mul(result, x)
        x = gf_mul(x, x)
        e >>= 1
    return result


def gf_inv(x: int) -> int:
    return gf_pow(x, 2**128 - 2)


def _blocks(data: bytes) -> list[int]:
    padded = data + b"\x00" * (-len(data) % 16)
    return [int.from_bytes(padded[i : i + 16], "big") for i in range(0, len(padded), 16)]


def ghash_inputs(aad: bytes, ciphertext: bytes) -> list[int]:
    lengths = struct.pack(">QQ", len(aad) * 8, len(ciphertext) * 8)
    return [*_blocks(aad), *_blocks(ciphertext), int.from_bytes(lengths, "big")]


def ghash(h: int, blocks: list[int]) -> int:
    y = 0
    for b in blocks:
        y = gf_mul(y ^ b, h)
    return y


def ref_gcm_encrypt(key: bytes, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """AES-GCM (96-bit nonce) from the AES block function: CTR mode plus GHASH, in Python."""
    assert len(nonce) == 12
    h = int.from_bytes(_aes_blocks(key, b"\x00" * 16), "big")
    j0 = nonce + b"\x00\x00\x00\x01"
    n_blocks = (len(plaintext) + 15) // 16
    counters = b"".join(nonce + struct.pack(">I", 2 + i) for i in range(n_blocks))
    stream = _aes_blocks(key, counters) if counters else b""
    ciphertext = bytes(p ^ s for p, s in zip(plaintext, stream, strict=False))
    s = ghash(h, ghash_inputs(aad, ciphertext))
    tag = (s ^ int.from_bytes(_aes_blocks(key, j0), "big")).to_bytes(16, "big")
    return ciphertext + tag


def ref_context(chat_id: uuid.UUID, message_id: int, dek_version: int) -> bytes:
    return chat_id.bytes + message_id.to_bytes(8, "big") + dek_version.to_bytes(4, "big")


def ref_info(chat_id: uuid.UUID, message_id: int, dek_version: int) -> bytes:
    return b"sealstream/msg/v1" + ref_context(chat_id, message_id, dek_version)


def ref_aad(chat_id: uuid.UUID, message_id: int, dek_version: int) -> bytes:
    return b"sealstream/aad/v1" + b"\x01" + ref_context(chat_id, message_id, dek_version)


def ref_seal(
    dek: bytes,
    dek_version: int,
    chat_id: uuid.UUID,
    message_id: int,
    salt: bytes,
    nonce: bytes,
    plaintext: bytes,
) -> bytes:
    okm = ref_hkdf_sha256(dek, salt, ref_info(chat_id, message_id, dek_version), 64)
    body = ref_gcm_encrypt(okm[:32], nonce, plaintext, ref_aad(chat_id, message_id, dek_version))
    return b"\x01" + dek_version.to_bytes(4, "big") + salt + nonce + okm[32:] + body


def _vector_inputs(v: dict[str, Any]) -> dict[str, Any]:
    return {
        "dek": bytes.fromhex(v["dek"]),
        "dek_version": int(v["dek_version"]),
        "chat_id": uuid.UUID(v["chat_id"]),
        "message_id": int(v["message_id"]),
        "salt": bytes.fromhex(v["salt"]),
        "nonce": bytes.fromhex(v["nonce"]),
        "plaintext": bytes.fromhex(v["plaintext"]),
    }


# --------------------------------------------------------------------------------------------
# The reference implementation is itself pinned by published known answers.
# --------------------------------------------------------------------------------------------


def test_reference_hkdf_matches_rfc5869_test_case_1() -> None:
    okm = ref_hkdf_sha256(b"\x0b" * 22, bytes(range(13)), bytes(range(0xF0, 0xFA)), 42)
    assert okm.hex() == (
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    )


@pytest.mark.parametrize(
    ("plaintext", "expected"),
    [  # McGrew & Viega, "The Galois/Counter Mode of Operation", AES-256 test cases 13 and 14
        (b"", "530f8afbc74536b9a963b4f1c4cb738b"),
        (bytes(16), "cea7403d4d606b6e074ec5d3baf39d18d0d1c8a799996bf0265b98b5d48ab919"),
    ],
)
def test_reference_gcm_matches_published_answers(plaintext: bytes, expected: str) -> None:
    assert ref_gcm_encrypt(bytes(32), bytes(12), plaintext, b"").hex() == expected


def test_reference_gcm_matches_cryptography_on_odd_lengths() -> None:
    for n in (1, 15, 17, 33, 200):
        key, nonce, aad, pt = os.urandom(32), os.urandom(12), os.urandom(n % 50), os.urandom(n)
        assert ref_gcm_encrypt(key, nonce, pt, aad) == AESGCM(key).encrypt(nonce, pt, aad)


def test_module_hkdf_equals_reference_and_cryptography_hkdf() -> None:
    """The module's HKDF choice is checked against a stdlib HMAC HKDF and cryptography's HKDF."""
    for i in range(200):
        key = ChatKey(version=1 + i * 10_000_019 % crypto.MAX_DEK_VERSION, material=os.urandom(32))
        context = _ctx(uuid.uuid4(), int.from_bytes(os.urandom(8)))
        salt = os.urandom(16)
        info = ref_info(context.chat_id, context.message_id, key.version)
        ctx = crypto._context_bytes(key, context)
        derived = crypto._derive(key, salt, ctx)
        expected = ref_hkdf_sha256(key.material, salt, info, 64)
        library = HKDF(hashes.SHA256(), 64, salt, info).derive(key.material)
        assert derived == (expected[:32], expected[32:]) == (library[:32], library[32:])


# --------------------------------------------------------------------------------------------
# Test vectors.
# --------------------------------------------------------------------------------------------


def _by_name(name: str) -> dict[str, Any]:
    return next(v for v in VECTORS if v["name"] == name)


def test_vector_file_covers_required_cases() -> None:
    assert len(VECTORS) >= 24
    assert len({v["name"] for v in VECTORS}) == len(VECTORS)
    lengths = {v["plaintext_len"] for v in VECTORS}
    assert {0, 1, 200, MAX_PLAINTEXT_BYTES} <= lengths
    ids = {int(v["message_id"]) for v in VECTORS}
    assert {0, 2**64 - 1} <= ids
    versions = {v["dek_version"] for v in VECTORS}
    assert {1, 2**31 - 1} <= versions
    assert len({v["chat_id"] for v in VECTORS}) >= 4
    texts = "".join(v["utf8"] or "" for v in VECTORS)
    # emoji, CJK, Arabic, combining mark, NUL
    for sample in ("\U0001f44b", "\u4f60", "\u0627", "\u0301", "\x00"):
        assert sample in texts
    assert any(v["utf8"] is None for v in VECTORS)  # and one that is not UTF-8 at all


def test_vector_file_is_what_the_generator_writes() -> None:
    spec = importlib.util.spec_from_file_location("_sealstream_vectors", VECTOR_DIR / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.render() == VECTOR_FILE.read_text(encoding="utf-8")


@pytest.mark.parametrize("v", VECTORS, ids=[v["name"] for v in VECTORS])
def test_vector_module(v: dict[str, Any]) -> None:
    i = _vector_inputs(v)
    key = ChatKey(version=i["dek_version"], material=i["dek"])
    context = _ctx(i["chat_id"], i["message_id"])
    envelope = bytes.fromhex(v["envelope"])
    assert crypto._seal_v1_with(i["plaintext"], key, context, i["salt"], i["nonce"]) == envelope
    assert open_envelope(envelope, key, context) == i["plaintext"]
    assert envelope_dek_version(envelope) == i["dek_version"]
    assert len(envelope) == len(i["plaintext"]) + 81
    if v["utf8"] is not None:
        assert v["utf8"].encode("utf-8") == i["plaintext"]
    else:
        with pytest.raises(UnicodeDecodeError):
            i["plaintext"].decode("utf-8")


@pytest.mark.parametrize("v", VECTORS, ids=[v["name"] for v in VECTORS])
def test_vector_independent(v: dict[str, Any]) -> None:
    i = _vector_inputs(v)
    info = ref_info(i["chat_id"], i["message_id"], i["dek_version"])
    aad = ref_aad(i["chat_id"], i["message_id"], i["dek_version"])
    okm = ref_hkdf_sha256(i["dek"], i["salt"], info, 64)
    assert v["info"] == info.hex()
    assert v["aad"] == aad.hex()
    assert v["message_key"] == okm[:32].hex()
    assert v["commitment"] == okm[32:].hex()
    expected = ref_seal(
        i["dek"],
        i["dek_version"],
        i["chat_id"],
        i["message_id"],
        i["salt"],
        i["nonce"],
        i["plaintext"],
    )
    assert v["envelope"] == expected.hex()
    # And cryptography's own GCM opens it with the independently derived key.
    body = expected[65:]
    assert AESGCM(okm[:32]).decrypt(i["nonce"], body, aad) == i["plaintext"]


@pytest.mark.parametrize("v", INVALID, ids=[v["name"] for v in INVALID])
def test_invalid_vectors_fail(v: dict[str, Any]) -> None:
    key = ChatKey(version=int(v["dek_version"]), material=bytes.fromhex(v["dek"]))
    context = _ctx(uuid.UUID(v["chat_id"]), int(v["message_id"]))
    with pytest.raises(DecryptionError):
        open_envelope(bytes.fromhex(v["envelope"]), key, context)


def test_worked_example_in_format_md_matches_vectors() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "format.md").read_text(encoding="utf-8")
    v = _by_name("hello")
    for field in ("dek", "salt", "nonce", "info", "message_key", "commitment", "aad"):
        assert v[field] in doc.replace("\n", "").replace(" ", ""), field
    assert v["envelope"] in doc.replace("\n", "").replace(" ", "")


# --------------------------------------------------------------------------------------------
# Round trips and randomisation.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 200, 4096, MAX_PLAINTEXT_BYTES])
def test_round_trip(size: int) -> None:
    key, context, plaintext = _key(3), _ctx(), os.urandom(size)
    envelope = seal(plaintext, key, context)
    assert len(envelope) == size + crypto.ENVELOPE_OVERHEAD == size + 81
    assert envelope[0] == 0x02 == crypto.FORMAT_VERSION  # seal writes v2
    assert envelope_dek_version(envelope) == 3
    assert open_envelope(envelope, key, context) == plaintext


def test_round_trip_accepts_bytes_like_inputs() -> None:
    key, context = _key(), _ctx()
    # The API is typed `bytes`; other buffers work at run time as a convenience.
    envelope = seal(bytearray(b"abc"), key, context)  # type: ignore[arg-type]
    assert open_envelope(memoryview(envelope), key, context) == b"abc"  # type: ignore[arg-type]
    assert open_envelope(bytearray(envelope), key, context) == b"abc"  # type: ignore[arg-type]
    assert envelope_dek_version(memoryview(envelope)) == 1  # type: ignore[arg-type]
    material = bytearray(os.urandom(32))
    k2 = ChatKey(version=1, material=material)  # type: ignore[arg-type]
    env2 = seal(b"x", k2, context)
    material[0] ^= 0xFF  # mutating the caller's buffer must not change the key
    assert open_envelope(env2, k2, context) == b"x"


def test_round_trip_unicode_text() -> None:
    key, context = _key(), _ctx()
    text = "👨‍👩‍👧 你好 مرحبا e\u0301 \x00 end"
    assert open_envelope(seal(text.encode(), key, context), key, context).decode() == text


def test_seal_is_randomised() -> None:
    key, context = _key(), _ctx()
    envelopes = {seal(b"same text", key, context) for _ in range(200)}
    assert len(envelopes) == 200
    salts = {e[5:21] for e in envelopes}
    nonces = {e[21:33] for e in envelopes}
    commitments = {e[33:65] for e in envelopes}
    assert len(salts) == len(nonces) == len(commitments) == 200
    for e in envelopes:
        assert open_envelope(e, key, context) == b"same text"


def test_seal_draws_salt_and_nonce_from_urandom(monkeypatch: pytest.MonkeyPatch) -> None:
    key, context = _key(), _ctx()
    calls: list[int] = []
    real = os.urandom

    def spy(n: int) -> bytes:
        calls.append(n)
        return real(n)

    monkeypatch.setattr(os, "urandom", spy)
    envelope = seal(b"hi", key, context)
    assert calls == [28]
    assert open_envelope(envelope, key, context) == b"hi"


# --------------------------------------------------------------------------------------------
# Tampering, truncation and misuse all fail with the one DecryptionError.
# --------------------------------------------------------------------------------------------


def _sample_envelopes() -> list[tuple[bytes, ChatKey, MessageContext]]:
    out = []
    for plaintext in (b"", b"x", os.urandom(200), "شكرا 🙏 谢谢".encode()):
        key, context = _key(2), _ctx(uuid.uuid4(), int.from_bytes(os.urandom(8)))
        out.append((seal(plaintext, key, context), key, context))
    return out


def test_flipping_any_byte_fails() -> None:
    for envelope, key, context in _sample_envelopes():
        for offset in range(len(envelope)):
            tampered = bytearray(envelope)
            tampered[offset] ^= 0x01
            with pytest.raises(DecryptionError):
                open_envelope(bytes(tampered), key, context)


def test_flipping_any_bit_of_an_empty_message_envelope_fails() -> None:
    key, context = _key(), _ctx()
    envelope = seal(b"", key, context)
    assert len(envelope) == 81
    for offset in range(len(envelope)):
        for bit in range(8):
            tampered = bytearray(envelope)
            tampered[offset] ^= 1 << bit
            with pytest.raises(DecryptionError):
                open_envelope(bytes(tampered), key, context)


def test_truncation_at_every_length_fails() -> None:
    for envelope, key, context in _sample_envelopes():
        for length in range(len(envelope)):
            with pytest.raises(DecryptionError):
                open_envelope(envelope[:length], key, context)


def test_extension_fails() -> None:
    for envelope, key, context in _sample_envelopes():
        for extra in (b"\x00", b"\x01" * 16):
            with pytest.raises(DecryptionError):
                open_envelope(envelope + extra, key, context)


def test_oversize_and_non_bytes_envelopes_fail() -> None:
    key, context = _key(), _ctx()
    with pytest.raises(DecryptionError):
        open_envelope(b"\x01" + b"\x00" * (MAX_PLAINTEXT_BYTES + 81), key, context)
    for junk in (None, "01" * 100, 12345, [1, 2, 3]):
        with pytest.raises(DecryptionError):
            open_envelope(junk, key, context)  # type: ignore[arg-type]
        with pytest.raises(DecryptionError):
            envelope_dek_version(junk)  # type: ignore[arg-type]


def test_wrong_key_fails() -> None:
    key, context = _key(), _ctx()
    envelope = seal(b"secret", key, context)
    with pytest.raises(DecryptionError):
        open_envelope(envelope, _key(), context)
    almost = bytearray(key.material)
    almost[31] ^= 0x01
    with pytest.raises(DecryptionError):
        open_envelope(envelope, ChatKey(version=1, material=bytes(almost)), context)


def test_wrong_dek_version_fails_even_with_the_right_bytes() -> None:
    material = os.urandom(32)
    context = _ctx()
    envelope = seal(b"secret", ChatKey(version=5, material=material), context)
    for version in (1, 4, 6, crypto.MAX_DEK_VERSION):
        with pytest.raises(DecryptionError):
            open_envelope(envelope, ChatKey(version=version, material=material), context)


def test_rewritten_header_dek_version_fails() -> None:
    """Header and key both say version 6, but the envelope was sealed as version 5."""
    material = os.urandom(32)
    context = _ctx()
    envelope = seal(b"secret", ChatKey(version=5, material=material), context)
    forged = envelope[:1] + (6).to_bytes(4, "big") + envelope[5:]
    assert envelope_dek_version(forged) == 6
    with pytest.raises(DecryptionError):
        open_envelope(forged, ChatKey(version=6, material=material), context)


def test_swapped_chat_id_fails() -> None:
    key = _key()
    envelope = seal(b"secret", key, _ctx(CHAT_1, 99))
    with pytest.raises(DecryptionError):
        open_envelope(envelope, key, _ctx(CHAT_2, 99))


def test_swapped_message_id_fails() -> None:
    key = _key()
    envelope = seal(b"secret", key, _ctx(CHAT_1, 99))
    for other in (0, 98, 100, 99 + 2**32, 2**64 - 1):
        with pytest.raises(DecryptionError):
            open_envelope(envelope, key, _ctx(CHAT_1, other))


def test_envelopes_moved_between_rows_fail() -> None:
    key = _key()
    row_a, row_b = _ctx(CHAT_1, 1001), _ctx(CHAT_1, 1002)
    env_a, env_b = seal(b"message A", key, row_a), seal(b"message B", key, row_b)
    assert open_envelope(env_a, key, row_a) == b"message A"
    assert open_envelope(env_b, key, row_b) == b"message B"
    with pytest.raises(DecryptionError):
        open_envelope(env_a, key, row_b)
    with pytest.raises(DecryptionError):
        open_envelope(env_b, key, row_a)
    # Same message id in another chat (another chat's row) is just as wrong.
    with pytest.raises(DecryptionError):
        open_envelope(env_a, key, _ctx(CHAT_2, 1001))


@pytest.mark.parametrize("byte", [0x00, 0x03, 0x10, 0xFF])
def test_unknown_format_version_fails(byte: int) -> None:
    key, context = _key(), _ctx()
    envelope = bytes([byte]) + seal(b"secret", key, context)[1:]
    with pytest.raises(DecryptionError):
        open_envelope(envelope, key, context)
    with pytest.raises(DecryptionError):
        envelope_dek_version(envelope)


def test_envelope_dek_version_rejects_malformed_headers() -> None:
    envelope = seal(b"secret", _key(9), _ctx())
    assert envelope_dek_version(envelope) == 9
    for bad in (
        b"",
        envelope[:80],
        envelope[:1] + b"\x00\x00\x00\x00" + envelope[5:],  # version 0
        envelope[:1] + b"\x80\x00\x00\x00" + envelope[5:],  # above 2**31 - 1
        envelope + b"\x00" * (MAX_PLAINTEXT_BYTES + 1),
    ):
        with pytest.raises(DecryptionError):
            envelope_dek_version(bad)


# --------------------------------------------------------------------------------------------
# Key commitment.
# --------------------------------------------------------------------------------------------


def test_mangled_commitment_with_intact_ciphertext_fails() -> None:
    key, context = _key(), _ctx()
    envelope = seal(b"secret", key, context)
    for offset in range(33, 65):
        mangled = bytearray(envelope)
        mangled[offset] ^= 0x80
        with pytest.raises(DecryptionError):
            open_envelope(bytes(mangled), key, context)
    zeroed = envelope[:33] + b"\x00" * 32 + envelope[65:]
    with pytest.raises(DecryptionError):
        open_envelope(zeroed, key, context)


def test_commitment_is_checked_before_decrypting(monkeypatch: pytest.MonkeyPatch) -> None:
    key, context = _key(), _ctx()
    envelope = seal(b"secret", key, context)
    mangled = envelope[:40] + bytes([envelope[40] ^ 1]) + envelope[41:]

    def no_aes(_key: bytes) -> AESGCM:
        raise AssertionError("AES-GCM must not run when the commitment does not match")

    monkeypatch.setattr(crypto, "AESGCM", no_aes)
    with pytest.raises(DecryptionError):
        open_envelope(mangled, key, context)


def _salamander(
    key1: bytes, key2: bytes, nonce: bytes, aad: bytes, tail: bytes
) -> tuple[bytes, bytes]:
    """Craft ciphertext||tag that AES-GCM accepts under BOTH keys (an "invisible salamander").

    The first ciphertext block is solved for so the two GHASH-based tags coincide; ``tail`` is
    the rest of the ciphertext (whole blocks). Returns (ciphertext, tag).
    """
    assert len(tail) % 16 == 0
    h1 = int.from_bytes(_aes_blocks(key1, bytes(16)), "big")
    h2 = int.from_bytes(_aes_blocks(key2, bytes(16)), "big")
    j0 = nonce + b"\x00\x00\x00\x01"
    e1, e2 = _aes_blocks(key1, j0), _aes_blocks(key2, j0)
    mask = int.from_bytes(e1, "big") ^ int.from_bytes(e2, "big")
    blocks = ghash_inputs(aad, bytes(16) + tail)
    free = len(_blocks(aad))  # index of the first ciphertext block
    m = len(blocks)
    acc = mask
    for idx, b in enumerate(blocks):
        if idx != free:
            acc ^= gf_mul(b, gf_pow(h1, m - idx) ^ gf_pow(h2, m - idx))
    coeff = gf_pow(h1, m - free) ^ gf_pow(h2, m - free)
    c_free = gf_mul(acc, gf_inv(coeff))
    ciphertext = c_free.to_bytes(16, "big") + tail
    s = ghash(h1, ghash_inputs(aad, ciphertext))
    tag = (s ^ int.from_bytes(_aes_blocks(key1, j0), "big")).to_bytes(16, "big")
    return ciphertext, tag


def test_commitment_defeats_invisible_salamanders(monkeypatch: pytest.MonkeyPatch) -> None:
    """Plain GCM accepts a crafted ciphertext under two keys; the envelope opens under one."""
    context = _ctx()
    dek1, dek2 = ChatKey(version=1, material=os.urandom(32)), ChatKey(1, os.urandom(32))
    salt, nonce = os.urandom(16), os.urandom(12)
    info = ref_info(context.chat_id, context.message_id, 1)
    aad = ref_aad(context.chat_id, context.message_id, 1)
    okm1 = ref_hkdf_sha256(dek1.material, salt, info, 64)
    okm2 = ref_hkdf_sha256(dek2.material, salt, info, 64)
    ciphertext, tag = _salamander(okm1[:32], okm2[:32], nonce, aad, os.urandom(32))

    # Plain AES-GCM is not committing: both keys accept it, and give different plaintexts.
    p1 = AESGCM(okm1[:32]).decrypt(nonce, ciphertext + tag, aad)
    p2 = AESGCM(okm2[:32]).decrypt(nonce, ciphertext + tag, aad)
    assert p1 != p2

    header = b"\x01" + (1).to_bytes(4, "big") + salt + nonce
    for commitment in (okm1[32:], okm2[32:], os.urandom(32)):
        envelope = header + commitment + ciphertext + tag
        opened = []
        for dek in (dek1, dek2):
            try:
                opened.append(open_envelope(envelope, dek, context))
            except DecryptionError:
                pass
        assert len(opened) <= 1  # the commitment pins the envelope to at most one key

    # Without the commitment check the same envelope would open under both keys.
    monkeypatch.setattr(crypto, "hmac", SimpleNamespace(compare_digest=lambda a, b: True))
    envelope = header + okm1[32:] + ciphertext + tag
    assert open_envelope(envelope, dek1, context) == p1
    assert open_envelope(envelope, dek2, context) == p2


# --------------------------------------------------------------------------------------------
# Nothing secret in errors or reprs; input validation.
# --------------------------------------------------------------------------------------------


def test_decryption_errors_leak_nothing() -> None:
    plaintext = b"TOP-SECRET-PLAINTEXT-4242"
    key, context = _key(), _ctx()
    envelope = seal(plaintext, key, context)
    failures: list[Callable[[], object]] = [
        lambda: open_envelope(envelope, _key(), context),
        lambda: open_envelope(envelope[:-1], key, context),
        lambda: open_envelope(envelope, key, _ctx(CHAT_2)),
        lambda: open_envelope(b"\x03" + envelope[1:], key, context),
        lambda: open_envelope(b"\x01" + envelope[1:], key, context),  # v2 relabelled v1
        lambda: open_envelope(envelope, ChatKey(version=2, material=key.material), context),
        lambda: envelope_dek_version(b"junk"),
    ]
    messages = set()
    for fail in failures:
        with pytest.raises(DecryptionError) as info:
            fail()
        err = info.value
        assert type(err) is DecryptionError
        assert isinstance(err, SealstreamError)
        assert err.__cause__ is None and err.__context__ is None
        rendered = str(err) + repr(err) + "".join(traceback.format_exception(err))
        for secret in (plaintext.decode(), plaintext.hex(), key.material.hex(), repr(key.material)):
            assert secret not in rendered
        assert "InvalidTag" not in rendered
        messages.add((str(err), err.args))
    assert len(messages) == 1  # one message for every cause


def test_chat_key_repr_hides_material() -> None:
    material = bytes(range(32))
    key = ChatKey(version=3, material=material)
    assert repr(key) == "ChatKey(version=3, material=<redacted>)"
    for rendered in (repr(key), str(key), f"{key}", f"{key!r}", repr([key]), repr({"k": key})):
        assert material.hex() not in rendered
        assert repr(material) not in rendered
        assert "redacted" in rendered


@pytest.mark.parametrize(
    ("version", "material", "error"),
    [
        (0, bytes(32), ValueError),
        (-1, bytes(32), ValueError),
        (2**31, bytes(32), ValueError),
        (1, bytes(31), ValueError),
        (1, bytes(33), ValueError),
        (1, b"", ValueError),
        (True, bytes(32), TypeError),
        ("1", bytes(32), TypeError),
        (1, "00" * 32, TypeError),
    ],
)
def test_chat_key_validation(version: Any, material: Any, error: type[Exception]) -> None:
    with pytest.raises(error) as info:
        ChatKey(version=version, material=material)
    if material:
        secret = material.hex() if isinstance(material, bytes) else material
        assert secret not in str(info.value)


@pytest.mark.parametrize(
    ("chat_id", "message_id", "error"),
    [
        (CHAT_1, -1, ValueError),
        (CHAT_1, 2**64, ValueError),
        (CHAT_1, 1.0, TypeError),
        (CHAT_1, False, TypeError),
        (str(CHAT_1), 1, TypeError),
        (CHAT_1.bytes, 1, TypeError),
    ],
)
def test_message_context_validation(chat_id: Any, message_id: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        _ctx(chat_id, message_id)


def test_message_context_bounds_are_allowed() -> None:
    _ctx(CHAT_1, 0)
    _ctx(CHAT_1, 2**64 - 1)
    ChatKey(version=1, material=bytes(32))
    ChatKey(version=2**31 - 1, material=bytes(32))


def test_size_limit_names_the_limit_and_never_the_text() -> None:
    key, context = _key(), _ctx()
    assert MAX_PLAINTEXT_BYTES == 65536
    seal(b"a" * MAX_PLAINTEXT_BYTES, key, context)  # exactly at the limit is fine
    text = b"Z" * (MAX_PLAINTEXT_BYTES + 1)
    with pytest.raises(MessageTooLarge) as info:
        seal(text, key, context)
    err = info.value
    assert isinstance(err, ValueError) and isinstance(err, InvalidMessage)
    assert "65536" in str(err) and "65537" in str(err)
    assert "ZZZZ" not in str(err) + repr(err)
    assert key.material.hex() not in str(err)


def test_seal_rejects_non_bytes_plaintext() -> None:
    with pytest.raises(TypeError) as info:
        seal("a str", _key(), _ctx())  # type: ignore[arg-type]
    assert "a str" not in str(info.value)


def test_seal_with_rejects_bad_salt_or_nonce_lengths() -> None:
    key, context = _key(), _ctx()
    with pytest.raises(ValueError):
        crypto._seal_with(b"x", key, context, bytes(15), bytes(12))
    with pytest.raises(ValueError):
        crypto._seal_with(b"x", key, context, bytes(16), bytes(16))


def test_benchmark_runs_quietly(capsys: pytest.CaptureFixture[str]) -> None:
    from sealstream.bench.crypto_bench import run

    figures = run(seconds=0.05, size=32)
    assert figures["seal_per_s"] > 0 and figures["open_per_s"] > 0
    assert figures["size"] == 32
    assert capsys.readouterr() == ("", "")
