"""Tests of envelope format v2 (docs/format.md, "Envelope format v2") and of v1 -> v2 dispatch.

The vectors in tests/vectors/envelope_v2.json are checked through the module and through an
independent implementation written here from the spec (the stdlib-HMAC HKDF and pure-Python GCM
of test_crypto.py, themselves pinned by RFC 5869 and GCM known answers). Every test of a success
also checks the failures next to it: another sender, revision, creation time, chat, message id or
DEK version, and both directions of a format downgrade.
"""

from __future__ import annotations

import base64
import dataclasses
import importlib.util
import json
import os
import struct
import traceback
import uuid
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sealstream import crypto
from sealstream.crypto import (
    FORMAT_V1,
    FORMAT_V2,
    MAX_SENDER_ID_BYTES,
    ChatKey,
    MessageContext,
    envelope_dek_version,
    envelope_format,
    open_envelope,
    seal,
)
from sealstream.errors import DecryptionError
from sealstream.keys.service import kms_context
from tests.unit.test_crypto import ref_gcm_encrypt, ref_hkdf_sha256

VECTOR_DIR = Path(__file__).resolve().parents[1] / "vectors"
VECTOR_FILE = VECTOR_DIR / "envelope_v2.json"
DATA: dict[str, Any] = json.loads(VECTOR_FILE.read_text(encoding="utf-8"))
VECTORS: list[dict[str, Any]] = DATA["vectors"]
V1_COMPAT: list[dict[str, Any]] = DATA["v1_compat"]
INVALID: list[dict[str, Any]] = DATA["invalid"]

CHAT_1 = uuid.UUID("11111111-2222-4333-8444-555555555555")
CHAT_2 = uuid.UUID("99999999-8888-4777-8666-555555555555")
T0 = 1_767_225_600_000


def _key(version: int = 1, material: bytes | None = None) -> ChatKey:
    return ChatKey(version=version, material=material if material is not None else os.urandom(32))


def _ctx(**changes: Any) -> MessageContext:
    base = MessageContext(CHAT_1, 7_000_000_000_000_001, "alice", 1, T0)
    return dataclasses.replace(base, **changes)


def _v1(plaintext: bytes, key: ChatKey, context: MessageContext) -> bytes:
    rnd = os.urandom(28)
    return crypto._seal_v1_with(plaintext, key, context, rnd[:16], rnd[16:])


# --------------------------------------------------------------------------------------------
# Independent reference implementation of v2, written from docs/format.md.
# --------------------------------------------------------------------------------------------


def ref_context_v2(
    chat_id: uuid.UUID,
    message_id: int,
    dek_version: int,
    revision: int,
    created_at_ms: int,
    sender_id: str,
) -> bytes:
    sender = sender_id.encode("utf-8")
    return (
        chat_id.bytes
        + message_id.to_bytes(8, "big")
        + dek_version.to_bytes(4, "big")
        + revision.to_bytes(4, "big")
        + created_at_ms.to_bytes(8, "big")
        + len(sender).to_bytes(2, "big")
        + sender
    )


def ref_seal_v2(i: dict[str, Any]) -> tuple[bytes, bytes, bytes, bytes]:
    """(context, info, aad, envelope) for vector inputs, from the spec alone."""
    ctx = ref_context_v2(
        i["chat_id"],
        i["message_id"],
        i["dek_version"],
        i["revision"],
        i["created_at_ms"],
        i["sender_id"],
    )
    info = b"sealstream/msg/v2" + ctx
    aad = b"sealstream/aad/v2" + b"\x02" + ctx
    okm = ref_hkdf_sha256(i["dek"], i["salt"], info, 64)
    body = ref_gcm_encrypt(okm[:32], i["nonce"], i["plaintext"], aad)
    header = b"\x02" + i["dek_version"].to_bytes(4, "big") + i["salt"] + i["nonce"] + okm[32:]
    return ctx, info, aad, header + body


def _inputs(v: dict[str, Any]) -> dict[str, Any]:
    return {
        "dek": bytes.fromhex(v["dek"]),
        "dek_version": int(v["dek_version"]),
        "chat_id": uuid.UUID(v["chat_id"]),
        "message_id": int(v["message_id"]),
        "sender_id": v["sender_id"],
        "revision": int(v["revision"]),
        "created_at_ms": int(v["created_at_ms"]),
        "salt": bytes.fromhex(v.get("salt", "")),
        "nonce": bytes.fromhex(v.get("nonce", "")),
        "plaintext": bytes.fromhex(v.get("plaintext", "")),
    }


def _key_ctx(i: dict[str, Any]) -> tuple[ChatKey, MessageContext]:
    key = ChatKey(version=i["dek_version"], material=i["dek"])
    context = MessageContext(
        i["chat_id"], i["message_id"], i["sender_id"], i["revision"], i["created_at_ms"]
    )
    return key, context


# --------------------------------------------------------------------------------------------
# Vectors.
# --------------------------------------------------------------------------------------------


def test_vector_file_is_what_the_generator_writes() -> None:
    spec = importlib.util.spec_from_file_location(
        "_sealstream_vectors_v2", VECTOR_DIR / "generate_v2.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.render() == VECTOR_FILE.read_text(encoding="utf-8")


def test_vector_file_covers_required_cases() -> None:
    assert len({v["name"] for v in VECTORS}) == len(VECTORS) >= 30
    assert {0, 1, 200, crypto.MAX_PLAINTEXT_BYTES} <= {v["plaintext_len"] for v in VECTORS}
    assert {0, 2**63, 2**64 - 1} <= {int(v["message_id"]) for v in VECTORS}
    assert {1, 2, 2**31 - 1} <= {v["revision"] for v in VECTORS}
    assert {0, 2**63 - 1} <= {int(v["created_at_ms"]) for v in VECTORS}
    senders = {v["sender_id"] for v in VECTORS}
    assert "x" in senders and "s" * MAX_SENDER_ID_BYTES in senders
    assert any(not s.isascii() for s in senders)
    # The pairs differ from pair-base in exactly one input, and every envelope differs.
    pairs = [v for v in VECTORS if v["name"].startswith("pair-")]
    assert len({v["envelope"] for v in pairs}) == len(pairs) == 8
    assert {"v1-as-revision-1", "v1-any-sender"} == {v["name"] for v in V1_COMPAT}
    names = {v["name"] for v in INVALID}
    for required in (
        "downgrade-v2-as-v1",
        "downgrade-v1-for-revision-2",
        "upgrade-v1-as-v2",
        "wrong-sender",
        "wrong-revision",
        "wrong-created",
        "wrong-chat",
        "wrong-message-id",
        "context-dek-version",
    ):
        assert required in names


@pytest.mark.parametrize("v", VECTORS, ids=[v["name"] for v in VECTORS])
def test_vector_module(v: dict[str, Any]) -> None:
    i = _inputs(v)
    key, context = _key_ctx(i)
    envelope = bytes.fromhex(v["envelope"])
    assert crypto._seal_with(i["plaintext"], key, context, i["salt"], i["nonce"]) == envelope
    assert open_envelope(envelope, key, context) == i["plaintext"]
    assert envelope_format(envelope) == FORMAT_V2
    assert envelope_dek_version(envelope) == i["dek_version"]
    assert len(envelope) == len(i["plaintext"]) + 81
    assert bytes.fromhex(v["sender_id_utf8"]) == i["sender_id"].encode("utf-8")
    # The same envelope under each one-input change of its context fails.
    for change in (
        {"sender_id": "bob" if i["sender_id"] != "bob" else "alice"},
        {"revision": i["revision"] % crypto.MAX_REVISION + 1},
        {"created_at_ms": i["created_at_ms"] ^ 1},
        {"message_id": i["message_id"] ^ 1},
        {"chat_id": uuid.UUID(int=i["chat_id"].int ^ 1)},
    ):
        with pytest.raises(DecryptionError):
            open_envelope(envelope, key, dataclasses.replace(context, **change))


@pytest.mark.parametrize("v", VECTORS, ids=[v["name"] for v in VECTORS])
def test_vector_independent(v: dict[str, Any]) -> None:
    i = _inputs(v)
    ctx, info, aad, envelope = ref_seal_v2(i)
    assert v["context"] == ctx.hex()
    assert v["info"] == info.hex()
    assert v["aad"] == aad.hex()
    okm = ref_hkdf_sha256(i["dek"], i["salt"], info, 64)
    assert v["message_key"] == okm[:32].hex()
    assert v["commitment"] == okm[32:].hex()
    assert v["envelope"] == envelope.hex()
    assert AESGCM(okm[:32]).decrypt(i["nonce"], envelope[65:], aad) == i["plaintext"]


@pytest.mark.parametrize("v", V1_COMPAT, ids=[v["name"] for v in V1_COMPAT])
def test_v1_compat_vectors_open(v: dict[str, Any]) -> None:
    i = _inputs(v)
    key, context = _key_ctx(i)
    envelope = bytes.fromhex(v["envelope"])
    assert envelope_format(envelope) == FORMAT_V1
    assert open_envelope(envelope, key, context) == i["plaintext"]
    with pytest.raises(DecryptionError):  # but never as an edited message
        open_envelope(envelope, key, dataclasses.replace(context, revision=2))


@pytest.mark.parametrize("v", INVALID, ids=[v["name"] for v in INVALID])
def test_invalid_vectors_fail(v: dict[str, Any]) -> None:
    key, context = _key_ctx(_inputs(v))
    with pytest.raises(DecryptionError):
        open_envelope(bytes.fromhex(v["envelope"]), key, context)


def test_worked_example_in_format_md_matches_vectors() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "format.md").read_text(encoding="utf-8")
    flat = doc.replace("\n", "").replace(" ", "")
    v = next(v for v in VECTORS if v["name"] == "hello")
    for field in ("dek", "salt", "nonce", "context", "info", "message_key", "commitment", "aad"):
        assert v[field] in flat, field
    assert v["envelope"] in flat


# --------------------------------------------------------------------------------------------
# What v2 binds, and the downgrade rules.
# --------------------------------------------------------------------------------------------


def test_seal_writes_v2_and_round_trips() -> None:
    key, context = _key(4), _ctx()
    envelope = seal(b"hello", key, context)
    assert envelope[0] == FORMAT_V2 == envelope_format(envelope)
    assert envelope_dek_version(envelope) == 4
    assert open_envelope(envelope, key, context) == b"hello"


@pytest.mark.parametrize(
    "change",
    [
        {"sender_id": "mallory"},
        {"sender_id": "Alice"},
        {"sender_id": "alice\x00"},
        {"revision": 2},
        {"created_at_ms": T0 + 1},
        {"created_at_ms": T0 - 1},
        {"chat_id": CHAT_2},
        {"message_id": 7_000_000_000_000_002},
    ],
    ids=lambda c: "-".join(f"{k}={v!r}" for k, v in c.items()),
)
def test_v2_envelope_moved_to_another_context_fails(change: dict[str, Any]) -> None:
    key, context = _key(), _ctx()
    envelope = seal(b"who said it", key, context)
    assert open_envelope(envelope, key, context) == b"who said it"
    with pytest.raises(DecryptionError):
        open_envelope(envelope, key, dataclasses.replace(context, **change))


def test_v2_envelope_under_another_dek_version_fails() -> None:
    material = os.urandom(32)
    envelope = seal(b"x", ChatKey(1, material), _ctx())
    relabelled = envelope[:1] + (2).to_bytes(4, "big") + envelope[5:]
    for bad_envelope, key in (
        (envelope, ChatKey(2, material)),  # header says 1, key is version 2
        (relabelled, ChatKey(2, material)),  # header rewritten to match the key
        (relabelled, ChatKey(1, material)),
    ):
        with pytest.raises(DecryptionError):
            open_envelope(bad_envelope, key, _ctx())


def test_the_sender_is_bound_byte_for_byte() -> None:
    """No normalisation: NFC and NFD spellings of one name are two senders."""
    key = _key()
    envelope = seal(b"x", key, _ctx(sender_id="Zo\u00eb"))
    assert open_envelope(envelope, key, _ctx(sender_id="Zo\u00eb")) == b"x"
    with pytest.raises(DecryptionError):
        open_envelope(envelope, key, _ctx(sender_id="Zoe\u0308"))


def test_a_wrong_sender_fails_at_the_commitment_before_any_aes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key, context = _key(), _ctx()
    envelope = seal(b"x", key, context)

    def no_aes(_key: bytes) -> AESGCM:
        raise AssertionError("AES-GCM must not run when the commitment does not match")

    monkeypatch.setattr(crypto, "AESGCM", no_aes)
    for change in ({"sender_id": "bob"}, {"revision": 3}, {"created_at_ms": 5}):
        with pytest.raises(DecryptionError):
            open_envelope(envelope, key, dataclasses.replace(context, **change))


def test_v1_envelopes_still_open_as_revision_1_whatever_the_sender() -> None:
    key, context = _key(), _ctx()
    envelope = _v1(b"from before v2", key, context)
    assert envelope_format(envelope) == FORMAT_V1
    assert envelope_dek_version(envelope) == 1
    assert open_envelope(envelope, key, context) == b"from before v2"
    # v1 never bound sender or time (the weakness v2 removes), so they do not matter to it ...
    assert open_envelope(envelope, key, _ctx(sender_id="bob", created_at_ms=0)) == (
        b"from before v2"
    )
    # ... but the ids, the key and the version still do.
    for bad in (_ctx(chat_id=CHAT_2), _ctx(message_id=1)):
        with pytest.raises(DecryptionError):
            open_envelope(envelope, key, bad)
    with pytest.raises(DecryptionError):
        open_envelope(envelope, _key(), context)


@pytest.mark.parametrize("revision", [2, 3, crypto.MAX_REVISION])
def test_v1_envelope_claimed_for_an_edited_revision_fails(revision: int) -> None:
    key, context = _key(), _ctx()
    envelope = _v1(b"old text", key, context)
    with pytest.raises(DecryptionError):
        open_envelope(envelope, key, _ctx(revision=revision))


def test_v2_envelope_relabelled_v1_fails() -> None:
    key, context = _key(), _ctx()
    envelope = seal(b"x", key, context)
    downgraded = bytes([FORMAT_V1]) + envelope[1:]
    assert envelope_format(downgraded) == FORMAT_V1
    with pytest.raises(DecryptionError):
        open_envelope(downgraded, key, context)


def test_v1_envelope_relabelled_v2_fails() -> None:
    key, context = _key(), _ctx()
    upgraded = bytes([FORMAT_V2]) + _v1(b"x", key, context)[1:]
    with pytest.raises(DecryptionError):
        open_envelope(upgraded, key, context)


def test_flipping_any_byte_of_a_v2_envelope_fails() -> None:
    key, context = _key(), _ctx()
    envelope = seal(b"flip me", key, context)
    for offset in range(len(envelope)):
        tampered = bytearray(envelope)
        tampered[offset] ^= 0x01
        with pytest.raises(DecryptionError):
            open_envelope(bytes(tampered), key, context)


def test_envelope_format_rejects_malformed_headers() -> None:
    envelope = seal(b"x", _key(), _ctx())
    for bad in (b"", envelope[:80], b"\x03" + envelope[1:], b"\x00" + envelope[1:]):
        with pytest.raises(DecryptionError):
            envelope_format(bad)
    with pytest.raises(DecryptionError):
        envelope_format("not bytes")  # type: ignore[arg-type]


def test_new_failures_leak_nothing() -> None:
    key, context = _key(), _ctx(sender_id="sender-name-7731")
    envelope = seal(b"TOP-SECRET-V2", key, context)
    messages = set()
    for bad in (
        _ctx(sender_id="other-sender-9921"),
        _ctx(sender_id="sender-name-7731", revision=2),
        _ctx(sender_id="sender-name-7731", created_at_ms=1),
    ):
        with pytest.raises(DecryptionError) as info:
            open_envelope(envelope, key, bad)
        err = info.value
        assert err.__cause__ is None and err.__context__ is None
        rendered = str(err) + repr(err) + "".join(traceback.format_exception(err))
        for secret in ("TOP-SECRET-V2", "sender-name", "other-sender", key.material.hex()):
            assert secret not in rendered
        messages.add((str(err), err.args))
    assert len(messages) == 1


# --------------------------------------------------------------------------------------------
# MessageContext validation (a bad context fails when built, naming the field).
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "error", "field"),
    [
        ({"sender_id": ""}, ValueError, "sender_id"),
        ({"sender_id": "s" * (MAX_SENDER_ID_BYTES + 1)}, ValueError, "sender_id"),
        ({"sender_id": "é" * (MAX_SENDER_ID_BYTES // 2 + 1)}, ValueError, "sender_id"),
        ({"sender_id": "\ud800"}, ValueError, "sender_id"),
        ({"sender_id": b"alice"}, TypeError, "sender_id"),
        ({"sender_id": None}, TypeError, "sender_id"),
        ({"revision": 0}, ValueError, "revision"),
        ({"revision": 2**31}, ValueError, "revision"),
        ({"revision": True}, TypeError, "revision"),
        ({"revision": 1.0}, TypeError, "revision"),
        ({"created_at_ms": -1}, ValueError, "created_at_ms"),
        ({"created_at_ms": 2**63}, ValueError, "created_at_ms"),
        ({"created_at_ms": "0"}, TypeError, "created_at_ms"),
    ],
)
def test_message_context_validation(change: dict[str, Any], error: type, field: str) -> None:
    with pytest.raises(error) as info:
        _ctx(**change)
    assert field in str(info.value)


def test_message_context_bounds_are_allowed() -> None:
    _ctx(sender_id="s" * MAX_SENDER_ID_BYTES, revision=crypto.MAX_REVISION)
    _ctx(sender_id="x", revision=1, created_at_ms=0)
    _ctx(created_at_ms=2**63 - 1)


def test_context_encoding_is_the_documented_struct() -> None:
    key, context = _key(7), _ctx(sender_id="bob", revision=5, created_at_ms=T0)
    ctx = crypto._context_bytes_v2(key, context)
    assert ctx == struct.pack(">16sQIIQH", CHAT_1.bytes, context.message_id, 7, 5, T0, 3) + b"bob"
    assert len(ctx) == 42 + 3


def test_dek_context_in_format_md_is_what_the_key_service_sends() -> None:
    """docs/format.md §11 gives the Transit context byte for byte; it must be kms_context's."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "format.md").read_text(encoding="utf-8")
    context = kms_context(uuid.UUID("0f8e6b2a-3c1d-4e5f-8a7b-9c0d1e2f3a4b"), 1)
    assert len(context) == 38 and context.startswith(b"sealstream/dek/v1:")
    assert context.hex() in doc
    assert base64.b64encode(context).decode() in doc
    # The version and chat are the only variable parts, in that layout.
    assert (
        kms_context(CHAT_2, 2**31 - 1) == b"sealstream/dek/v1:" + CHAT_2.bytes + b"\x7f\xff\xff\xff"
    )
