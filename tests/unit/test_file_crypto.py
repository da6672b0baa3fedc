"""Attachment file format v1 (sealstream/file_crypto.py, docs/format.md "Attachment files").

The vectors are checked twice: by the module, and by an independent reading of the page
(stdlib HMAC for HKDF, the offsets and strings as the page states them), so the module and the
page cannot drift apart. Then what a user relies on: any plaintext range reads back exactly,
encryption streams, and every way of moving, cutting or changing the stored bytes is refused.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib.util
import json
import os
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sealstream.crypto import ChatKey
from sealstream.errors import DecryptionError
from sealstream.file_crypto import (
    FILE_HEADER_LEN,
    FileContext,
    FileLayout,
    FileOpener,
    _encrypt_with,
    decrypt_file,
    encrypt_file,
    file_header_info,
)

VECTOR_DIR = Path(__file__).resolve().parents[1] / "vectors"
VECTORS: list[dict[str, Any]] = json.loads((VECTOR_DIR / "file_v1.json").read_text())["vectors"]
SEG = 64  # small segments: many boundaries at test sizes
KEY = ChatKey(3, bytes(range(32)))
CHAT_A = uuid.UUID("11111111-2222-4333-8444-555555555555")
CHAT_B = uuid.UUID("99999999-2222-4333-8444-555555555555")
CTX = FileContext(CHAT_A, 1001)


def seal(data: bytes, ctx: FileContext = CTX, key: ChatKey = KEY) -> bytes:
    return b"".join(encrypt_file(key, ctx, [data], segment_size=SEG))


def opened(stored: bytes, ctx: FileContext = CTX, key: ChatKey = KEY) -> bytes:
    return b"".join(decrypt_file(key, ctx, [stored]))


def segments_of(stored: bytes) -> tuple[bytes, list[bytes]]:
    body = stored[FILE_HEADER_LEN:]
    step = SEG + 16
    return stored[:FILE_HEADER_LEN], [body[i : i + step] for i in range(0, len(body), step)]


def refused(stored: bytes, ctx: FileContext = CTX, key: ChatKey = KEY) -> None:
    with pytest.raises(DecryptionError) as caught:
        opened(stored, ctx, key)
    assert caught.value.__cause__ is None and caught.value.__context__ is None


# --- the vectors, by the module and by the page ----------------------------------------------------


def vector_inputs(v: dict[str, Any]) -> tuple[ChatKey, FileContext]:
    key = ChatKey(v["dek_version"], bytes.fromhex(v["dek"]))
    return key, FileContext(uuid.UUID(v["chat_id"]), int(v["file_id"]))


def test_the_vectors_cover_the_sizes_the_issue_names() -> None:
    sizes = {len(bytes.fromhex(v["plaintext"])) for v in VECTORS}
    assert {0, 1, SEG, SEG + 1} <= sizes
    assert any(len(v["segments"]) >= 3 for v in VECTORS)


@pytest.mark.parametrize("v", VECTORS, ids=lambda v: v["name"])
def test_the_module_writes_and_reads_each_vector(v: dict[str, Any]) -> None:
    key, ctx = vector_inputs(v)
    plaintext = bytes.fromhex(v["plaintext"])
    pieces = _encrypt_with(
        key,
        ctx,
        [plaintext],
        v["segment_size"],
        bytes.fromhex(v["salt"]),
        bytes.fromhex(v["nonce_prefix"]),
    )
    assert b"".join(pieces).hex() == v["file"]
    assert b"".join(decrypt_file(key, ctx, [bytes.fromhex(v["file"])])) == plaintext


def hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    """RFC 5869 with the standard library only."""
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
        counter += 1
    return out[:length]


def read_per_the_page(
    stored: bytes, dek: bytes, version: int, chat: uuid.UUID, file_id: int
) -> bytes:
    """docs/format.md, "Attachment files", section "Opening", step by step."""
    assert len(stored) >= 80 and stored[0] == 0x01
    header_version, segment_size = struct.unpack(">II", stored[1:9])
    assert header_version == version
    salt, prefix, commitment = stored[9:41], stored[41:48], stored[48:80]
    context = chat.bytes + file_id.to_bytes(8, "big") + version.to_bytes(4, "big")
    context += segment_size.to_bytes(4, "big")
    okm = hkdf_sha256(dek, salt, b"sealstream/file/v1" + context, 64)
    assert hmac.compare_digest(okm[32:], commitment)
    body = stored[80:]
    full = segment_size + 16
    count = max(1, -(-len(body) // full))
    plaintext = b""
    for i in range(count):
        last = 1 if i == count - 1 else 0
        suffix = i.to_bytes(4, "big") + bytes([last])
        aad = b"sealstream/file-aad/v1" + b"\x01" + context + suffix
        plaintext += AESGCM(okm[:32]).decrypt(prefix + suffix, body[i * full : (i + 1) * full], aad)
    return plaintext


@pytest.mark.parametrize("v", VECTORS, ids=lambda v: v["name"])
def test_an_independent_reading_of_the_page_opens_each_vector(v: dict[str, Any]) -> None:
    stored = bytes.fromhex(v["file"])
    plaintext = read_per_the_page(
        stored,
        bytes.fromhex(v["dek"]),
        v["dek_version"],
        uuid.UUID(v["chat_id"]),
        int(v["file_id"]),
    )
    assert plaintext.hex() == v["plaintext"]
    assert stored[:80].hex() == v["header"]
    assert len(stored) == 80 + len(plaintext) + 16 * len(v["segments"])


def test_the_vector_file_is_what_its_generator_writes() -> None:
    spec = importlib.util.spec_from_file_location(
        "_file_vectors", VECTOR_DIR / "generate_file_v1.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.render() == (VECTOR_DIR / "file_v1.json").read_text()


# --- sizes, ranges and streaming -----------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, SEG - 1, SEG, SEG + 1, 3 * SEG, 3 * SEG + 5])
def test_round_trip_sizes_and_the_layout_arithmetic(size: int) -> None:
    data = os.urandom(size)
    stored = b"".join(
        encrypt_file(KEY, CTX, (data[i : i + 7] for i in range(0, size, 7)), segment_size=SEG)
    )
    layout = FileLayout(SEG)
    assert len(stored) == layout.ciphertext_size(size)
    assert layout.plaintext_size(len(stored)) == size
    assert file_header_info(stored[:FILE_HEADER_LEN]) == (KEY.version, SEG)
    # Fed in odd chunks too: segment boundaries fall inside chunks.
    assert (
        b"".join(decrypt_file(KEY, CTX, (stored[i : i + 11] for i in range(0, len(stored), 11))))
        == data
    )


def test_every_plaintext_range_decrypts_only_its_segments() -> None:
    size = 5 * SEG + 9
    data = os.urandom(size)
    stored = seal(data)
    layout = FileLayout(SEG)
    opener = FileOpener.from_header(KEY, CTX, stored[:FILE_HEADER_LEN])
    for start in range(0, size, 7):
        for length in (1, 2, SEG - 1, SEG, SEG + 1, 2 * SEG + 3, size):
            if start + length > size:
                continue
            span = layout.span(start, length, size)
            assert span.first == start // SEG and span.last == (start + length - 1) // SEG
            ciphertext = stored[span.ciphertext_start : span.ciphertext_end]
            assert len(ciphertext) <= (span.last - span.first + 1) * (SEG + 16)
            got = b"".join(opener.decrypt_range([ciphertext], span, size))
            assert got == data[start : start + length], (start, length)
    with pytest.raises(ValueError, match="not inside"):
        layout.span(size - 1, 2, size)


def test_encryption_streams_holding_at_most_two_segments() -> None:
    consumed = 0

    def source() -> Iterator[bytes]:
        nonlocal consumed
        for _ in range(100):
            consumed += 16
            yield os.urandom(16)

    pieces = encrypt_file(KEY, CTX, source(), segment_size=SEG)
    assert len(next(pieces)) == FILE_HEADER_LEN and consumed == 0
    first = next(pieces)
    assert len(first) == SEG + 16
    assert consumed <= 2 * SEG  # the rest of the input is still unread
    assert b"".join([first, *pieces]) and consumed == 1600


# --- tampering -----------------------------------------------------------------------------------

DATA = bytes(range(256)) * 2  # 512 bytes: 8 full segments


def test_reordered_segments_are_refused() -> None:
    header, segs = segments_of(seal(DATA))
    refused(header + segs[1] + segs[0] + b"".join(segs[2:]))


def test_a_file_cut_at_a_segment_boundary_is_refused() -> None:
    stored = seal(DATA + b"tail")
    header, segs = segments_of(stored)
    for kept in range(len(segs)):  # the header alone, then 1 .. n-1 whole segments
        refused(header + b"".join(segs[:kept]))


def test_dropping_the_last_segment_is_refused() -> None:
    header, segs = segments_of(seal(DATA + b"tail"))
    refused(header + b"".join(segs[:-1]))
    # Also when the last segment is full: the one before it was sealed as "not last".
    header, segs = segments_of(seal(DATA))
    refused(header + b"".join(segs[:-1]))


def test_an_extended_file_is_refused() -> None:
    stored = seal(DATA)
    _header, segs = segments_of(stored)
    refused(stored + segs[-1])  # the last segment again
    refused(stored + os.urandom(SEG + 16))  # a full segment of noise
    refused(stored + b"\x00")  # one byte
    other = seal(DATA, FileContext(CHAT_A, 1002))
    refused(stored + segments_of(other)[1][0])  # a valid segment of another file


def test_segments_moved_between_files_of_one_chat_are_refused() -> None:
    a = seal(DATA)
    b = seal(DATA, FileContext(CHAT_A, 1002))  # same key, same chat, same text, other file
    ha, sa = segments_of(a)
    hb, sb = segments_of(b)
    refused(ha + sb[0] + b"".join(sa[1:]))
    refused(hb + b"".join(sa), FileContext(CHAT_A, 1002))  # the other file's header
    refused(a, FileContext(CHAT_A, 1002))  # the whole file opened as another file


def test_files_moved_between_chats_are_refused() -> None:
    a = seal(DATA)
    b = seal(DATA, FileContext(CHAT_B, 1001))  # same file id, same DEK bytes, other chat
    refused(a, FileContext(CHAT_B, 1001))
    ha, sa = segments_of(a)
    _hb, sb = segments_of(b)
    refused(ha + sb[0] + b"".join(sa[1:]))


def test_every_flipped_bit_is_refused() -> None:
    stored = seal(DATA[:150])
    for offset in range(len(stored)):
        for bit in (0, 7):
            damaged = bytearray(stored)
            damaged[offset] ^= 1 << bit
            refused(bytes(damaged))


def test_the_wrong_dek_version_is_refused() -> None:
    stored = seal(DATA)
    same_bytes_other_version = ChatKey(KEY.version + 1, KEY.material)
    refused(stored, key=same_bytes_other_version)
    relabelled = bytearray(stored)
    relabelled[1:5] = (KEY.version + 1).to_bytes(4, "big")
    refused(bytes(relabelled), key=same_bytes_other_version)
    refused(stored, key=ChatKey(KEY.version, os.urandom(32)))  # another DEK, same version


def test_a_range_read_refuses_tampered_or_misplaced_segments() -> None:
    size = len(DATA)
    stored = seal(DATA)
    layout = FileLayout(SEG)
    opener = FileOpener.from_header(KEY, CTX, stored[:FILE_HEADER_LEN])
    span = layout.span(SEG + 3, 10, size)  # inside segment 1
    _h, segs = segments_of(stored)
    with pytest.raises(DecryptionError):  # segment 2's bytes offered as segment 1
        b"".join(opener.decrypt_range([segs[2]], span, size))
    last = layout.span(size - 5, 5, size)
    with pytest.raises(DecryptionError):  # the file was longer than the reader was told
        b"".join(
            opener.decrypt_range([segs[-2]], layout.span(size - SEG - 5, 5, size - SEG), size - SEG)
        )
    with pytest.raises(DecryptionError):  # the last segment cut short
        b"".join(opener.decrypt_range([segs[-1][:-1]], last, size))
    with pytest.raises(DecryptionError):
        FileOpener.from_header(KEY, FileContext(CHAT_B, 1001), stored[:FILE_HEADER_LEN])


def test_impossible_stored_sizes_are_refused() -> None:
    layout = FileLayout(SEG)
    for size in (0, FILE_HEADER_LEN, FILE_HEADER_LEN + 15, layout.segment_offset(1) + 16):
        with pytest.raises(DecryptionError):
            layout.plaintext_size(size)
    refused(b"")
    refused(seal(b"")[: FILE_HEADER_LEN - 1])
