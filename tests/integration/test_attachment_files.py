"""`sealstream.attachments.AttachmentFiles` on the real object store and Cassandra: what the
gateway's upload and the reader's download are built on.

What a user relies on: a file comes back byte for byte whole and in any range (segment
boundaries included), its metadata says its true sizes and where it is, and an upload cut off
by the size limit leaves nothing at all: no row, no object, no open multipart upload.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from schemas.ids import SnowflakeIds
from sealstream.adapters.cassandra import MessageStore
from sealstream.adapters.object_store import ObjectNotFound, ObjectStore
from sealstream.attachments import AttachmentFiles, AttachmentTooLarge, object_key
from sealstream.crypto import ChatKey
from sealstream.errors import DecryptionError
from sealstream.file_crypto import FileLayout
from tests.integration.conftest import SCRATCH_PART_SIZE

SEGMENT = 4096
IDS = SnowflakeIds(worker_id=1011)


class VersionedKeys:
    """Our own `AttachmentKeys` port: one chat's DEK versions, the last one current."""

    def __init__(self) -> None:
        self.versions = {1: ChatKey(1, os.urandom(32))}

    def rotate(self) -> None:
        version = max(self.versions) + 1
        self.versions[version] = ChatKey(version, os.urandom(32))

    def current_key(self, chat_id: uuid.UUID) -> ChatKey:
        return self.versions[max(self.versions)]

    def key(self, chat_id: uuid.UUID, version: int) -> ChatKey:
        return self.versions[version]


@pytest.fixture(scope="module")
def keys() -> VersionedKeys:
    return VersionedKeys()


@pytest.fixture(scope="module")
def files(
    scratch_object_store: ObjectStore, message_store: MessageStore, keys: VersionedKeys
) -> AttachmentFiles:
    return AttachmentFiles(scratch_object_store, message_store, keys, segment_size=SEGMENT)


def pieces(data: bytes, size: int = 10_007) -> Iterator[bytes]:
    for offset in range(0, len(data), size):
        yield data[offset : offset + size]


@pytest.mark.parametrize(
    "size",
    [0, 1, SEGMENT, SEGMENT + 1, 5 * SEGMENT + 17, SCRATCH_PART_SIZE + 2 * SEGMENT + 5],
    ids=["empty", "one-byte", "one-segment", "segment-plus-one", "several", "multipart"],
)
def test_a_stored_file_comes_back_whole_with_true_metadata(
    files: AttachmentFiles, keys: VersionedKeys, size: int
) -> None:
    chat, file_id = uuid.uuid4(), IDS.next_id()
    data = os.urandom(size)
    row = files.store(chat, file_id, "ann", "image/png", pieces(data), max_bytes=size or 1)
    assert (row.size, row.content_type, row.sender_id) == (size, "image/png", "ann")
    assert row.ciphertext_size == FileLayout(SEGMENT).ciphertext_size(size)
    assert row.dek_version == max(keys.versions) and row.object_key == object_key(chat, file_id)
    assert files.objects.head(row.object_key).size == row.ciphertext_size
    assert files.get(chat, file_id) == row
    assert b"".join(files.read(row)) == data


def test_ranges_across_segment_boundaries_decrypt_exactly(files: AttachmentFiles) -> None:
    chat, file_id = uuid.uuid4(), IDS.next_id()
    data = os.urandom(7 * SEGMENT + 300)
    row = files.store(chat, file_id, "ann", "application/pdf", pieces(data), max_bytes=len(data))
    for start, length in [
        (0, 1),
        (SEGMENT - 1, 2),  # straddles the first boundary
        (SEGMENT, SEGMENT),  # exactly the second segment
        (3 * SEGMENT - 5, 2 * SEGMENT + 10),  # three segments, partial at both ends
        (len(data) - 1, 1),  # the last byte
        (7 * SEGMENT, 300),  # exactly the short last segment
    ]:
        assert b"".join(files.read(row, start, length)) == data[start : start + length]
    with pytest.raises(ValueError):
        files.read(row, len(data), 1)


def test_files_keep_opening_after_the_chat_key_rotates(
    files: AttachmentFiles, keys: VersionedKeys
) -> None:
    chat = uuid.uuid4()
    old = files.store(chat, IDS.next_id(), "ann", "text/plain", [b"before"], max_bytes=100)
    keys.rotate()
    new = files.store(chat, IDS.next_id(), "ann", "text/plain", [b"after"], max_bytes=100)
    assert (old.dek_version, new.dek_version) == (new.dek_version - 1, max(keys.versions))
    assert b"".join(files.read(old)) == b"before" and b"".join(files.read(new)) == b"after"


def test_a_file_over_the_limit_leaves_no_row_no_object_no_upload(
    files: AttachmentFiles, scratch_object_store: ObjectStore
) -> None:
    chat, file_id = uuid.uuid4(), IDS.next_id()
    limit = SCRATCH_PART_SIZE + 10  # passed after the first part went up: a multipart upload
    with pytest.raises(AttachmentTooLarge):
        files.store(chat, file_id, "ann", "video/mp4", pieces(os.urandom(limit + 1)), limit)
    assert files.rows.attachment(chat, file_id) is None
    with pytest.raises(ObjectNotFound):
        scratch_object_store.head(object_key(chat, file_id))
    assert scratch_object_store.incomplete_uploads(prefix=object_key(chat, file_id)) == []


def test_a_file_under_another_chat_or_id_does_not_open(files: AttachmentFiles) -> None:
    chat, file_id = uuid.uuid4(), IDS.next_id()
    row = files.store(chat, file_id, "ann", "text/plain", [b"x" * 5000], max_bytes=5000)
    moved = files.objects.put(object_key(chat, IDS.next_id()), files.objects.get(row.object_key))
    forged = row.__class__(**{**row.__dict__, "file_id": int(moved.key.rsplit("/", 1)[1])})
    forged = forged.__class__(**{**forged.__dict__, "object_key": moved.key})
    with pytest.raises(DecryptionError):
        b"".join(files.read(forged))
    with pytest.raises(DecryptionError):
        b"".join(files.read(forged, 4096, 10))
