"""The object-store adapter against the real S3Proxy of the local stack.

A bucket of the run's own (parts of the smallest size S3 allows, 5 MiB, so multipart uploads
happen at test sizes), emptied and removed at the end. What a user of attachments relies on:
what goes in comes out, byte ranges are exact, large streams go up in parts, and an upload that
fails half way leaves nothing readable and no parts behind.
"""

from __future__ import annotations

import http.client
import os
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

import pytest
from botocore.exceptions import ClientError

from sealstream.adapters.object_store import ObjectNotFound, ObjectStore, ObjectStoreError
from tests.integration.conftest import SCRATCH_PART_SIZE as PART

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def store(scratch_object_store: ObjectStore) -> ObjectStore:
    return scratch_object_store


def chunks_of(data: bytes, size: int) -> Iterator[bytes]:
    for offset in range(0, len(data), size):
        yield data[offset : offset + size]


def read_all(parts: Iterator[bytes]) -> bytes:
    return b"".join(parts)


def all_keys(store: ObjectStore) -> set[str]:
    """Every key in the bucket, S3Proxy's own multipart bookkeeping (`.mpus-*`) included."""
    keys: set[str] = set()
    for page in store._client.get_paginator("list_objects_v2").paginate(Bucket=store.bucket):
        keys.update(item["Key"] for item in page.get("Contents", []))
    return keys


def test_ensure_bucket_is_idempotent(store: ObjectStore) -> None:
    report = store.ensure_bucket()
    assert report.startswith(f"bucket {store.bucket} exists")
    # S3Proxy has no lifecycle rules: migrate must say the sweep is needed, not claim a rule.
    assert "sweep-uploads" in report


@pytest.mark.parametrize("size", [0, 1, 1000, PART - 1])
def test_small_objects_round_trip_in_one_put(store: ObjectStore, size: int) -> None:
    data = os.urandom(size)
    written = store.put(
        f"small/{size}",
        chunks_of(data, 333),
        content_type="application/x-test",
        metadata={"a": "b"},
    )
    assert (written.size, written.parts) == (size, 0)
    info = store.head(f"small/{size}")
    assert (info.size, info.content_type, info.metadata) == (size, "application/x-test", {"a": "b"})
    if size:
        assert read_all(store.get(f"small/{size}")) == data


def test_a_large_stream_goes_up_in_parts_and_reads_back(store: ObjectStore) -> None:
    data = os.urandom(2 * PART + 3 * MiB + 3)
    # Chunks of an odd size, so parts are cut inside chunks.
    written = store.put("large/one", chunks_of(data, MiB - 7))
    assert written.parts == 3 and written.size == len(data)
    assert store.head("large/one").size == len(data)
    assert read_all(store.get("large/one")) == data
    assert not store.incomplete_uploads(prefix="large/")


def test_ranges_are_exact_across_part_boundaries(store: ObjectStore) -> None:
    data = os.urandom(PART + 4096)
    store.put("ranges/one", chunks_of(data, 64 * 1024))
    for start, length in [
        (0, 1),
        (PART - 10, 20),
        (PART, 4096),
        (1234, 100_000),
        (len(data) - 1, 1),
    ]:
        assert read_all(store.get("ranges/one", start, length)) == data[start : start + length]
    assert read_all(store.get("ranges/one", PART - 5)) == data[PART - 5 :]
    with pytest.raises(ObjectStoreError) as refused:
        store.get("ranges/one", len(data), 10)
    assert refused.value.code == "InvalidRange"


def test_missing_and_deleted_objects_are_not_found(store: ObjectStore) -> None:
    store.put("gone/one", [b"x" * 10])
    store.delete("gone/one")
    with pytest.raises(ObjectNotFound):
        store.head("gone/one")
    with pytest.raises(ObjectNotFound):
        store.get("gone/one")
    store.delete("gone/one")  # again: no error, as in S3


def test_an_upload_failing_half_way_leaves_no_object_and_no_parts(store: ObjectStore) -> None:
    before = all_keys(store)

    def dies_after_two_parts() -> Iterator[bytes]:
        yield from chunks_of(os.urandom(2 * PART + 1000), MiB)
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        store.put("broken/one", dies_after_two_parts())
    with pytest.raises(ObjectNotFound):
        store.head("broken/one")
    assert not store.incomplete_uploads(prefix="broken/")
    # Neither the object nor S3Proxy's stored parts (`.mpus-<upload>-broken/one-N`) remain.
    assert all_keys(store) == before


def test_the_sweep_aborts_only_uploads_older_than_the_threshold(store: ObjectStore) -> None:
    client = store._client
    upload = client.create_multipart_upload(Bucket=store.bucket, Key="abandoned/one")
    client.upload_part(
        Bucket=store.bucket,
        Key="abandoned/one",
        UploadId=upload["UploadId"],
        PartNumber=1,
        Body=os.urandom(PART),
    )
    listed = store.incomplete_uploads(prefix="abandoned/")
    assert [(u.key, u.upload_id, u.parts) for u in listed] == [
        ("abandoned/one", upload["UploadId"], 1)
    ]
    assert store.abort_incomplete(timedelta(hours=1), prefix="abandoned/") == []
    assert store.incomplete_uploads(prefix="abandoned/")  # young: kept
    later = datetime.now(UTC) + timedelta(hours=2)
    aborted = store.abort_incomplete(timedelta(hours=1), prefix="abandoned/", now=later)
    assert [u.upload_id for u in aborted] == [upload["UploadId"]]
    assert store.incomplete_uploads(prefix="abandoned/") == []
    assert not {key for key in all_keys(store) if "abandoned/one" in key}


def listing_refused(store: ObjectStore) -> bool:
    """Whether S3Proxy answers a listing of the store's bucket with a 500 (after the client's
    own retries), as it does while one of the bucket's files is being written."""
    try:
        store._client.list_objects_v2(Bucket=store.bucket, MaxKeys=1)
    except ClientError as exc:
        if exc.response["ResponseMetadata"]["HTTPStatusCode"] == 500:
            return True
        raise
    return False


class PausedPart:
    """A part upload sent by hand (a presigned `UploadPart`) that stops half way through its
    body, so the store holds the part's half-written file, as it does while any upload's part
    is in flight."""

    def __init__(self, store: ObjectStore, key: str, upload_id: str, size: int = PART) -> None:
        url = urlsplit(
            store._client.generate_presigned_url(
                "upload_part",
                Params={"Bucket": store.bucket, "Key": key, "UploadId": upload_id, "PartNumber": 1},
            )
        )
        self.body = os.urandom(size)
        self.connection = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port)
        self.connection.putrequest("PUT", f"{url.path}?{url.query}", skip_accept_encoding=True)
        self.connection.putheader("Content-Length", str(size))
        self.connection.endheaders()
        self.connection.send(self.body[: size // 2])
        # Until the store has opened the part's file and written into it: from then on (and
        # only while a file of the bucket is being written) it answers listings with a 500.
        # A fixed pause was not enough on a loaded machine; the bucket is this module's own.
        deadline = time.monotonic() + 60
        while not listing_refused(store):
            assert time.monotonic() < deadline, "the store never began writing the part"
            time.sleep(0.1)

    def finish(self) -> int:
        self.connection.send(self.body[len(self.body) // 2 :])
        status = self.connection.getresponse().status
        self.connection.close()
        return status


def test_an_abort_that_races_a_part_being_written_is_finished_not_left_half_done(
    store: ObjectStore,
) -> None:
    """S3Proxy's abort removes its own record of the upload first, then lists the parts; a part
    file being written at that moment (no checksum attribute yet) fails the listing, and every
    later abort answers NoSuchUpload while the upload stays listed. Chat deletion and the sweep
    counted such an upload as "finished meanwhile" and left it (and its parts) for ever."""
    client = store._client
    key = "racing/one"
    upload_id = client.create_multipart_upload(Bucket=store.bucket, Key=key)["UploadId"]
    part = PausedPart(store, key, upload_id)
    try:
        with pytest.raises(ClientError):  # the store's half-done abort (a 500, then NoSuchUpload)
            client.abort_multipart_upload(Bucket=store.bucket, Key=key, UploadId=upload_id)
    finally:
        part.finish()
    assert [u.upload_id for u in store.incomplete_uploads(prefix="racing/")] == [upload_id], (
        "precondition: the store left the upload listed after its failed abort"
    )

    aborted = store.abort_incomplete(
        timedelta(0), prefix="racing/", now=datetime.now(UTC) + timedelta(minutes=10)
    )

    assert [u.upload_id for u in aborted] == [upload_id]
    assert store.incomplete_uploads(prefix="racing/") == []
    assert not {k for k in all_keys(store) if "racing/one" in k or k == upload_id}


def test_listing_and_aborting_while_another_upload_writes_a_part(store: ObjectStore) -> None:
    """A part in flight anywhere in the bucket makes S3Proxy's listings fail (500) while it is
    written; the listing is retried, and an upload aborted meanwhile is aborted for good."""
    client = store._client
    writing = client.create_multipart_upload(Bucket=store.bucket, Key="busy/writing")["UploadId"]
    idle = client.create_multipart_upload(Bucket=store.bucket, Key="busy/idle")["UploadId"]
    part = PausedPart(store, "busy/writing", writing)
    finisher = threading.Timer(1.0, part.finish)
    finisher.start()
    try:
        aborted = store.abort_incomplete(
            timedelta(0), prefix="busy/idle", now=datetime.now(UTC) + timedelta(minutes=10)
        )
    finally:
        finisher.join()
    assert [u.upload_id for u in aborted] == [idle]
    assert [u.upload_id for u in store.incomplete_uploads(prefix="busy/")] == [writing]
    store.abort_incomplete(timedelta(0), prefix="busy/", now=datetime.now(UTC) + timedelta(days=1))
    assert store.incomplete_uploads(prefix="busy/") == []


def test_the_sweep_command_aborts_and_lists_what_it_aborted(
    store: ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from sealstream.cli import app

    client = store._client
    upload = client.create_multipart_upload(Bucket=store.bucket, Key="cli/abandoned")
    client.upload_part(
        Bucket=store.bucket,
        Key="cli/abandoned",
        UploadId=upload["UploadId"],
        PartNumber=1,
        Body=b"x" * 1024,
    )
    monkeypatch.setenv("SEALSTREAM_OBJECT_STORE__BUCKET", store.bucket)
    runner = CliRunner()
    kept = runner.invoke(app, ["attachments", "sweep-uploads", "--older-than-hours", "1"])
    assert kept.exit_code == 0, kept.output
    assert "aborted 0 upload(s)" in kept.output
    listed = runner.invoke(
        app, ["attachments", "sweep-uploads", "--older-than-hours", "0", "--dry-run"]
    )
    assert "would abort 1 upload(s)" in listed.output and store.incomplete_uploads(prefix="cli/")
    swept = runner.invoke(app, ["attachments", "sweep-uploads", "--older-than-hours", "0"])
    assert swept.exit_code == 0, swept.output
    assert "aborted 1 upload(s)" in swept.output and upload["UploadId"] in swept.output
    assert store.incomplete_uploads(prefix="cli/") == []
