"""HTTP semantics of an attachment download (RFC 9110): Range, ETag and the response headers.

Pure functions over an `AttachmentRow`, no I/O: the route (reader.api) asks `plan_download` what
to answer, then streams the bytes the plan names. What the reader answers:

- `Range: bytes=a-b`, `bytes=a-` or `bytes=-n` (one range) -> 206 with `Content-Range`; only
  the segments the range touches are fetched and decrypted (`AttachmentFiles.read`).
- A range starting at or past the end (or `bytes=-0`) -> 416 with `Content-Range: bytes */size`.
- Several ranges, another unit, or a Range header that does not parse -> the header is ignored
  and the whole file is sent (200), which RFC 9110 §14.2 allows ("a server MAY ignore the Range
  header field"); multipart/byteranges is not implemented. A suffix range of an empty file also
  answers 200 (a 206 of zero bytes cannot be written).
- `If-None-Match` naming the file's ETag (or `*`) -> 304; `If-Range` that is not exactly the
  file's ETag (a date, a weak or another tag) -> the Range is ignored (200, whole file).
- Range is honoured on GET only (RFC 9110 §14.2); HEAD answers the whole file's headers.

The ETag is strong and never read from content: attachments are immutable (a file id is never
reused and its bytes never rewritten), so a digest of (chat id, file id, DEK version, segment
size) names one sequence of plaintext bytes for as long as the file exists.
"""

from __future__ import annotations

import hashlib
import mimetypes
import re
from dataclasses import dataclass

from sealstream.adapters.cassandra import AttachmentRow

_RANGE = re.compile(r"^bytes=[ \t]*(?:(\d{1,19})-(\d{0,19})|-(\d{1,19}))[ \t]*$", re.ASCII)
_MAX_HEADER = 200  # longer conditional or Range headers are taken as malformed (ignored)

# Built-in tables only (no /etc/mime.types): the same type gives the same extension everywhere.
_TYPES = mimetypes.MimeTypes()


@dataclass(frozen=True)
class ByteRange:
    """Plaintext bytes `start` .. `start + length - 1` of a file of `size` bytes."""

    start: int
    length: int
    size: int

    @property
    def content_range(self) -> str:
        return f"bytes {self.start}-{self.start + self.length - 1}/{self.size}"


class Unsatisfiable(Exception):
    """A single byte range the file cannot satisfy (416); `size` for `Content-Range`."""

    def __init__(self, size: int) -> None:
        super().__init__(f"no byte of the range is inside the file ({size} bytes)")
        self.size = size


def etag(row: AttachmentRow) -> str:
    """The strong ETag of an attachment, quoted: 32 hex digits of SHA-256 over its identity
    (chat, file id, DEK version, segment size), never over its content."""
    identity = f"sealstream/attachment/v1|{row.chat_id}|{row.file_id}|{row.dek_version}"
    digest = hashlib.sha256(f"{identity}|{row.segment_size}".encode()).hexdigest()
    return f'"{digest[:32]}"'


def _tags(header: str) -> list[str]:
    return [part.strip() for part in header.split(",") if part.strip()]


def not_modified(if_none_match: str | None, tag: str) -> bool:
    """True when `If-None-Match` names `tag` or `*` (weak comparison, RFC 9110 §13.1.2)."""
    if if_none_match is None or len(if_none_match) > 40 * _MAX_HEADER:
        return False
    for candidate in _tags(if_none_match):
        if candidate == "*" or candidate.removeprefix("W/") == tag:
            return True
    return False


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """The one byte range `header` asks of a file of `size` bytes, clipped to the file; None
    when the whole file is to be sent (no header, several ranges, another unit, malformed, or
    a suffix range of an empty file). Raises `Unsatisfiable` (416) for a single range that
    starts at or past the end, or `bytes=-0`."""
    if header is None or len(header) > _MAX_HEADER:
        return None
    match = _RANGE.match(header)
    if match is None:
        return None  # several ranges, another unit or not a range: ignored (RFC 9110 §14.2)
    first, last, suffix = match.groups()
    if suffix is not None:
        wanted = int(suffix)
        if wanted == 0:
            raise Unsatisfiable(size)
        if size == 0:
            return None
        length = min(wanted, size)
        return ByteRange(size - length, length, size)
    start = int(first)
    end = int(last) if last else None
    if end is not None and end < start:
        return None  # an invalid range-spec: the header is ignored
    if start >= size:
        raise Unsatisfiable(size)
    stop = size - 1 if end is None else min(end, size - 1)
    return ByteRange(start, stop - start + 1, size)


def range_applies(if_range: str | None, tag: str) -> bool:
    """Whether a Range may be honoured under `If-Range`: only with no If-Range or exactly the
    file's strong ETag (a date or a weak tag never matches: this API sends no Last-Modified)."""
    return if_range is None or if_range.strip() == tag


def file_name(row: AttachmentRow) -> str:
    """`<attachment id><extension>`: no user file name is stored (it could reveal content), so
    the name is the id and an extension guessed from the media type ('' when none is known)."""
    media_type = row.content_type.split(";", 1)[0].strip().lower()
    return f"{row.file_id}{_TYPES.guess_extension(media_type) or ''}"


def headers(row: AttachmentRow, tag: str) -> dict[str, str]:
    """Headers every answer about an attachment carries (200, 206, 304, HEAD)."""
    return {
        "ETag": tag,
        "Accept-Ranges": "bytes",
        "Cache-Control": "private",
        "X-Content-Type-Options": "nosniff",
        # An uploaded HTML or SVG opened in place would run with the reader's origin: never.
        "Content-Security-Policy": "default-src 'none'; sandbox",
        "Content-Disposition": f'attachment; filename="{file_name(row)}"',
    }
