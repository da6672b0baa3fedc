"""Encrypted attachment files on the real object store: the format (sealstream/file_crypto.py)
streamed through the adapter (sealstream/adapters/object_store.py) into S3Proxy, the way the
upload and download APIs will use them.

What a user relies on: the file comes back whole and in exact ranges, read by fetching the header
and only the segments a range touches; and S3Proxy's files on disk hold no plaintext (a scan that
does find a canary stored in clear, so the scan is shown able to find one).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from sealstream.adapters.object_store import ObjectStore
from sealstream.crypto import ChatKey
from sealstream.file_crypto import (
    FILE_HEADER_LEN,
    FileContext,
    FileLayout,
    FileOpener,
    decrypt_file,
    encrypt_file,
)
from sealstream.settings import StackSettings
from tests.integration.conftest import SCRATCH_PART_SIZE

SEGMENT = 64 * 1024
KEY = ChatKey(2, os.urandom(32))
CTX = FileContext(uuid.uuid4(), 7_400_000_000_000_000_001)
CANARY = b"sealstream-attachment-canary-" + os.urandom(6).hex().encode()


def canary_file(size: int) -> bytes:
    """`size` bytes: the canary over and over, so any stored plaintext fragment contains it."""
    reps = size // len(CANARY) + 1
    return (CANARY * reps)[:size]


def chunks(data: bytes, size: int = 100_003) -> Iterator[bytes]:
    for offset in range(0, len(data), size):
        yield data[offset : offset + size]


def read_range(store: ObjectStore, key: str, start: int, length: int) -> bytes:
    """A download's Range read: header, then only the segments the range touches."""
    size = FileLayout(SEGMENT).plaintext_size(store.head(key).size)
    opener = FileOpener.from_header(KEY, CTX, b"".join(store.get(key, 0, FILE_HEADER_LEN)))
    span = opener.layout.span(start, length, size)
    ciphertext = store.get(key, span.ciphertext_start, span.ciphertext_end - span.ciphertext_start)
    return b"".join(opener.decrypt_range(ciphertext, span, size))


@pytest.fixture(scope="module")
def stored(scratch_object_store: ObjectStore) -> tuple[str, bytes]:
    data = canary_file(SCRATCH_PART_SIZE + 3 * SEGMENT + 123)  # two parts, 84 segments
    key = f"files/{CTX.chat_id}/{CTX.file_id}"
    written = scratch_object_store.put(
        key, encrypt_file(KEY, CTX, chunks(data), segment_size=SEGMENT)
    )
    assert written.parts == 2
    assert written.size == FileLayout(SEGMENT).ciphertext_size(len(data))
    return key, data


def test_a_file_streams_in_and_out_whole(
    scratch_object_store: ObjectStore, stored: tuple[str, bytes]
) -> None:
    key, data = stored
    assert b"".join(decrypt_file(KEY, CTX, scratch_object_store.get(key))) == data


def test_ranges_read_only_their_segments_across_segment_and_part_boundaries(
    scratch_object_store: ObjectStore, stored: tuple[str, bytes]
) -> None:
    key, data = stored
    part_boundary_in_plaintext = (SCRATCH_PART_SIZE - FILE_HEADER_LEN) // (SEGMENT + 16) * SEGMENT
    for start, length in [
        (0, 1),
        (SEGMENT - 3, 6),
        (part_boundary_in_plaintext - 10, 2 * SEGMENT),
        (len(data) - 200, 200),
        (len(data) - 1, 1),
    ]:
        got = read_range(scratch_object_store, key, start, length)
        assert got == data[start : start + length], (start, length)


def test_the_store_files_hold_no_plaintext(
    scratch_object_store: ObjectStore, stored: tuple[str, bytes]
) -> None:
    folder = StackSettings().dir.resolve() / "s3proxy" / "blobs" / scratch_object_store.bucket
    assert folder.is_dir(), f"S3Proxy's blob folder {folder} is missing (is the stack local?)"
    scratch_object_store.put("control/clear", [b"padding " + CANARY + b" padding"])

    def files_holding_canary() -> set[str]:
        return {
            str(path.relative_to(folder))
            for path in folder.rglob("*")
            if path.is_file() and CANARY in path.read_bytes()
        }

    assert files_holding_canary() == {"control/clear"}  # the scan finds what is in clear
    scratch_object_store.delete("control/clear")
    assert files_holding_canary() == set()
    key, _data = stored
    assert (folder / Path(key)).is_file()  # the encrypted file is there, and was scanned
