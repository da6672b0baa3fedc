"""Single-core throughput of :func:`sealstream.crypto.seal` and :func:`open_envelope`.

Run ``python -m sealstream.bench.crypto_bench [seconds] [size]``. :func:`run` measures one thread
with a warm key (the ``ChatKey`` and ``MessageContext`` are built once, as a consumer holding an
unwrapped DEK would), and returns the figures without printing anything.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import Callable

from sealstream.crypto import ChatKey, MessageContext, open_envelope, seal

_BATCH = 1000  # operations between clock reads, so timing overhead stays negligible
_WINDOWS = 5  # the run is split into windows; the best one filters out other processes' noise


def _rates(op: Callable[[], object], seconds: float) -> tuple[float, float]:
    """Run ``op`` in batches for about ``seconds``; return (best-window rate, overall rate)."""
    for _ in range(_BATCH):  # warm-up: caches, allocator, branch predictors
        op()
    window = seconds / _WINDOWS
    best, total_ops, total_time = 0.0, 0, 0.0
    for _ in range(_WINDOWS):
        done = 0
        start = time.perf_counter()
        deadline = start + window
        while True:
            for _ in range(_BATCH):
                op()
            done += _BATCH
            now = time.perf_counter()
            if now >= deadline:
                break
        best = max(best, done / (now - start))
        total_ops += done
        total_time += now - start
    return best, total_ops / total_time


def run(seconds: float = 2.0, size: int = 200) -> dict[str, float]:
    """Measure seal/s and open/s for ``size``-byte messages, ``seconds`` each, on one thread.

    Returns ``seal_per_s`` / ``open_per_s`` (best of five equal windows, as ``timeit`` reports the
    best run, so a busy machine understates less), ``seal_avg_per_s`` / ``open_avg_per_s`` (over
    the whole run), ``seal_us`` / ``open_us`` (microseconds per call at the best rate), and
    ``size`` and ``seconds`` echoed back.
    """
    if seconds <= 0:
        raise ValueError("seconds must be positive")
    key = ChatKey(version=1, material=os.urandom(32))
    context = MessageContext(
        chat_id=uuid.uuid4(),
        message_id=(1 << 62) + 12345,
        sender_id="user-000123",
        revision=1,
        created_at_ms=1_767_225_600_123,
    )
    plaintext = os.urandom(size)
    envelope = seal(plaintext, key, context)
    if open_envelope(envelope, key, context) != plaintext:
        raise RuntimeError("round trip failed")

    seal_best, seal_avg = _rates(lambda: seal(plaintext, key, context), seconds)
    open_best, open_avg = _rates(lambda: open_envelope(envelope, key, context), seconds)
    return {
        "size": float(size),
        "seconds": float(seconds),
        "seal_per_s": seal_best,
        "open_per_s": open_best,
        "seal_avg_per_s": seal_avg,
        "open_avg_per_s": open_avg,
        "seal_us": 1e6 / seal_best,
        "open_us": 1e6 / open_best,
    }


def main(argv: list[str]) -> None:
    seconds = float(argv[0]) if argv else 2.0
    size = int(argv[1]) if len(argv) > 1 else 200
    r = run(seconds=seconds, size=size)
    print(f"message size: {size} bytes, {seconds:g} s per operation, one thread")
    for op in ("seal", "open"):
        print(
            f"{op}: {r[op + '_per_s']:>10,.0f} /s best window ({r[op + '_us']:.2f} µs each), "
            f"{r[op + '_avg_per_s']:,.0f} /s over the whole run"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
