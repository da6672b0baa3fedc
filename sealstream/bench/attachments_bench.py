"""`sealstream bench attachments`: the attachment APIs beside their baselines (issue 14).

It measures, on this machine and in one run,

- raw AES-256-GCM on one core (64 KiB calls through `cryptography`, best of five windows): the
  ceiling of any encrypted upload or download;
- the attachment file format (`sealstream.file_crypto`, 64 KiB segments) encrypting and
  decrypting a stream on one core, which adds HKDF once per file, the nonce/AAD per segment and
  the copying of a streaming pipeline;
- the object store's raw put and get (`sealstream.adapters.object_store`, multipart, streamed),
  the same bytes straight to S3 with no crypto, in a bucket of its own that is removed at the end;
  and the first-byte latency of a 64 KiB range read from the middle of the object;
- the same bytes uploaded through the gateway and downloaded through the reader, and a 64 KiB
  range read from the middle of that file (`sealstream.bench.attachment_api_bench`), with the
  ratios to the raw store (issue 14's target: >= 0.8).

Returns the figures; prints nothing.
"""

from __future__ import annotations

import os
import statistics
import time
import uuid
from collections.abc import Callable, Iterator

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sealstream.adapters.object_store import ObjectStore
from sealstream.bench import attachment_api_bench
from sealstream.crypto import ChatKey
from sealstream.file_crypto import DEFAULT_SEGMENT_SIZE, FileContext, decrypt_file, encrypt_file
from sealstream.settings import Settings

MiB = 1024 * 1024
_WINDOWS = 5


def _best_rate(work: Callable[[], int], seconds: float) -> float:
    """Bytes per second of `work` (which returns the bytes it processed), best of five windows."""
    work()  # warm-up
    best = 0.0
    for _ in range(_WINDOWS):
        done, start = 0, time.perf_counter()
        deadline = start + seconds / _WINDOWS
        while (now := time.perf_counter()) < deadline or done == 0:
            done += work()
        best = max(best, done / (now - start))
    return best


def _stream(block: bytes, total: int) -> Iterator[bytes]:
    """`total` bytes as chunks of `block` (made once: no RNG cost inside the timed part)."""
    sent = 0
    while sent < total:
        piece = block[: total - sent]
        sent += len(piece)
        yield piece


def run(seconds: float = 2.0, object_mib: int = 100, api: bool = True) -> dict[str, float]:
    """Measure the figures above. `seconds` per crypto figure; `object_mib` MiB per transfer.

    Returns `aes_gcm_mb_s`, `file_encrypt_mb_s`, `file_decrypt_mb_s` (MB = 10^6 bytes, one
    thread), `store_range_first_byte_ms` (median of 20), `object_mib` echoed back, and with
    `api` (`attachment_api_bench.run`: rounds of raw put, upload, raw get, download side by side):
    `store_put_mb_s`, `upload_mb_s`, `upload_vs_store_put`, `store_get_mb_s`, `download_mb_s`,
    `download_vs_store_get` (medians of the rounds; `*_min`/`*_max` their spread) and
    `api_range_first_byte_ms`. Raises `ObjectStoreError` when the store does not answer.
    """
    block = os.urandom(DEFAULT_SEGMENT_SIZE)
    aead = AESGCM(os.urandom(32))
    nonce = os.urandom(12)

    def gcm() -> int:
        for _ in range(16):
            aead.encrypt(nonce, block, None)  # a benchmark only: nothing is kept or sent
        return 16 * len(block)

    key = ChatKey(1, os.urandom(32))
    ctx = FileContext(uuid.uuid4(), 1)
    chunk = os.urandom(MiB)
    sample_size = 16 * MiB
    sample = b"".join(encrypt_file(key, ctx, _stream(chunk, sample_size)))

    def encrypt() -> int:
        for _piece in encrypt_file(key, ctx, _stream(chunk, sample_size)):
            pass
        return sample_size

    def decrypt() -> int:
        for _piece in decrypt_file(key, ctx, _stream(sample, len(sample))):
            pass
        return sample_size

    figures = {
        "aes_gcm_mb_s": _best_rate(gcm, seconds) / 1e6,
        "file_encrypt_mb_s": _best_rate(encrypt, seconds) / 1e6,
        "file_decrypt_mb_s": _best_rate(decrypt, seconds) / 1e6,
    }
    figures.update(_store_range_figure(chunk, object_mib * MiB))
    figures["object_mib"] = float(object_mib)
    if api:
        figures.update(attachment_api_bench.run(chunk, object_mib * MiB))
    return figures


def _store_range_figure(chunk: bytes, size: int) -> dict[str, float]:
    """The first byte of a 64 KiB range read from the middle of a `size`-byte object, straight
    from the store (median of 20); the put and get rates are measured beside the APIs'."""
    base = Settings().object_store
    settings = base.model_copy(update={"bucket": f"sealstream-bench-{os.urandom(4).hex()}"})
    store = ObjectStore(settings)
    store.ensure_bucket()
    try:
        store.put("bench/object", _stream(chunk, size))
        first_bytes = []
        for _ in range(20):
            start = time.perf_counter()
            pieces = store.get("bench/object", size // 2, DEFAULT_SEGMENT_SIZE)
            next(pieces)
            first_bytes.append(time.perf_counter() - start)
            for _rest in pieces:
                pass
        return {"store_range_first_byte_ms": statistics.median(first_bytes) * 1000}
    finally:
        store.delete("bench/object")
        store.delete_empty_bucket()
        store.close()
