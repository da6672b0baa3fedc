"""The HTTP rules of attachment downloads (reader.downloads) and the read-ahead of their bytes
(reader.prefetch), without servers."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime

import pytest

from reader.downloads import (
    ByteRange,
    Unsatisfiable,
    etag,
    file_name,
    not_modified,
    parse_range,
    range_applies,
)
from reader.prefetch import ReadAhead
from sealstream.adapters.cassandra import AttachmentRow

ROW = AttachmentRow(
    chat_id=uuid.UUID("00000000-0000-4000-8000-000000000001"),
    file_id=123456789,
    sender_id="ann",
    size=1000,
    ciphertext_size=1096,
    content_type="image/png",
    dek_version=1,
    segment_size=65536,
    object_key="chats/x/files/123456789",
    created_at=datetime(2026, 12, 1, tzinfo=UTC),
)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("bytes=0-0", ByteRange(0, 1, 1000)),
        ("bytes=10-19", ByteRange(10, 10, 1000)),
        ("bytes=990-", ByteRange(990, 10, 1000)),
        ("bytes=-10", ByteRange(990, 10, 1000)),
        ("bytes=-5000", ByteRange(0, 1000, 1000)),
        ("bytes=500-999999", ByteRange(500, 500, 1000)),
        ("bytes= 1-2 ", ByteRange(1, 2, 1000)),
        (None, None),
        ("bytes=1-2,5-6", None),  # several ranges: the whole file
        ("bytes=5-1", None),  # invalid range-spec: ignored
        ("pages=1-2", None),
        ("bytes=x-1", None),
        ("bytes=" + "9" * 25 + "-", None),  # absurd numbers: ignored, never a crash
        ("bytes=0-1" + " " * 500, None),
    ],
)
def test_range_headers_are_read_as_rfc_9110_says(
    header: str | None, expected: ByteRange | None
) -> None:
    assert parse_range(header, 1000) == expected


@pytest.mark.parametrize("header", ["bytes=1000-", "bytes=1000-1001", "bytes=-0"])
def test_a_range_outside_the_file_is_unsatisfiable(header: str) -> None:
    with pytest.raises(Unsatisfiable) as caught:
        parse_range(header, 1000)
    assert caught.value.size == 1000


def test_an_empty_file_has_no_satisfiable_first_byte_and_sends_itself_for_a_suffix() -> None:
    with pytest.raises(Unsatisfiable):
        parse_range("bytes=0-", 0)
    assert parse_range("bytes=-3", 0) is None


def test_content_range_names_first_last_and_size() -> None:
    assert ByteRange(10, 10, 1000).content_range == "bytes 10-19/1000"


def test_the_etag_is_strong_and_follows_the_files_identity_only() -> None:
    tag = etag(ROW)
    assert tag.startswith('"') and tag.endswith('"') and not tag.startswith("W/")
    assert etag(replace(ROW, size=5, content_type="text/plain")) == tag  # not from content
    for changed in (
        replace(ROW, file_id=ROW.file_id + 1),
        replace(ROW, chat_id=uuid.uuid4()),
        replace(ROW, dek_version=2),
    ):
        assert etag(changed) != tag


def test_if_none_match_and_if_range() -> None:
    tag = etag(ROW)
    assert not_modified(tag, tag) and not_modified(f'W/{tag}, "x"', tag) and not_modified("*", tag)
    assert not not_modified('"x"', tag) and not not_modified(None, tag)
    assert range_applies(None, tag) and range_applies(tag, tag)
    assert not range_applies(f"W/{tag}", tag)
    assert not range_applies("Tue, 01 Dec 2026 10:00:00 GMT", tag)


def test_the_file_name_is_the_id_with_an_extension_from_the_type() -> None:
    assert file_name(ROW) == "123456789.png"
    assert file_name(replace(ROW, content_type="text/plain; charset=latin-1")) == "123456789.txt"
    assert file_name(replace(ROW, content_type="application/x-unknown")) == "123456789"


class Source:
    """A blocking iterator that records whether it was closed."""

    def __init__(self, items: list[bytes], error: Exception | None = None) -> None:
        self.items = items
        self.error = error
        self.closed = threading.Event()

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self.items
            if self.error is not None:
                raise self.error
        finally:
            self.closed.set()


def test_read_ahead_yields_every_item_then_raises_the_iterators_error() -> None:
    source = Source([b"a", b"b", b"c"], ValueError("bad segment"))

    async def consume() -> list[bytes]:
        got = []
        with pytest.raises(ValueError, match="bad segment"):
            async for item in ReadAhead(iter(source)):
                got.append(item)
        return got

    assert asyncio.run(consume()) == [b"a", b"b", b"c"]
    assert source.closed.wait(5)


def test_read_ahead_stops_and_closes_the_iterator_when_the_consumer_leaves() -> None:
    source = Source([bytes([i]) for i in range(100)])

    async def consume_two() -> list[bytes]:
        got = []
        chunks = aiter(ReadAhead(iter(source), depth=2))
        async for item in chunks:
            got.append(item)
            if len(got) == 2:
                break
        await chunks.aclose()  # type: ignore[attr-defined]
        return got

    assert asyncio.run(consume_two()) == [b"\x00", b"\x01"]
    assert source.closed.wait(5), "the producer kept the iterator open"
