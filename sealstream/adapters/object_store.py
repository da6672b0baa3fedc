"""The S3-compatible object store (locally S3Proxy) that holds encrypted attachments, via boto3.

One `ObjectStore` per process, thread-safe (one botocore client). Every byte it stores is already
ciphertext (`sealstream.file_crypto`); this module only moves bytes, and never holds a whole
object in memory:

- `put(key, chunks)` streams an iterator of byte chunks up. A stream shorter than
  `part_size_bytes` goes up in one `PutObject`; a longer one as a multipart upload of parts of
  exactly `part_size_bytes` (the last one shorter), so at most one part is buffered. Any failure
  while the upload is open (the store, the iterator raising, the caller closing the generator)
  aborts the multipart upload before the error propagates: nothing becomes readable, and the
  parts are deleted.
- `get(key, start, length)` returns an iterator over the bytes of a range, read from the network
  as the caller consumes it.
- `head`, `delete`, `keys` / `delete_prefix` (a chat's objects are one prefix: chat deletion
  and retention remove them by listing), and the sweep of abandoned multipart uploads (`incomplete_uploads`,
  `abort_incomplete`), which `sealstream attachments sweep-uploads` runs where the store has no
  lifecycle rules (S3Proxy; docs/operations.md "Object store").

Errors: `ObjectNotFound` (no such key), `ObjectStoreError` (anything else the store refused; its
`retriable` flag is set for connection failures, timeouts, throttling and 5xx once botocore's
own retries are spent). Messages name the bucket, key and S3 error code, never object content.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from sealstream.errors import SealstreamError
from sealstream.settings import ObjectStoreSettings

# Bytes per chunk yielded by `get` (what one network read returns at most).
READ_CHUNK_BYTES = 1024 * 1024
_RETRIABLE_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "InternalError",
    "ServiceUnavailable",
    "503",
    "500",
}
# S3Proxy (filesystem-nio2) answers 500 to a listing while a file under the listed directories
# is being written (an object's or part's file has no checksum attribute until its body is all
# in): any upload in flight, for as long as its request body takes. Listings are retried with
# backoff (from `_LISTING_FIRST_DELAY`, doubling up to 1 s) for this long before they fail.
_LISTING_PATIENCE_SECONDS = 30.0
_LISTING_FIRST_DELAY = 0.05
# How often an abort is tried again on an upload the store half-aborted (`_abort`).
_ABORT_TRIES = 5


class ObjectStoreError(SealstreamError):
    """The object store refused or failed a request; `retriable` says whether to try later."""

    def __init__(self, message: str, *, retriable: bool = False, code: str = "") -> None:
        super().__init__(message)
        self.retriable = retriable
        self.code = code


class ObjectNotFound(ObjectStoreError):
    """No object under that key (or no such bucket: run `sealstream migrate`)."""


@dataclass(frozen=True)
class StoredObject:
    """What `put` wrote: its key, size in bytes, the store's ETag and how many parts it took
    (0 for a single `PutObject`)."""

    key: str
    size: int
    etag: str
    parts: int


@dataclass(frozen=True)
class ObjectInfo:
    """`head`: size in bytes, ETag, content type, user metadata (`x-amz-meta-*`), last write."""

    key: str
    size: int
    etag: str
    content_type: str
    metadata: dict[str, str]
    last_modified: datetime


@dataclass(frozen=True)
class IncompleteUpload:
    """A multipart upload neither completed nor aborted; `started` is when it began (UTC), as the
    earliest of the store's `Initiated` and its parts' `LastModified` (S3Proxy reports the time of
    the listing as `Initiated`, so its parts are the only true age there)."""

    key: str
    upload_id: str
    started: datetime
    parts: int


def build_client(settings: ObjectStoreSettings) -> Any:
    """A boto3 S3 client for `settings`: timeouts, standard retries, path-style addressing.

    Checksums are sent and checked only where S3 requires them: S3Proxy answers `NotImplemented`
    to the CRC32 headers newer botocore adds to every upload. Integrity does not rest on them:
    every attachment segment carries its own AEAD tag (docs/format.md).
    """
    access_key, secret_key = settings.resolved_credentials()
    config = Config(
        region_name=settings.region,
        connect_timeout=settings.connect_timeout_seconds,
        read_timeout=settings.read_timeout_seconds,
        retries={"max_attempts": settings.max_attempts, "mode": "standard"},
        s3={"addressing_style": "path" if settings.path_style else "auto"},
        signature_version="s3v4",
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        # One client is shared by the threads of a process (botocore clients are thread-safe).
        max_pool_connections=32,
    )
    return boto3.client(
        "s3",
        endpoint_url=settings.endpoint,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key.get_secret_value(),
        config=config,
    )


class ObjectStore:
    """Streams objects in and out of one bucket (`settings.bucket`)."""

    def __init__(self, settings: ObjectStoreSettings, client: Any | None = None) -> None:
        self.settings = settings
        self.bucket = settings.bucket
        self.part_size = settings.part_size_bytes
        self._client = client if client is not None else build_client(settings)

    def close(self) -> None:
        self._client.close()

    # -- set-up (sealstream migrate) --------------------------------------------------------------

    def ensure_bucket(self) -> str:
        """Create the bucket if missing and ask for a lifecycle rule that aborts multipart uploads
        after `abandoned_upload_hours` (rounded up to whole days, S3's unit). Idempotent.

        Returns a line for `migrate`'s report: whether the rule is in place, or that the store
        has no lifecycle rules (S3Proxy) and `sealstream attachments sweep-uploads` must run.
        """
        created = False
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if _code(exc) not in {"404", "NoSuchBucket", "NotFound"}:
                raise self._error("HeadBucket", exc) from None
            try:
                self._client.create_bucket(Bucket=self.bucket)
                created = True
            except ClientError as create_exc:  # a concurrent migrate made it first
                if _code(create_exc) not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                    raise self._error("CreateBucket", create_exc) from None
        except BotoCoreError as exc:
            raise self._error("HeadBucket", exc) from None
        days = max(1, -(-int(self.settings.abandoned_upload_hours) // 24))
        rule = {
            "ID": "sealstream-abort-incomplete-uploads",
            "Status": "Enabled",
            "Filter": {"Prefix": ""},
            "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": days},
        }
        try:
            self._client.put_bucket_lifecycle_configuration(
                Bucket=self.bucket, LifecycleConfiguration={"Rules": [rule]}
            )
            lifecycle = f"lifecycle aborts incomplete uploads after {days} day(s)"
        except ClientError as exc:
            if _code(exc) not in {"NotImplemented", "501"}:
                raise self._error("PutBucketLifecycleConfiguration", exc) from None
            lifecycle = (
                "no lifecycle rules on this store: run `sealstream attachments sweep-uploads` "
                "on a schedule"
            )
        return f"bucket {self.bucket} {'created' if created else 'exists'}; {lifecycle}"

    def delete_empty_bucket(self) -> None:
        """Delete the bucket, which must be empty (benchmarks and tests make buckets of their own;
        S3 refuses with `BucketNotEmpty` otherwise)."""
        try:
            self._client.delete_bucket(Bucket=self.bucket)
        except (ClientError, BotoCoreError) as exc:
            raise self._error("DeleteBucket", exc) from None

    # -- put --------------------------------------------------------------------------------------

    def put(
        self,
        key: str,
        chunks: Iterable[bytes],
        *,
        content_type: str = "application/octet-stream",
        metadata: dict[str, str] | None = None,
    ) -> StoredObject:
        """Store the concatenation of `chunks` under `key`; returns only once it is readable.

        Chunks may have any size (empty ones are skipped). At most two parts (`part_size_bytes`:
        one going up while the next is read from `chunks`) plus one chunk are held in memory. `metadata` becomes `x-amz-meta-*` (ASCII; never put
        anything there that reveals content). Raises `ObjectStoreError`; if `chunks` itself
        raises, that error propagates. Either way an open multipart upload is aborted first.
        """
        extra = {"ContentType": content_type, "Metadata": dict(metadata or {})}
        buffer = bytearray()
        iterator = iter(chunks)
        for chunk in iterator:
            buffer += chunk
            if len(buffer) >= self.part_size:
                return self._put_multipart(key, buffer, iterator, extra)
        try:
            answer = self._client.put_object(
                Bucket=self.bucket, Key=key, Body=bytes(buffer), **extra
            )
        except (ClientError, BotoCoreError) as exc:
            raise self._error("PutObject", exc, key) from None
        return StoredObject(key, len(buffer), answer["ETag"].strip('"'), 0)

    def _put_multipart(
        self, key: str, buffer: bytearray, rest: Iterator[bytes], extra: dict[str, Any]
    ) -> StoredObject:
        try:
            upload_id = self._client.create_multipart_upload(Bucket=self.bucket, Key=key, **extra)[
                "UploadId"
            ]
        except (ClientError, BotoCoreError) as exc:
            raise self._error("CreateMultipartUpload", exc, key) from None
        parts: list[dict[str, Any]] = []
        size = 0
        in_flight: Future[dict[str, Any]] | None = None

        def send(number: int, body: bytes) -> dict[str, Any]:
            answer = self._client.upload_part(
                Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=body
            )
            return {"PartNumber": number, "ETag": answer["ETag"]}

        # One part goes up (in a thread of this upload's) while the next one is read from
        # `rest` (a client's request body, encrypted on the way): the store's time and the
        # source's overlap instead of adding up. At most one part is in flight.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="object-part") as sender:
            try:
                exhausted = False
                number = 0
                while True:
                    while len(buffer) < self.part_size and not exhausted:
                        try:
                            buffer += next(rest)
                        except StopIteration:
                            exhausted = True
                    if not buffer and number:
                        break
                    body = bytes(buffer[: self.part_size])
                    del buffer[: self.part_size]
                    number += 1
                    if in_flight is not None:
                        parts.append(in_flight.result())
                    in_flight = sender.submit(send, number, body)
                    size += len(body)
                    if exhausted and not buffer:
                        break
                if in_flight is not None:
                    parts.append(in_flight.result())
                    in_flight = None
                answer = self._client.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                )
            except BaseException as exc:  # the iterator, the store, or the caller giving up
                if in_flight is not None:
                    wait([in_flight])  # the part in flight ends before the upload is aborted
                self._abort_quietly(key, upload_id)
                if isinstance(exc, ClientError | BotoCoreError):
                    raise self._error("multipart upload", exc, key) from None
                raise
        return StoredObject(key, size, str(answer.get("ETag", "")).strip('"'), len(parts))

    def _abort_quietly(self, key: str, upload_id: str) -> None:
        """Abort after a failure (no part of this upload is in flight any more); if the store is
        down too, the sweep removes it later.

        If the abort does not succeed at once, someone else ended the upload first or half way
        (chat deletion or the sweep aborted it while its parts were still coming; see `_abort`),
        and S3Proxy took every part sent since all the same, as files that no listing of uploads
        shows and no later abort reaches, its record of the upload being gone: the record is
        written again and the upload aborted once more, which deletes every part file under the
        upload id (`_abort_unlisted`). No listing here, unlike `_abort`: this runs on an
        upload's request path, and S3Proxy fails a listing of uploads while any upload of the
        bucket writes a part."""
        try:
            self._client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            return
        except BotoCoreError:
            return  # the store is down or slow
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if _code(exc) != "NoSuchUpload" and status < 500:
                return
        try:
            self._abort_unlisted(key, upload_id)
        except ObjectStoreError:
            pass

    def _abort_unlisted(self, key: str, upload_id: str) -> None:
        """One more abort of an upload whose record (see `_abort`) someone else's abort
        deleted: the record is written first and deleted after (S3Proxy's abort deletes it
        itself when it succeeds). S3Proxy's abort then deletes every part file it finds under
        the upload id, and the upload's own entry, whether the upload is still listed or not; a
        real S3 answers NoSuchUpload (it refused such parts). Raises `ObjectStoreError` if the
        record cannot be written."""
        try:
            self._client.put_object(Bucket=self.bucket, Key=upload_id, Body=b"")
        except (ClientError, BotoCoreError) as exc:
            raise self._error("PutObject", exc, upload_id) from None
        try:
            self._client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except (ClientError, BotoCoreError):
            pass  # NoSuchUpload: nothing of it is left (a real S3), or the store failed
        finally:
            try:
                self._client.delete_object(Bucket=self.bucket, Key=upload_id)
            except (ClientError, BotoCoreError):
                pass

    # -- get, head, delete ------------------------------------------------------------------------

    def get(self, key: str, start: int = 0, length: int | None = None) -> Iterator[bytes]:
        """Bytes `start` .. `start + length - 1` of the object (to its end when `length` is None,
        or when the object ends first: S3 answers a range running past the end with what there
        is), as an iterator of chunks of at most `READ_CHUNK_BYTES` read as they are consumed.

        The request is made before this returns, so `ObjectNotFound` and an invalid range
        (`ObjectStoreError` code `InvalidRange`: `start` at or past the end) are raised here, not
        on the first `next()`. Close the iterator (or exhaust it) to release the connection.
        """
        if start < 0 or (length is not None and length < 1):
            raise ValueError(f"object range: start {start} must be >= 0 and length {length} >= 1")
        if length is None:
            byte_range = f"bytes={start}-"
        else:
            byte_range = f"bytes={start}-{start + length - 1}"
        try:
            answer = self._client.get_object(Bucket=self.bucket, Key=key, Range=byte_range)
        except (ClientError, BotoCoreError) as exc:
            raise self._error("GetObject", exc, key) from None
        return self._stream(key, answer["Body"])

    def _stream(self, key: str, body: Any) -> Iterator[bytes]:
        try:
            yield from body.iter_chunks(chunk_size=READ_CHUNK_BYTES)
        except BotoCoreError as exc:  # the connection broke or timed out mid-body
            raise self._error("GetObject body", exc, key) from None
        finally:
            body.close()

    def head(self, key: str) -> ObjectInfo:
        """Size, ETag, content type and metadata of `key`; `ObjectNotFound` if there is none."""
        try:
            answer = self._client.head_object(Bucket=self.bucket, Key=key)
        except (ClientError, BotoCoreError) as exc:
            raise self._error("HeadObject", exc, key) from None
        return ObjectInfo(
            key=key,
            size=int(answer["ContentLength"]),
            etag=str(answer["ETag"]).strip('"'),
            content_type=str(answer.get("ContentType", "")),
            metadata=dict(answer.get("Metadata", {})),
            last_modified=answer["LastModified"],
        )

    def delete(self, key: str) -> None:
        """Delete `key`. Deleting a key that does not exist is not an error (S3 semantics)."""
        try:
            self._client.delete_object(Bucket=self.bucket, Key=key)
        except (ClientError, BotoCoreError) as exc:
            raise self._error("DeleteObject", exc, key) from None

    def keys(self, prefix: str) -> Iterator[str]:
        """Every object key under `prefix`, in the store's (lexicographic) order, listed page by
        page as the caller consumes them (each page retried as `_listed` says). Raises
        `ObjectStoreError`."""
        token: str | None = None
        while True:
            extra = {"ContinuationToken": token} if token else {}
            page = self._listed(
                "ListObjectsV2",
                self._client.list_objects_v2,
                prefix,
                Bucket=self.bucket,
                Prefix=prefix,
                **extra,
            )
            for item in page.get("Contents", []):
                yield str(item["Key"])
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return

    def _listed(
        self, operation: str, call: Callable[..., Any], key: str | None = None, **params: Any
    ) -> Any:
        """`call(**params)` (one listing request), tried again on a 5xx for `_LISTING_PATIENCE_SECONDS`
        (see there: S3Proxy fails listings while an upload writes under them). Raises
        `ObjectStoreError`."""
        deadline = time.monotonic() + _LISTING_PATIENCE_SECONDS
        delay = _LISTING_FIRST_DELAY
        while True:
            try:
                return call(**params)
            except ClientError as exc:
                status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
                if status < 500 or time.monotonic() + delay > deadline:
                    raise self._error(operation, exc, key) from None
            except BotoCoreError as exc:
                raise self._error(operation, exc, key) from None
            time.sleep(delay)
            delay = min(delay * 2, 1.0)

    def delete_prefix(self, prefix: str, keep: Callable[[str], bool] | None = None) -> int:
        """Delete every object under `prefix` (but those `keep(key)` is true for); returns how
        many were deleted. Listed, then deleted one by one (`DeleteObjects` needs a checksum
        header S3Proxy refuses), so an object written meanwhile may survive: callers that need
        it gone run this again after the writers stopped. Refuses an empty prefix (a whole
        bucket is never deleted by accident). Raises `ObjectStoreError`."""
        if not prefix:
            raise ValueError("delete_prefix needs a non-empty prefix")
        doomed = [key for key in self.keys(prefix) if keep is None or not keep(key)]
        for key in doomed:
            self.delete(key)
        return len(doomed)

    # -- abandoned multipart uploads --------------------------------------------------------------

    def incomplete_uploads(self, prefix: str = "") -> list[IncompleteUpload]:
        """Every multipart upload under `prefix` neither completed nor aborted, oldest first.
        Raises `ObjectStoreError`."""
        found: list[IncompleteUpload] = []
        markers: dict[str, str] = {}
        while True:
            page = self._listed(
                "ListMultipartUploads",
                self._client.list_multipart_uploads,
                Bucket=self.bucket,
                Prefix=prefix,
                **markers,
            )
            found.extend(self._describe(upload) for upload in page.get("Uploads", []))
            if not page.get("IsTruncated"):
                break
            markers = {
                "KeyMarker": page.get("NextKeyMarker", ""),
                "UploadIdMarker": page.get("NextUploadIdMarker", ""),
            }
        return sorted(found, key=lambda upload: upload.started)

    def _describe(self, upload: dict[str, Any]) -> IncompleteUpload:
        """An `IncompleteUpload` for one `ListMultipartUploads` entry. Its start is the earliest
        of the listed `Initiated` and its parts' times: S3Proxy lists the time of the listing as
        `Initiated`."""
        key, upload_id = upload["Key"], upload["UploadId"]
        times = [upload["Initiated"]]
        count = 0
        marker = 0
        while True:
            try:
                page = self._client_list_parts(key, upload_id, marker)
            except ObjectNotFound:  # completed or aborted since it was listed
                break
            for part in page.get("Parts", []):
                times.append(part["LastModified"])
                count += 1
            if not page.get("IsTruncated"):
                break
            marker = int(page.get("NextPartNumberMarker", 0))
        started = min(t if t.tzinfo else t.replace(tzinfo=UTC) for t in times)
        return IncompleteUpload(key, upload_id, started.astimezone(UTC), count)

    def _client_list_parts(self, key: str, upload_id: str, marker: int) -> Any:
        extra = {"PartNumberMarker": marker} if marker else {}
        try:
            return self._listed(
                "ListParts",
                self._client.list_parts,
                key,
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                **extra,
            )
        except ObjectStoreError as exc:
            if exc.code == "NoSuchUpload":
                raise ObjectNotFound(str(exc), code=exc.code) from None
            raise

    def abort_incomplete(
        self, older_than: timedelta, *, prefix: str = "", now: datetime | None = None
    ) -> list[IncompleteUpload]:
        """Abort every incomplete upload under `prefix` started before `now - older_than`
        (`now` defaults to the current UTC time); returns those this call aborted. An upload that
        finished meanwhile is skipped. Raises `ObjectStoreError`.
        """
        cutoff = (now or datetime.now(UTC)) - older_than
        return [
            upload
            for upload in self.incomplete_uploads(prefix)
            if upload.started < cutoff and self._abort(upload.key, upload.upload_id)
        ]

    def _abort(self, key: str, upload_id: str) -> bool:
        """Abort one multipart upload; True if this call ended it, False if it had already
        ended (completed, or aborted by someone else). Raises `ObjectStoreError`.

        S3Proxy 2.6.0 aborts in two steps: it deletes its own record of the upload (an object
        named by the upload id), then lists and deletes the parts. If a part is being written
        at that moment, the listing fails (see `_LISTING_PATIENCE_SECONDS`), the abort answers
        500, and every later abort answers `NoSuchUpload` while the upload stays listed with its
        parts, for ever. So `NoSuchUpload` is trusted only once the upload is no longer listed;
        while it still is, the record is written again (an empty object under the upload id, as
        S3Proxy writes it at `CreateMultipartUpload`) and the abort retried. Each abort waits
        first while the upload is being completed (`_until_not_written`). A part that was in
        flight and lands after the abort is a file S3Proxy no longer lists, removed by its
        uploader's failure (`_abort_quietly`; docs/operations.md "Object store")."""
        where = f"{key} (upload {upload_id})"
        wrote_record = False
        try:
            for attempt in range(_ABORT_TRIES):
                self._until_not_written(key)
                try:
                    self._client.abort_multipart_upload(
                        Bucket=self.bucket, Key=key, UploadId=upload_id
                    )
                    return True
                except ClientError as exc:
                    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
                    if _code(exc) != "NoSuchUpload":
                        if status < 500:
                            raise self._error("AbortMultipartUpload", exc, where) from None
                        # A 5xx after botocore's own attempts: try again, writing nothing (the
                        # record is written back only on S3Proxy's NoSuchUpload below).
                        time.sleep(_LISTING_FIRST_DELAY * 2**attempt)
                        continue
                except BotoCoreError as exc:
                    raise self._error("AbortMultipartUpload", exc, where) from None
                if not self._still_listed(key, upload_id):
                    return attempt > 0  # ended by an earlier try of ours, or before we came
                try:
                    self._client.put_object(Bucket=self.bucket, Key=upload_id, Body=b"")
                    wrote_record = True
                except (ClientError, BotoCoreError) as exc:
                    raise self._error("PutObject", exc, upload_id) from None
                time.sleep(_LISTING_FIRST_DELAY * 2**attempt)
            raise ObjectStoreError(
                f"AbortMultipartUpload s3://{self.bucket}/{where}: still listed after "
                f"{_ABORT_TRIES} aborts",
                code="AbortIncomplete",
                retriable=True,
            )
        finally:
            if wrote_record:  # gone after a successful abort; never left behind otherwise
                try:
                    self._client.delete_object(Bucket=self.bucket, Key=upload_id)
                except (ClientError, BotoCoreError):
                    pass

    def _until_not_written(self, key: str) -> None:
        """Returns once no file whose name starts with `key` is being written, as far as
        S3Proxy tells (it fails the listing meanwhile, see `_LISTING_PATIENCE_SECONDS`); raises
        `ObjectStoreError` past that patience. S3Proxy completes an upload by copying its parts
        into the object's file: an abort meanwhile deletes the parts under the copy, which
        fails and leaves its half-written file in that directory for ever, so that every later
        listing of the prefix (chat deletion's, retention's) answers 500. A completion that
        starts between this listing and the abort is not seen (docs/operations.md)."""
        self._listed(
            "ListObjectsV2",
            self._client.list_objects_v2,
            key,
            Bucket=self.bucket,
            Prefix=key,
            MaxKeys=1,
        )

    def _still_listed(self, key: str, upload_id: str) -> bool:
        page = self._listed(
            "ListMultipartUploads",
            self._client.list_multipart_uploads,
            Bucket=self.bucket,
            Prefix=key,
        )
        return any(upload["UploadId"] == upload_id for upload in page.get("Uploads", []))

    # -- errors -----------------------------------------------------------------------------------

    def _error(self, operation: str, exc: Exception, key: str | None = None) -> ObjectStoreError:
        where = f"s3://{self.bucket}/{key}" if key is not None else f"s3://{self.bucket}"
        if isinstance(exc, ClientError):
            code = _code(exc)
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if code in {"NoSuchKey", "NoSuchBucket", "404", "NotFound"}:
                return ObjectNotFound(f"{operation} {where}: not found ({code})", code=code)
            return ObjectStoreError(
                f"{operation} {where} refused: {code} (HTTP {status})",
                retriable=code in _RETRIABLE_CODES or status >= 500,
                code=code,
            )
        # Connection refused, timeouts, a body cut short: the store is down or slow.
        return ObjectStoreError(
            f"{operation} {where} failed: {type(exc).__name__}: {exc}",
            retriable=True,
            code=type(exc).__name__,
        )


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))
