"""Attachment files: streaming AEAD over fixed-size segments (file format v1).

The file counterpart of `sealstream.crypto` (which holds the message envelope and `ChatKey`);
together they are the only modules that touch HKDF, AES-GCM, salts or nonces. The byte format,
the check order and the rationale are specified in docs/format.md, "Attachment files"; the
vectors in ``tests/vectors/file_v1.json`` pin it down byte for byte. Any change to the bytes
written here needs a new file format version.

Summary (docs/format.md is normative)::

    salt(32), nonce_prefix(7)  random per file
    ctx      = chat_id(16) || file_id(8, BE) || dek_version(4, BE) || segment_size(4, BE)
    okm      = HKDF-SHA256(ikm=DEK, salt=salt, info=b"sealstream/file/v1" || ctx, L=64)
    file_key = okm[:32];  commitment = okm[32:]
    header   = 0x01 || dek_version(4) || segment_size(4) || salt || nonce_prefix || commitment
    segment i of n (plaintext S bytes, the last 0..S; n >= 1; an empty file is one empty segment):
      last   = 1 if i == n - 1 else 0
      nonce  = nonce_prefix || i(4, BE) || last(1)
      aad    = b"sealstream/file-aad/v1" || 0x01 || ctx || i(4, BE) || last(1)
      ct_i   = AES-256-GCM(file_key, nonce, aad, plaintext_i)       (len + 16)
    file     = header || ct_0 || ... || ct_{n-1}

Interfaces:

- `encrypt_file(key, ctx, chunks)`: an iterator of ciphertext pieces (the header, then one per
  segment) from an iterator of plaintext chunks of any size; holds at most two segments.
- `decrypt_file(key, ctx, chunks)`: the whole file, streamed, one verified segment at a time.
- `FileLayout`: sizes and offsets (plaintext size from ciphertext size, which segments and which
  ciphertext bytes a plaintext range needs), pure arithmetic, no key.
- `FileOpener.from_header(key, ctx, header)` then `opener.decrypt_range(...)`: a Range read that
  decrypts only the segments it touches.

Every failure to open (wrong key or version, wrong chat or file, reordered, truncated, extended,
swapped or flipped bytes) raises the one `DecryptionError` with no cause attached, exactly as for
message envelopes. Plaintext of a segment is released only after that segment's tag verified;
segments before a bad one have been released by then (that is what streaming means): a caller
that forwards them (an HTTP download) must abort the transfer on the error, never end it cleanly.
"""

from __future__ import annotations

import hmac
import os
import struct
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sealstream.crypto import MAX_DEK_VERSION, ChatKey
from sealstream.errors import DecryptionError

__all__ = [
    "DEFAULT_SEGMENT_SIZE",
    "FILE_FORMAT_V1",
    "FILE_HEADER_LEN",
    "MAX_SEGMENT_SIZE",
    "MIN_SEGMENT_SIZE",
    "SEGMENT_OVERHEAD",
    "FileContext",
    "FileLayout",
    "FileOpener",
    "SegmentSpan",
    "decrypt_file",
    "encrypt_file",
    "file_header_info",
]

FILE_FORMAT_V1 = 0x01
"""First byte of an attachment file in format v1."""

DEFAULT_SEGMENT_SIZE = 64 * 1024
"""Plaintext bytes per segment `encrypt_file` uses unless told otherwise (0.024 % overhead)."""

MIN_SEGMENT_SIZE = 64
MAX_SEGMENT_SIZE = 2**24  # 16 MiB: bounds what a reader buffers per segment
MAX_FILE_ID = 2**64 - 1
MAX_SEGMENTS = 2**32 - 1  # the segment index is a BE32 in the nonce

SALT_LEN = 32
NONCE_PREFIX_LEN = 7
COMMITMENT_LEN = 32
TAG_LEN = 16
SEGMENT_OVERHEAD = TAG_LEN
"""Ciphertext bytes a segment adds to its plaintext (the GCM tag)."""

_HEADER = struct.Struct(
    ">BII32s7s32s"
)  # version | dek_version | segment_size | salt | prefix | commitment
FILE_HEADER_LEN = _HEADER.size  # 80
_CONTEXT = struct.Struct(">16sQII")  # chat_id | file_id | dek_version | segment_size (32 bytes)
_SEGMENT = struct.Struct(">IB")  # segment index | last-segment flag
_INFO_LABEL = b"sealstream/file/v1"
_AAD_LABEL = b"sealstream/file-aad/v1"
_SHA256 = hashes.SHA256()


@dataclass(frozen=True)
class FileContext:
    """What an attachment file is bound to besides its key: the chat it belongs to and its id
    (an unsigned 64-bit id, Sealstream's Snowflake ids). `TypeError` / `ValueError` name the
    field when a value is not one."""

    chat_id: uuid.UUID
    file_id: int

    def __post_init__(self) -> None:
        if not isinstance(self.chat_id, uuid.UUID):
            raise TypeError("FileContext.chat_id must be a uuid.UUID")
        if isinstance(self.file_id, bool) or not isinstance(self.file_id, int):
            raise TypeError("FileContext.file_id must be an int")
        if not 0 <= self.file_id <= MAX_FILE_ID:
            raise ValueError("FileContext.file_id must be an unsigned 64-bit integer")


@dataclass(frozen=True)
class SegmentSpan:
    """What a plaintext byte range needs: segments `first` .. `last` (inclusive), found at
    ciphertext bytes `ciphertext_start` .. `ciphertext_end - 1` (header excluded: read it too),
    of whose decrypted plaintext the caller drops `skip` bytes and keeps `length`."""

    first: int
    last: int
    ciphertext_start: int
    ciphertext_end: int
    skip: int
    length: int


@dataclass(frozen=True)
class FileLayout:
    """Sizes and offsets of a file with `segment_size` plaintext bytes per segment (no key)."""

    segment_size: int = DEFAULT_SEGMENT_SIZE

    def __post_init__(self) -> None:
        _check_segment_size(self.segment_size)

    @property
    def ciphertext_segment_size(self) -> int:
        return self.segment_size + TAG_LEN

    def segment_count(self, plaintext_size: int) -> int:
        """Segments of a file of `plaintext_size` bytes: at least 1 (an empty file has one)."""
        if plaintext_size < 0:
            raise ValueError("plaintext_size must be >= 0")
        return max(1, -(-plaintext_size // self.segment_size))

    def ciphertext_size(self, plaintext_size: int) -> int:
        """Stored size of a file of `plaintext_size` bytes: header + plaintext + 16 per segment."""
        return FILE_HEADER_LEN + plaintext_size + TAG_LEN * self.segment_count(plaintext_size)

    def plaintext_size(self, ciphertext_size: int) -> int:
        """The plaintext size a stored object of `ciphertext_size` bytes holds.

        Raises `DecryptionError` for a size no file of this layout can have (a truncated header,
        a last segment shorter than its tag, or an empty last segment after a full one).
        """
        body = ciphertext_size - FILE_HEADER_LEN
        full = self.ciphertext_segment_size
        if body < TAG_LEN:
            raise DecryptionError()
        count = -(-body // full)
        last = body - (count - 1) * full
        if last < TAG_LEN or (last == TAG_LEN and count > 1) or count > MAX_SEGMENTS:
            raise DecryptionError()
        return body - TAG_LEN * count

    def segment_offset(self, index: int) -> int:
        """Ciphertext offset of segment `index` in the stored object (header included)."""
        return FILE_HEADER_LEN + index * self.ciphertext_segment_size

    def span(self, start: int, length: int, plaintext_size: int) -> SegmentSpan:
        """The segments and ciphertext bytes that plaintext bytes `start` .. `start + length - 1`
        of a `plaintext_size`-byte file need. `ValueError` unless 0 <= start, 1 <= length and the
        range ends inside the file (an HTTP layer clamps `bytes=a-b` to the size first)."""
        if start < 0 or length < 1 or start + length > plaintext_size:
            raise ValueError(
                f"plaintext range {start}+{length} is not inside a file of {plaintext_size} bytes"
            )
        first = start // self.segment_size
        last = (start + length - 1) // self.segment_size
        count = self.segment_count(plaintext_size)
        end = self.segment_offset(last + 1) if last + 1 < count else None
        ciphertext_end = end if end is not None else self.ciphertext_size(plaintext_size)
        return SegmentSpan(
            first=first,
            last=last,
            ciphertext_start=self.segment_offset(first),
            ciphertext_end=ciphertext_end,
            skip=start - first * self.segment_size,
            length=length,
        )


def _check_segment_size(size: object) -> None:
    if isinstance(size, bool) or not isinstance(size, int):
        raise TypeError("segment_size must be an int")
    if not MIN_SEGMENT_SIZE <= size <= MAX_SEGMENT_SIZE:
        raise ValueError(f"segment_size must be between {MIN_SEGMENT_SIZE} and {MAX_SEGMENT_SIZE}")


def _context(key: ChatKey, ctx: FileContext, segment_size: int) -> bytes:
    return _CONTEXT.pack(ctx.chat_id.bytes, ctx.file_id, key.version, segment_size)


def _derive(key: ChatKey, salt: bytes, context: bytes) -> tuple[bytes, bytes]:
    """(file key, commitment): docs/format.md, "Attachment files", key derivation."""
    okm = HKDF(algorithm=_SHA256, length=64, salt=salt, info=_INFO_LABEL + context).derive(
        key.material
    )
    return okm[:32], okm[32:]


class _Segments:
    """The per-file AES-GCM state: nonce and AAD of segment i, seal and open one segment."""

    def __init__(self, file_key: bytes, nonce_prefix: bytes, context: bytes) -> None:
        self._aead = AESGCM(file_key)
        self._prefix = nonce_prefix
        self._aad_prefix = _AAD_LABEL + bytes([FILE_FORMAT_V1]) + context

    def _nonce_aad(self, index: int, last: bool) -> tuple[bytes, bytes]:
        if not 0 <= index < MAX_SEGMENTS:
            raise DecryptionError()
        suffix = _SEGMENT.pack(index, 1 if last else 0)
        return self._prefix + suffix, self._aad_prefix + suffix

    def seal(self, index: int, last: bool, plaintext: bytes) -> bytes:
        nonce, aad = self._nonce_aad(index, last)
        return self._aead.encrypt(nonce, plaintext, aad)

    def open(self, index: int, last: bool, ciphertext: bytes | memoryview) -> bytes:
        nonce, aad = self._nonce_aad(index, last)
        try:
            return self._aead.decrypt(nonce, ciphertext, aad)
        except InvalidTag:
            pass
        raise DecryptionError()  # outside the except: no __context__ to leak the cause


def file_header_info(header: bytes) -> tuple[int, int]:
    """(dek_version, segment_size) from a file header, to fetch the right key before opening.

    Checks the length, format byte and ranges only (not the key); `DecryptionError` otherwise.
    """
    if not isinstance(header, bytes | bytearray | memoryview) or len(header) < FILE_HEADER_LEN:
        raise DecryptionError()
    version, dek_version, segment_size, _salt, _prefix, _commitment = _HEADER.unpack_from(header)
    if version != FILE_FORMAT_V1 or not 1 <= dek_version <= MAX_DEK_VERSION:
        raise DecryptionError()
    if not MIN_SEGMENT_SIZE <= segment_size <= MAX_SEGMENT_SIZE:
        raise DecryptionError()
    return dek_version, segment_size


# -- encryption -------------------------------------------------------------------------------------


def encrypt_file(
    key: ChatKey,
    ctx: FileContext,
    chunks: Iterable[bytes],
    *,
    segment_size: int = DEFAULT_SEGMENT_SIZE,
) -> Iterator[bytes]:
    """Encrypt the concatenation of `chunks` (any sizes) as one attachment file.

    Yields the 80-byte header first, then each ciphertext segment (`segment_size + 16` bytes,
    the last one shorter) as soon as it is known not to be the last one, i.e. it holds at most
    two segments of plaintext. The total output is `FileLayout(segment_size).ciphertext_size(n)`
    for `n` plaintext bytes. `TypeError` for a chunk that is not bytes-like.
    """
    _check_segment_size(segment_size)
    random = os.urandom(SALT_LEN + NONCE_PREFIX_LEN)
    return _encrypt_with(key, ctx, chunks, segment_size, random[:SALT_LEN], random[SALT_LEN:])


def _encrypt_with(
    key: ChatKey,
    ctx: FileContext,
    chunks: Iterable[bytes],
    segment_size: int,
    salt: bytes,
    nonce_prefix: bytes,
) -> Iterator[bytes]:
    """`encrypt_file` with a given salt and nonce prefix: for the test vectors only."""
    if len(salt) != SALT_LEN or len(nonce_prefix) != NONCE_PREFIX_LEN:
        raise ValueError(f"salt must be {SALT_LEN} bytes and nonce_prefix {NONCE_PREFIX_LEN}")
    context = _context(key, ctx, segment_size)
    file_key, commitment = _derive(key, salt, context)
    segments = _Segments(file_key, nonce_prefix, context)
    header = _HEADER.pack(FILE_FORMAT_V1, key.version, segment_size, salt, nonce_prefix, commitment)

    def generate() -> Iterator[bytes]:
        yield header
        buffer = bytearray()
        index = 0
        for chunk in chunks:
            if not isinstance(chunk, bytes | bytearray | memoryview):
                raise TypeError("encrypt_file: every chunk must be bytes")
            buffer += chunk
            # A segment is sealed as "not last" only once a byte after it exists. The buffer is
            # compacted once per chunk, not once per segment (each `del` moves what remains).
            done = 0
            while len(buffer) - done > segment_size:
                yield segments.seal(index, False, bytes(buffer[done : done + segment_size]))
                done += segment_size
                index += 1
                if index >= MAX_SEGMENTS:
                    raise ValueError("file too large for its segment size")
            del buffer[:done]
        yield segments.seal(index, True, bytes(buffer))

    return generate()


# -- decryption -------------------------------------------------------------------------------------


class FileOpener:
    """Opens the segments of one file, after its header checked out (`from_header`)."""

    def __init__(self, layout: FileLayout, segments: _Segments) -> None:
        self.layout = layout
        self._segments = segments

    @classmethod
    def from_header(cls, key: ChatKey, ctx: FileContext, header: bytes) -> FileOpener:
        """Check a file's 80-byte header against the key and ids, in the order of docs/format.md:
        length, format byte, DEK version (must equal `key.version`), segment size range, then the
        commitment in constant time. `DecryptionError` on any failure."""
        dek_version, segment_size = file_header_info(header)
        if dek_version != key.version:
            raise DecryptionError()
        _v, _d, _s, salt, nonce_prefix, commitment = _HEADER.unpack_from(header)
        context = _context(key, ctx, segment_size)
        file_key, expected = _derive(key, salt, context)
        if not hmac.compare_digest(commitment, expected):
            raise DecryptionError()
        return cls(FileLayout(segment_size), _Segments(file_key, nonce_prefix, context))

    def open_segment(self, index: int, last: bool, ciphertext: bytes | memoryview) -> bytes:
        """The plaintext of segment `index` (`last`: whether it is the file's last segment)."""
        if len(ciphertext) < TAG_LEN or len(ciphertext) > self.layout.ciphertext_segment_size:
            raise DecryptionError()
        if not last and len(ciphertext) != self.layout.ciphertext_segment_size:
            raise DecryptionError()
        return self._segments.open(index, last, ciphertext)

    def decrypt_range(
        self, chunks: Iterable[bytes], span: SegmentSpan, plaintext_size: int
    ) -> Iterator[bytes]:
        """The plaintext bytes of `span` (from `layout.span`), given the ciphertext bytes
        `span.ciphertext_start` .. `span.ciphertext_end - 1` in chunks of any size. Decrypts
        only segments `span.first` .. `span.last`; `DecryptionError` if any fails."""
        count = self.layout.segment_count(plaintext_size)
        full = self.layout.ciphertext_segment_size
        skip, remaining = span.skip, span.length
        buffer = bytearray()
        index = span.first

        def emit(plaintext: bytes) -> bytes:
            nonlocal skip, remaining
            piece = plaintext[skip : skip + remaining]
            skip = 0
            remaining -= len(piece)
            return piece

        for chunk in chunks:
            buffer += chunk
            done = 0
            # Segments are opened from a view of the buffer, not a copy of it (the tag is
            # checked on the same bytes either way); the view is let go before the buffer moves.
            with memoryview(buffer) as view:
                while len(buffer) - done >= full and index <= span.last:
                    last = index == count - 1
                    if last and len(buffer) - done > full:
                        raise DecryptionError()  # bytes beyond the file's last segment
                    yield emit(self.open_segment(index, last, view[done : done + full]))
                    done += full
                    index += 1
            del buffer[:done]  # once per chunk (see encrypt_file)
        if index <= span.last:
            if index != count - 1 or index != span.last:
                raise DecryptionError()  # the bytes ended before the range did
            yield emit(self.open_segment(index, True, bytes(buffer)))
        elif buffer:
            raise DecryptionError()
        if remaining:
            raise DecryptionError()


def decrypt_file(key: ChatKey, ctx: FileContext, chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Decrypt a whole attachment file from its ciphertext in chunks of any size, without knowing
    its size: a segment counts as the last one when the input ends after it. Yields one
    plaintext piece per segment, each only after its tag verified; `DecryptionError` on any
    failure (the header is checked before any segment)."""
    iterator = iter(chunks)
    buffer = bytearray()
    for chunk in iterator:
        buffer += chunk
        if len(buffer) >= FILE_HEADER_LEN:
            break
    opener = FileOpener.from_header(key, ctx, bytes(buffer[:FILE_HEADER_LEN]))
    del buffer[:FILE_HEADER_LEN]
    full = opener.layout.ciphertext_segment_size
    index = 0
    while True:
        # Only once a byte beyond it has arrived is a full segment known not to be the last.
        done = 0
        with memoryview(buffer) as view:  # no copy of each segment (see decrypt_range)
            while len(buffer) - done > full:
                yield opener.open_segment(index, False, view[done : done + full])
                done += full
                index += 1
        del buffer[:done]  # once per chunk (see encrypt_file)
        more = next(iterator, None)
        if more is None:
            break
        buffer += more
    yield opener.open_segment(index, True, bytes(buffer))
