"""The bridge from an async request body to the blocking attachment store
(`ingest.uploads.store_streamed`), with our own small fakes of both ends."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable

import anyio
import pytest

from ingest.uploads import UploadAborted, media_type, store_streamed
from sealstream.http import ApiError


async def body_of(chunks: list[bytes], then: BaseException | None = None) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk
        await anyio.sleep(0)
    if then is not None:
        raise then


def run(store: object, body: AsyncIterator[bytes]) -> object:
    async def main() -> object:
        return await store_streamed(store, body, anyio.CapacityLimiter(2))  # type: ignore[arg-type]

    return anyio.run(main)


def test_the_store_gets_the_whole_body_in_order() -> None:
    chunks = [bytes([i]) * 1000 for i in range(100)]  # more than the queue holds
    assert run(lambda got: b"".join(got), body_of(chunks)) == b"".join(chunks)


def test_a_body_that_ends_early_aborts_the_store_instead_of_ending_it() -> None:
    seen: list[bytes] = []

    def store(got: Iterable[bytes]) -> bytes:
        for chunk in got:
            seen.append(chunk)
        return b"stored as complete"  # must never happen: the iterator raises instead

    with pytest.raises(UploadAborted):
        run(store, body_of([b"a", b"b"], then=ConnectionResetError()))
    assert seen == [b"a", b"b"]


def test_the_stores_error_answers_and_the_body_is_no_longer_read() -> None:
    read = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal read
        while True:
            read += 1
            yield b"x" * 100

    def store(got: Iterable[bytes]) -> None:
        for i, _ in enumerate(got):
            if i == 3:
                raise ValueError("too large")

    with pytest.raises(ValueError, match="too large"):
        run(store, endless())
    assert read < 100  # the queue's worth at most, not an endless read


def test_media_types_are_compared_without_parameters_and_case() -> None:
    allowed = ("image/png", "text/plain")
    assert media_type("Text/Plain; charset=utf-8", allowed) == "text/plain"
    for refused in (None, " ", "text/html", "image/png2", "image/*"):
        with pytest.raises(ApiError) as err:
            media_type(refused, allowed)
        assert (err.value.status, err.value.field) == (415, "header.content-type")
