"""Generate tests/vectors/file_v1.json, the test vectors of attachment file format v1.

Every input is fixed: the DEK, salts and nonce prefixes come from SHA-256 in counter mode over a
label (``_det``), so re-running this script reproduces the file byte for byte. The files are made
by ``sealstream.file_crypto._encrypt_with`` with 64-byte segments (the smallest the format allows,
so that several segments stay short in hex); ``tests/unit/test_file_crypto.py`` re-derives every
vector with an independent reading of docs/format.md ("Attachment files": stdlib HMAC for HKDF,
cryptography's AESGCM), so a bug in the module cannot make the file self-consistent nonsense.

Usage (from the repository root)::

    python tests/vectors/generate_file_v1.py           # rewrite file_v1.json
    python tests/vectors/generate_file_v1.py --check   # exit 1 if the file is not what this writes
"""

from __future__ import annotations

import hashlib
import json
import sys
import uuid
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # allow `python tests/vectors/generate_file_v1.py` from the root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sealstream import file_crypto
from sealstream.crypto import ChatKey
from sealstream.file_crypto import FileContext

OUT = Path(__file__).with_name("file_v1.json")
CHAT = uuid.UUID("0f8e6b2a-3c1d-4e5f-8a7b-9c0d1e2f3a4b")
FILE_ID = 7_412_345_678_901_234_567  # a Snowflake-style id
DEK_VERSION = 7
SEGMENT_SIZE = 64


def _det(label: str, n: int) -> bytes:
    """``n`` deterministic pseudo-random bytes: SHA-256(label || counter) blocks, counter 4 BE."""
    out = bytearray()
    counter = 0
    while len(out) < n:
        out += hashlib.sha256(label.encode() + counter.to_bytes(4, "big")).digest()
        counter += 1
    return bytes(out[:n])


CASES = [
    ("empty", "0 bytes: one empty last segment (just its tag)", 0),
    ("one-byte", "1 byte: one last segment of 1 byte", 1),
    ("one-segment", "exactly one segment (64 bytes), which is the last", SEGMENT_SIZE),
    ("one-segment-plus-one", "65 bytes: a full segment, then a last segment of 1 byte", 65),
    ("several-segments", "200 bytes: three full segments and a last one of 8 bytes", 200),
    ("several-full-segments", "192 bytes: three full segments, the third is the last", 192),
]


def _vector(name: str, description: str, size: int) -> dict[str, Any]:
    dek = _det("sealstream/file-vectors/dek", 32)
    salt = _det(f"sealstream/file-vectors/{name}/salt", 32)
    prefix = _det(f"sealstream/file-vectors/{name}/nonce-prefix", 7)
    plaintext = _det(f"sealstream/file-vectors/{name}/plaintext", size)
    key = ChatKey(DEK_VERSION, dek)
    ctx = FileContext(CHAT, FILE_ID)
    pieces = list(file_crypto._encrypt_with(key, ctx, [plaintext], SEGMENT_SIZE, salt, prefix))
    context = file_crypto._context(key, ctx, SEGMENT_SIZE)
    file_key, commitment = file_crypto._derive(key, salt, context)
    segments = []
    for index, ciphertext in enumerate(pieces[1:]):
        last = index == len(pieces) - 2
        suffix = index.to_bytes(4, "big") + bytes([1 if last else 0])
        segments.append(
            {
                "index": index,
                "last": last,
                "nonce": (prefix + suffix).hex(),
                "aad": (b"sealstream/file-aad/v1" + b"\x01" + context + suffix).hex(),
                "plaintext": plaintext[index * SEGMENT_SIZE : (index + 1) * SEGMENT_SIZE].hex(),
                "ciphertext": ciphertext.hex(),
            }
        )
    return {
        "name": name,
        "description": description,
        "dek": dek.hex(),
        "dek_version": DEK_VERSION,
        "chat_id": str(CHAT),
        "file_id": str(FILE_ID),
        "segment_size": SEGMENT_SIZE,
        "salt": salt.hex(),
        "nonce_prefix": prefix.hex(),
        "plaintext": plaintext.hex(),
        "info": (b"sealstream/file/v1" + context).hex(),
        "file_key": file_key.hex(),
        "commitment": commitment.hex(),
        "header": pieces[0].hex(),
        "segments": segments,
        "file": b"".join(pieces).hex(),
    }


def build() -> dict[str, Any]:
    return {
        "format": "sealstream attachment file v1",
        "spec": "docs/format.md, section 'Attachment files'",
        "generator": "tests/vectors/generate_file_v1.py",
        "notes": (
            "All byte strings are lower-case hex; file_id is a decimal string (unsigned 64-bit)."
            " info, file_key, commitment, header and each segment's nonce, aad and ciphertext are"
            " intermediate values for implementers; 'file' is the whole stored object."
        ),
        "vectors": [_vector(*case) for case in CASES],
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not OUT.exists() or OUT.read_text(encoding="utf-8") != text:
            print(f"{OUT} is out of date; run {Path(__file__).name}", file=sys.stderr)
            return 1
        print(f"{OUT} is up to date")
        return 0
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT} ({len(CASES)} vectors)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
