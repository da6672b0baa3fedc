"""Attachment downloads through the reader's API, on the real stack: Cassandra rows, the object
store (a bucket of this module's own), a chat and its DEKs from the real key service.

Files are stored with `AttachmentFiles.store` (what the gateway's upload calls). What a user
relies on: a participant gets the file back byte for byte, whole or any range, with the headers
a browser needs; nobody else gets anything; and a damaged or moved object never passes for the
file: an error before the first byte, or a transfer the client sees break, never a clean end.
The tests that need a real server (the aborted transfer, the 100 MiB download's memory) run the
reader as its own process (`sealstream run reader`) and talk raw HTTP to it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import struct
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from reader.downloads import etag
from reader.wiring import build
from schemas.ids import SnowflakeIds, bucket_of
from sealstream.adapters.cassandra import AttachmentRow, MessageStore
from sealstream.adapters.object_store import ObjectStore
from sealstream.adapters.opensearch import SearchIndex
from sealstream.attachments import AttachmentFiles, object_key
from sealstream.auth import mint_token
from sealstream.file_crypto import FILE_HEADER_LEN, SEGMENT_OVERHEAD
from sealstream.keys.service import KeyService
from sealstream.services import settings_env, spawn
from sealstream.settings import HttpLimits, ReaderHttp, Settings
from sealstream.wiring import key_service
from tests.integration.conftest import fresh_index, fresh_store, module_stores

SEGMENT = 64 * 1024  # the default segment size (AttachmentSettings.segment_size)
CT_SEGMENT = SEGMENT + SEGMENT_OVERHEAD
IDS = SnowflakeIds(worker_id=1013)
MiB = 1024 * 1024


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def reader_settings(settings: Settings, scratch_object_store: ObjectStore) -> Settings:
    """This run's settings with this module's keyspace, index, bucket and a free reader port."""
    own = module_stores(settings, "files")
    return own.model_copy(
        update={
            "object_store": scratch_object_store.settings,
            "reader": ReaderHttp(port=free_port()),
        }
    )


@pytest.fixture(scope="module")
def store(reader_settings: Settings) -> Iterator[MessageStore]:
    with fresh_store(reader_settings) as store:
        yield store


@pytest.fixture(scope="module")
def index(reader_settings: Settings) -> Iterator[SearchIndex]:
    with fresh_index(reader_settings) as index:
        yield index


@pytest.fixture(scope="module")
def keys(reader_settings: Settings, database: Any, kms: Any) -> Iterator[KeyService]:
    kms.ensure_key(reader_settings.vault.default_key)  # the kms fixture deletes it at the end
    with key_service(reader_settings, database) as service:
        yield service


@pytest.fixture(scope="module")
def files(
    scratch_object_store: ObjectStore, store: MessageStore, keys: KeyService
) -> AttachmentFiles:
    return AttachmentFiles(scratch_object_store, store, keys, segment_size=SEGMENT)


@pytest.fixture(scope="module")
def client(
    reader_settings: Settings, store: MessageStore, index: SearchIndex, keys: KeyService
) -> Iterator[TestClient]:
    app, close = build(reader_settings)
    try:
        with TestClient(app) as test_client:
            yield test_client
    finally:
        close()


@pytest.fixture(scope="module")
def live_reader(
    reader_settings: Settings, store: MessageStore, index: SearchIndex, keys: KeyService
) -> Iterator[tuple[str, int, Path]]:
    """The reader as its own process on a free port: (base URL, pid, its log file)."""
    with running_reader(reader_settings) as running:
        yield running


@contextlib.contextmanager
def running_reader(reader_settings: Settings) -> Iterator[tuple[str, int, Path]]:
    log = Path(tempfile.mkdtemp(prefix="sealstream-reader-files-")) / "reader.log"
    proc = spawn("reader", {**os.environ, **settings_env(reader_settings)}, log=log)
    url = f"http://127.0.0.1:{reader_settings.reader.port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"reader did not start: {log.read_text()[-2000:]}")
            time.sleep(0.2)
        yield url, proc.pid, log
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)


class Chats:
    def __init__(self, keys: KeyService, files: AttachmentFiles) -> None:
        self.keys = keys
        self.files = files

    def chat(self, participants: tuple[str, ...] = ("alice", "bob")) -> uuid.UUID:
        chat_id = uuid.uuid4()
        self.keys.create_chat(chat_id, participants)
        return chat_id

    def upload(
        self,
        chat_id: uuid.UUID,
        data: bytes,
        content_type: str = "application/pdf",
        sent: bool = True,
    ) -> AttachmentRow:
        """Alice's file; `sent`: referenced by a message of hers, as the gateway records it
        (without, only alice may read it)."""
        row = self.files.store(
            chat_id, IDS.next_id(), "alice", content_type, pieces(data), len(data) or 1
        )
        if sent:
            self.files.share(chat_id, [row.file_id])
        return row


@pytest.fixture(scope="module")
def chats(keys: KeyService, files: AttachmentFiles) -> Chats:
    return Chats(keys, files)


@pytest.fixture(scope="module")
def as_user(reader_settings: Settings) -> Callable[[str], dict[str, str]]:
    return lambda user: {"Authorization": f"Bearer {mint_token(reader_settings.auth, user)}"}


def pieces(data: bytes, size: int = 100_003) -> Iterator[bytes]:
    for offset in range(0, len(data), size):
        yield data[offset : offset + size]


def url_of(row: AttachmentRow) -> str:
    return f"/v1/chats/{row.chat_id}/attachments/{row.file_id}"


# --- whole files -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size",
    [0, 1, SEGMENT, SEGMENT + 1, 5 * SEGMENT + 17],
    ids=["empty", "one-byte", "one-segment", "segment-plus-one", "several-segments"],
)
def test_a_participant_downloads_the_whole_file_with_browser_headers(
    client: TestClient, chats: Chats, as_user: Callable[[str], dict[str, str]], size: int
) -> None:
    data = os.urandom(size)
    row = chats.upload(chats.chat(), data, "image/jpeg")
    response = client.get(url_of(row), headers=as_user("bob"))
    assert response.status_code == 200, response.text
    assert response.content == data
    assert response.headers["content-length"] == str(size)
    assert response.headers["content-type"] == "image/jpeg"
    assert response.headers["accept-ranges"] == "bytes"
    assert response.headers["etag"] == etag(row) and response.headers["etag"].startswith('"')
    assert response.headers["content-disposition"] == f'attachment; filename="{row.file_id}.jpg"'
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["cache-control"] == "private"


def test_the_media_type_is_sent_as_uploaded_and_names_the_extension(
    client: TestClient, chats: Chats, as_user: Callable[[str], dict[str, str]]
) -> None:
    chat = chats.chat()
    text = chats.upload(chat, b"plain words", "text/plain")
    response = client.get(url_of(text), headers=as_user("alice"))
    # No charset added: the reader does not know the text's encoding.
    assert response.headers["content-type"] == "text/plain"
    assert response.headers["content-disposition"].endswith(f'filename="{text.file_id}.txt"')
    unknown = chats.upload(chat, b"\x00\x01", "application/x-sealstream-test")
    response = client.get(url_of(unknown), headers=as_user("alice"))
    assert response.headers["content-disposition"].endswith(f'filename="{unknown.file_id}"')


# --- ranges ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ranged(chats: Chats) -> tuple[AttachmentRow, bytes]:
    data = os.urandom(7 * SEGMENT + 300)
    return chats.upload(chats.chat(), data), data


@pytest.mark.parametrize(
    ("header", "start", "end"),
    [
        ("bytes=0-0", 0, 0),
        (f"bytes={SEGMENT - 1}-{SEGMENT}", SEGMENT - 1, SEGMENT),  # straddles a boundary
        (f"bytes={SEGMENT}-{2 * SEGMENT - 1}", SEGMENT, 2 * SEGMENT - 1),  # one whole segment
        (f"bytes={3 * SEGMENT - 5}-{5 * SEGMENT + 4}", 3 * SEGMENT - 5, 5 * SEGMENT + 4),
        (f"bytes={7 * SEGMENT}-", 7 * SEGMENT, 7 * SEGMENT + 299),  # the short last segment
        ("bytes=-1", 7 * SEGMENT + 299, 7 * SEGMENT + 299),  # suffix: the last byte
        ("bytes=-70000", 7 * SEGMENT + 300 - 70000, 7 * SEGMENT + 299),  # suffix over a boundary
        ("bytes=-99999999", 0, 7 * SEGMENT + 299),  # suffix longer than the file: all of it
        (f"bytes=100-{10**12}", 100, 7 * SEGMENT + 299),  # end past the file: clipped
    ],
)
def test_a_range_answers_206_with_exactly_those_bytes(
    client: TestClient,
    ranged: tuple[AttachmentRow, bytes],
    as_user: Callable[[str], dict[str, str]],
    header: str,
    start: int,
    end: int,
) -> None:
    row, data = ranged
    response = client.get(url_of(row), headers={**as_user("alice"), "Range": header})
    assert response.status_code == 206, response.text
    assert response.content == data[start : end + 1]
    assert response.headers["content-range"] == f"bytes {start}-{end}/{len(data)}"
    assert response.headers["content-length"] == str(end - start + 1)
    assert response.headers["etag"] == etag(row)


RANGED_SIZE = 7 * SEGMENT + 300


@pytest.mark.parametrize(
    "header", ["bytes=2000000-", f"bytes={RANGED_SIZE}-{RANGED_SIZE + 1}", "bytes=-0"]
)
def test_a_range_past_the_end_answers_416_with_the_size(
    client: TestClient,
    ranged: tuple[AttachmentRow, bytes],
    as_user: Callable[[str], dict[str, str]],
    header: str,
) -> None:
    row, data = ranged
    assert len(data) == RANGED_SIZE
    response = client.get(url_of(row), headers={**as_user("alice"), "Range": header})
    assert response.status_code == 416
    assert response.headers["content-range"] == f"bytes */{len(data)}"
    assert response.json()["error"]["code"] == "range_not_satisfiable"


@pytest.mark.parametrize(
    "header",
    ["bytes=0-1,5-9", "bytes=10-5", "items=0-1", "bytes=abc", "bytes=", "bytes=--1", "0-1"],
    ids=["several", "backwards", "other-unit", "letters", "empty", "double-dash", "no-unit"],
)
def test_several_or_malformed_ranges_are_ignored_and_the_whole_file_sent(
    client: TestClient,
    ranged: tuple[AttachmentRow, bytes],
    as_user: Callable[[str], dict[str, str]],
    header: str,
) -> None:
    row, data = ranged
    response = client.get(url_of(row), headers={**as_user("alice"), "Range": header})
    assert response.status_code == 200
    assert response.content == data and "content-range" not in response.headers


def test_ranges_of_an_empty_file(
    client: TestClient, chats: Chats, as_user: Callable[[str], dict[str, str]]
) -> None:
    row = chats.upload(chats.chat(), b"")
    first = client.get(url_of(row), headers={**as_user("alice"), "Range": "bytes=0-"})
    assert (first.status_code, first.headers["content-range"]) == (416, "bytes */0")
    suffix = client.get(url_of(row), headers={**as_user("alice"), "Range": "bytes=-5"})
    assert (suffix.status_code, suffix.content) == (200, b"")


# --- HEAD and conditional requests ---------------------------------------------------------------


def test_head_gives_the_headers_of_the_whole_file_and_no_body(
    client: TestClient,
    ranged: tuple[AttachmentRow, bytes],
    as_user: Callable[[str], dict[str, str]],
) -> None:
    row, data = ranged
    response = client.head(url_of(row), headers={**as_user("bob"), "Range": "bytes=0-9"})
    assert response.status_code == 200  # Range is for GET only
    assert response.content == b""
    assert response.headers["content-length"] == str(len(data))
    assert response.headers["etag"] == etag(row)
    assert response.headers["content-type"] == "application/pdf"
    assert client.head(url_of(row), headers=as_user("mallory")).status_code == 403


def test_if_none_match_answers_304_and_if_range_guards_the_range(
    client: TestClient,
    chats: Chats,
    ranged: tuple[AttachmentRow, bytes],
    as_user: Callable[[str], dict[str, str]],
) -> None:
    row, data = ranged
    user = as_user("alice")
    tag = client.get(url_of(row), headers=user).headers["etag"]
    assert client.get(url_of(row), headers=user).headers["etag"] == tag  # stable
    other = chats.upload(row.chat_id, data)  # the same bytes as another file
    assert client.head(url_of(other), headers=user).headers["etag"] != tag

    for held in (tag, f"W/{tag}", f'"nope", {tag}', "*"):
        cached = client.get(url_of(row), headers={**user, "If-None-Match": held})
        assert (cached.status_code, cached.content) == (304, b"")
        assert cached.headers["etag"] == tag
    assert client.head(url_of(row), headers={**user, "If-None-Match": tag}).status_code == 304
    changed = client.get(url_of(row), headers={**user, "If-None-Match": '"another"'})
    assert changed.status_code == 200 and changed.content == data

    still = client.get(url_of(row), headers={**user, "Range": "bytes=5-9", "If-Range": tag})
    assert (still.status_code, still.content) == (206, data[5:10])
    for stale in ('"another"', f"W/{tag}", "Tue, 01 Dec 2026 10:00:00 GMT"):
        whole = client.get(url_of(row), headers={**user, "Range": "bytes=5-9", "If-Range": stale})
        assert (whole.status_code, whole.content) == (200, data)


# --- who may download what ----------------------------------------------------------------------


def test_only_participants_download_and_only_live_attachments_of_that_chat(
    client: TestClient,
    chats: Chats,
    store: MessageStore,
    as_user: Callable[[str], dict[str, str]],
) -> None:
    chat = chats.chat(("alice", "bob"))
    row = chats.upload(chat, b"secret plan")
    refused = client.get(url_of(row), headers=as_user("mallory"))
    assert refused.status_code == 403 and b"secret" not in refused.content
    assert refused.json()["error"]["code"] == "forbidden"
    assert client.get(url_of(row), headers={}).status_code == 401
    # A participant of another chat cannot reach this chat's file through their own chat.
    theirs = chats.chat(("mallory",))
    stolen = client.get(f"/v1/chats/{theirs}/attachments/{row.file_id}", headers=as_user("mallory"))
    assert stolen.status_code == 404
    unknown = client.get(f"/v1/chats/{chat}/attachments/{IDS.next_id()}", headers=as_user("bob"))
    assert unknown.status_code == 404
    no_chat = client.get(
        f"/v1/chats/{uuid.uuid4()}/attachments/{row.file_id}", headers=as_user("bob")
    )
    assert no_chat.status_code == 404
    bad_id = client.get(f"/v1/chats/{chat}/attachments/0", headers=as_user("bob"))
    assert bad_id.status_code == 422

    store.mark_attachment_deleted(chat, row.file_id, datetime.now(UTC))
    assert client.get(url_of(row), headers=as_user("bob")).status_code == 404
    assert client.head(url_of(row), headers=as_user("bob")).status_code == 404


def test_a_deleted_chat_answers_410(
    client: TestClient, chats: Chats, keys: KeyService, as_user: Callable[[str], dict[str, str]]
) -> None:
    chat = chats.chat()
    row = chats.upload(chat, b"x" * 10)
    keys.delete_chat(chat, "test")
    response = client.get(url_of(row), headers=as_user("alice"))
    assert response.status_code == 410, response.text


# --- tampering --------------------------------------------------------------------------------


def segments_of(objects: ObjectStore, row: AttachmentRow) -> tuple[bytes, list[bytes]]:
    blob = b"".join(objects.get(row.object_key))
    body = blob[FILE_HEADER_LEN:]
    return blob[:FILE_HEADER_LEN], [
        body[i : i + CT_SEGMENT] for i in range(0, len(body), CT_SEGMENT)
    ]


def rewrite(objects: ObjectStore, row: AttachmentRow, header: bytes, segs: list[bytes]) -> None:
    objects.put(row.object_key, [header + b"".join(segs)])


def flip_middle(header: bytes, segs: list[bytes]) -> tuple[bytes, list[bytes]]:
    middle = bytearray(segs[len(segs) // 2])
    middle[100] ^= 0x01
    return header, [*segs[: len(segs) // 2], bytes(middle), *segs[len(segs) // 2 + 1 :]]


def swap(i: int, j: int) -> Callable[[bytes, list[bytes]], tuple[bytes, list[bytes]]]:
    def tamper(header: bytes, segs: list[bytes]) -> tuple[bytes, list[bytes]]:
        segs = list(segs)
        segs[i], segs[j] = segs[j], segs[i]
        return header, segs

    return tamper


MARKER = b"plaintext-marker:"
# name -> (tamper, True if the first segment is hit: an error before the first byte)
TAMPERS: dict[str, tuple[Callable[[bytes, list[bytes]], tuple[bytes, list[bytes]]], bool]] = {
    "first-two-reordered": (swap(0, 1), True),
    "middle-reordered": (swap(2, 3), False),
    "middle-byte-flipped": (flip_middle, False),
    "last-segment-dropped": (lambda h, s: (h, s[:-1]), False),
    "cut-to-first-segment": (lambda h, s: (h, s[:1]), True),
    "segment-appended": (lambda h, s: (h, [*s, s[1]]), False),
    "header-byte-flipped": (lambda h, s: (h[:-1] + bytes([h[-1] ^ 1]), s), True),
}


def raw_get(
    base_url: str, path: str, headers: dict[str, str]
) -> tuple[int, dict[str, str], bytes, bool]:
    """One GET on a raw socket: (status, headers, body bytes received, whether the connection
    closed before Content-Length bytes came). Nothing of HTTP is interpreted beyond that."""
    host, port = base_url.removeprefix("http://").split(":")
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        received = b""
        while b"\r\n\r\n" not in received:
            more = sock.recv(65536)
            assert more, "connection closed before the response head"
            received += more
        head, body = received.split(b"\r\n\r\n", 1)
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        answer = {k.lower(): v.strip() for k, v in (h.split(":", 1) for h in header_lines)}
        expected = int(answer.get("content-length", "-1"))
        while True:
            more = sock.recv(1 << 20)
            if not more:
                break
            body += more
        assert "transfer-encoding" not in answer  # framed by Content-Length only
        return int(status_line.split()[1]), answer, body, len(body) < expected


@pytest.mark.parametrize("case", list(TAMPERS))
def test_a_tampered_object_never_downloads_as_a_complete_file(
    live_reader: tuple[str, int, Path],
    chats: Chats,
    scratch_object_store: ObjectStore,
    as_user: Callable[[str], dict[str, str]],
    case: str,
) -> None:
    tamper, before_first_byte = TAMPERS[case]
    data = MARKER + os.urandom(6 * SEGMENT + 1234 - len(MARKER))
    row = chats.upload(chats.chat(), data)
    rewrite(scratch_object_store, row, *tamper(*segments_of(scratch_object_store, row)))
    base_url, _pid, log = live_reader
    status, headers, body, cut = raw_get(base_url, url_of(row), as_user("alice"))
    if before_first_byte:
        assert status == 500, body[:300]
        assert b'"integrity_error"' in body and not cut
    else:
        assert status == 200
        assert int(headers["content-length"]) == len(data)
        assert cut, f"{case}: the body ended cleanly ({len(body)} of {len(data)} bytes)"
        assert data.startswith(body)  # what came is the genuine prefix, and no more
    # A range from the second segment: an error, or genuine bytes that either are the whole
    # range or stop short of Content-Length (an appended segment is outside the row's size, so
    # a range read never looks at it and answers the genuine bytes).
    status, headers, body, cut = raw_get(
        base_url, url_of(row), {**as_user("alice"), "Range": f"bytes={SEGMENT}-"}
    )
    if status == 500:
        assert b'"integrity_error"' in body
    else:
        assert status == 206 and data[SEGMENT:].startswith(body)
        assert cut or body == data[SEGMENT:], f"{case}: a short range ended cleanly"
    # The failure is logged by ids, never with a byte of the file.
    logged = log.read_bytes()
    assert f'"file_id": {row.file_id}'.encode() in logged
    assert MARKER not in logged


@pytest.mark.parametrize("move", ["another-file-id", "another-chat"])
def test_an_object_moved_to_another_file_or_chat_does_not_open(
    client: TestClient,
    chats: Chats,
    store: MessageStore,
    scratch_object_store: ObjectStore,
    as_user: Callable[[str], dict[str, str]],
    move: str,
) -> None:
    """The attacker holds the object store and Cassandra: copies a file's object under another
    file id (or into another chat of the same users, sharing nothing but participants) and
    writes a row for it. The file's key and every segment are bound to its chat and id."""
    row = chats.upload(chats.chat(), os.urandom(3 * SEGMENT))
    chat = row.chat_id if move == "another-file-id" else chats.chat()
    file_id = IDS.next_id()
    where = object_key(chat, file_id)
    scratch_object_store.put(where, scratch_object_store.get(row.object_key))
    forged = replace(row, chat_id=chat, file_id=file_id, object_key=where)
    if move == "another-chat":
        # The other chat's DEK has its own version numbering: point at one that exists.
        forged = replace(forged, dek_version=chats.keys.current_key(chat).version)
    store.write_attachment(forged)
    for headers in ({}, {"Range": f"bytes={SEGMENT + 5}-{SEGMENT + 9}"}):
        response = client.get(url_of(forged), headers={**as_user("alice"), **headers})
        assert response.status_code == 500, response.text
        assert response.json()["error"]["code"] == "integrity_error"


# --- a large file on the real server -----------------------------------------------------------


def vm_hwm_kib(pid: int) -> int:
    """Peak resident set (VmHWM, KiB) of process `pid` (the reader serves in-process)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM")))


def test_a_100_mib_file_downloads_through_the_server_in_flat_memory(
    live_reader: tuple[str, int, Path],
    chats: Chats,
    as_user: Callable[[str], dict[str, str]],
) -> None:
    size = 100 * MiB
    block = os.urandom(MiB)
    expected = hashlib.sha256()

    def source() -> Iterator[bytes]:
        for i in range(size // MiB):
            chunk = i.to_bytes(8, "big") + block[8:]  # every MiB distinct
            expected.update(chunk)
            yield chunk

    chat = chats.chat()
    row = chats.files.store(chat, IDS.next_id(), "alice", "video/mp4", source(), size)
    base_url, pid, _log = live_reader
    # Warm the process up with a small download first: the peak then measures the big one.
    small = chats.upload(chat, os.urandom(3 * SEGMENT))
    httpx.get(base_url + url_of(small), headers=as_user("alice"), timeout=60).raise_for_status()
    before = vm_hwm_kib(pid)
    got = hashlib.sha256()
    received = 0
    with httpx.stream("GET", base_url + url_of(row), headers=as_user("alice"), timeout=120) as r:
        assert r.status_code == 200
        assert r.headers["content-length"] == str(size)
        for piece in r.iter_raw():
            got.update(piece)
            received += len(piece)
    growth_mib = (vm_hwm_kib(pid) - before) / 1024
    print(
        f"\n100 MiB download: reader peak RSS {before / 1024:.1f} MiB before, "
        f"grew by {growth_mib:.1f} MiB"
    )
    assert received == size and got.digest() == expected.digest()
    assert growth_mib < 64, f"the reader's peak RSS grew {growth_mib:.1f} MiB for 100 MiB"


def threads_of(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("Threads")))


def test_a_client_that_leaves_mid_download_releases_what_the_download_held(
    live_reader: tuple[str, int, Path],
    chats: Chats,
    as_user: Callable[[str], dict[str, str]],
) -> None:
    """The download's read-ahead thread stops (and lets go of its object-store connection)
    once the client is gone, instead of decrypting the rest of the file for nobody."""
    base_url, pid, _log = live_reader
    row = chats.upload(chats.chat(), os.urandom(24 * MiB))
    headers = as_user("alice")
    httpx.get(base_url + url_of(row), headers=headers, timeout=60).raise_for_status()  # warm-up
    baseline = threads_of(pid)
    host, port = base_url.removeprefix("http://").split(":")
    for _ in range(3):
        with socket.create_connection((host, int(port)), timeout=60) as sock:
            request = f"GET {url_of(row)} HTTP/1.1\r\nHost: {host}\r\n"
            request += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
            sock.sendall(request.encode())
            received = 0
            while received < MiB:
                received += len(sock.recv(65536))
    deadline = time.monotonic() + 30
    while threads_of(pid) > baseline and time.monotonic() < deadline:
        time.sleep(0.2)
    assert threads_of(pid) <= baseline, "a download's thread outlived its client"
    again = httpx.get(base_url + url_of(row), headers=headers, timeout=60)
    assert again.status_code == 200 and len(again.content) == row.size


# --- a row whose size is not the file's --------------------------------------------------------


@pytest.mark.parametrize(
    "forged_size",
    [0, SEGMENT, MiB, "one-less", "one-more"],
    ids=["zero", "one-segment", "one-mib", "one-byte-less", "one-byte-more"],
)
@pytest.mark.parametrize("asked", ["whole", "range-from-0"])
def test_a_row_whose_size_was_changed_never_downloads_as_a_complete_file(
    live_reader: tuple[str, int, Path],
    chats: Chats,
    store: MessageStore,
    as_user: Callable[[str], dict[str, str]],
    forged_size: int | str,
    asked: str,
) -> None:
    """The attacker writes to Cassandra only: the file's row claims another size. The size
    sets Content-Length, so a download that ended cleanly would hand the client a file cut at
    (or padded to) the forged size as if it were the upload. It must fail before the first byte
    or break off short of Content-Length."""
    data = MARKER + os.urandom(2 * MiB + 1234 - len(MARKER))
    row = chats.upload(chats.chat(), data)
    size = {"one-less": len(data) - 1, "one-more": len(data) + 1}.get(str(forged_size))
    forged = replace(row, size=forged_size if size is None else size)
    store.session.execute(  # as an operator's cqlsh would: now, over the upload's write
        f"UPDATE {store.keyspace}.attachments SET size = %s"
        " WHERE chat_id = %s AND bucket = %s AND file_id = %s",
        (forged.size, row.chat_id, bucket_of(row.file_id), row.file_id),
    )
    stored = store.attachment(row.chat_id, row.file_id)
    assert stored is not None and stored.size == forged.size
    base_url, _pid, _log = live_reader
    headers = as_user("alice") if asked == "whole" else {**as_user("alice"), "Range": "bytes=0-"}
    status, _headers, body, cut = raw_get(base_url, url_of(row), headers)
    if status in (416, 500):  # no byte of the file sent
        assert b'"integrity_error"' in body or b'"range_not_satisfiable"' in body
        assert MARKER not in body
        return
    assert status in (200, 206), body[:300]
    assert cut, f"a {forged.size}-byte row of a {len(data)}-byte file ended cleanly"
    assert data.startswith(body)


# --- a client that stops reading ---------------------------------------------------------------


def test_a_client_that_stops_reading_does_not_hold_the_download_for_ever(
    reader_settings: Settings,
    chats: Chats,
    store: MessageStore,
    keys: KeyService,
    as_user: Callable[[str], dict[str, str]],
) -> None:
    """Clients that ask for a file and then read nothing, connection open: each download
    held a read-ahead thread, a store connection and a few MiB of plaintext for as long as the
    client kept the socket (uvicorn has no write deadline), so a few hundred such sockets, well
    under the listener's connection limit, starved the reader. Past
    `HttpLimits.send_timeout_seconds` without the client taking the next piece, the download
    is cut off and what it held is released."""
    stall = 2.0
    settings = reader_settings.model_copy(
        update={
            "reader": ReaderHttp(port=free_port(), limits=HttpLimits(send_timeout_seconds=stall))
        }
    )
    row = chats.upload(chats.chat(), os.urandom(24 * MiB))
    headers = as_user("alice")
    with running_reader(settings) as (base_url, pid, _log):
        httpx.get(base_url + url_of(row), headers=headers, timeout=60).raise_for_status()
        baseline = threads_of(pid)
        host, port = base_url.removeprefix("http://").split(":")
        stalled = []
        for _ in range(4):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect((host, int(port)))
            request = f"GET {url_of(row)} HTTP/1.1\r\nHost: {host}\r\n"
            request += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
            sock.sendall(request.encode())
            assert sock.recv(1024).startswith(b"HTTP/1.1 200")  # then nothing more is read
            stalled.append(sock)
        try:
            deadline = time.monotonic() + 20 * stall
            while threads_of(pid) > baseline and time.monotonic() < deadline:
                time.sleep(0.2)
            assert threads_of(pid) <= baseline, "a download held its thread for a stalled client"
            again = httpx.get(base_url + url_of(row), headers=headers, timeout=60)
            assert again.status_code == 200 and len(again.content) == row.size
        finally:
            for sock in stalled:
                sock.close()


# --- a file not sent yet -----------------------------------------------------------------------


def test_a_file_no_message_references_yet_is_its_uploaders_alone(
    client: TestClient, chats: Chats, as_user: Callable[[str], dict[str, str]]
) -> None:
    """An upload is a draft until a message references it: the uploader may change their mind
    and never send it. Ids are Snowflake ids (time, worker, sequence: a few thousand guesses per
    second of upload time), so another participant must not be able to fetch it by its id
    before it was sent."""
    data = MARKER + os.urandom(3 * SEGMENT)
    row = chats.upload(chats.chat(("alice", "bob")), data, sent=False)
    assert client.get(url_of(row), headers=as_user("alice")).content == data
    unsent = client.get(url_of(row), headers=as_user("bob"))
    assert unsent.status_code == 404 and MARKER not in unsent.content
    assert client.head(url_of(row), headers=as_user("bob")).status_code == 404
    ranged = client.get(url_of(row), headers={**as_user("bob"), "Range": "bytes=0-99"})
    assert ranged.status_code == 404
    chats.files.share(row.chat_id, [row.file_id])  # a message of alice's references it
    assert client.get(url_of(row), headers=as_user("bob")).content == data


def stalled_download(base_url: str, path: str, headers: dict[str, str]) -> socket.socket:
    """A GET whose client then reads nothing (a tiny receive buffer, connection kept)."""
    host, port = base_url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n"
    request += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    sock.sendall(request.encode())
    assert sock.recv(12).startswith(b"HTTP/1.1 200")
    return sock


def test_downloads_at_once_are_bounded_per_reader_and_per_user(
    reader_settings: Settings,
    chats: Chats,
    store: MessageStore,
    keys: KeyService,
    as_user: Callable[[str], dict[str, str]],
) -> None:
    """Each download holds a thread and several MiB of plaintext while its client is slow
    (40 stalled downloads grew the reader by about 300 MiB): the listener's 1000 connections
    were enough to exhaust a reader's memory within the send timeout. Downloads under way are
    bounded per reader (`AttachmentSettings.downloads_at_once`, else 503 with Retry-After) and
    per user (`downloads_per_user`, else 429), refused before the object is touched."""
    files = reader_settings.attachments.model_copy(
        update={"downloads_at_once": 3, "downloads_per_user": 2, "max_per_message": 2}
    )
    settings = reader_settings.model_copy(
        update={"reader": ReaderHttp(port=free_port()), "attachments": files}
    )
    chat = chats.chat(("alice", "bob", "carol"))
    row = chats.upload(chat, os.urandom(8 * MiB))
    with running_reader(settings) as (base_url, _pid, _log):
        url = base_url + url_of(row)
        held = [stalled_download(base_url, url_of(row), as_user("alice")) for _ in range(2)]
        try:
            third = httpx.get(url, headers=as_user("alice"), timeout=30)
            assert third.status_code == 429, third.text
            assert third.json()["error"]["code"] == "too_many_downloads"
            held.append(stalled_download(base_url, url_of(row), as_user("bob")))
            full = httpx.get(url, headers=as_user("carol"), timeout=30)
            assert full.status_code == 503, full.text
            assert full.headers["retry-after"] == "1"
            assert full.json()["error"]["code"] == "busy"
        finally:
            for sock in held:
                sock.close()
        deadline = time.monotonic() + 30
        while True:  # the slots come back once the server saw the clients go
            again = httpx.get(url, headers=as_user("carol"), timeout=30)
            if again.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert again.status_code == 200 and len(again.content) == row.size


def test_download_slots_come_back_when_clients_leave_before_the_first_byte(
    reader_settings: Settings,
    chats: Chats,
    store: MessageStore,
    keys: KeyService,
    as_user: Callable[[str], dict[str, str]],
) -> None:
    """Clients that ask and hang up at once (before the response starts, or just after) must
    not keep their download slots: else a few such requests would lock a user, or with
    `downloads_at_once` of them the whole reader, out of downloads for good."""
    files = reader_settings.attachments.model_copy(
        update={"downloads_at_once": 2, "downloads_per_user": 2, "max_per_message": 2}
    )
    settings = reader_settings.model_copy(
        update={"reader": ReaderHttp(port=free_port()), "attachments": files}
    )
    row = chats.upload(chats.chat(), os.urandom(4 * MiB))
    headers = as_user("alice")
    with running_reader(settings) as (base_url, _pid, _log):
        host, port = base_url.removeprefix("http://").split(":")
        request = f"GET {url_of(row)} HTTP/1.1\r\nHost: {host}\r\n"
        request += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        for _ in range(20):
            sock = socket.create_connection((host, int(port)))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.sendall(request.encode())
            sock.close()  # a reset, before or while the reader answers
        deadline = time.monotonic() + 30
        while True:
            again = httpx.get(base_url + url_of(row), headers=headers, timeout=30)
            if again.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert again.status_code == 200, again.text
        assert len(again.content) == row.size
