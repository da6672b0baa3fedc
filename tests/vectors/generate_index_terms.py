"""Generate tests/vectors/index_term_v1.json, the test vectors of blind-index tokens.

Keys come from SHA-256 over a label (fixed), so re-running this reproduces the file byte for
byte. Tokens are made by ``sealstream.crypto.keyed_term``; ``tests/unit/test_blind_index.py``
re-derives each with the standard library's HMAC from the text of docs/format.md ("Blind index
tokens").

Usage (from the repository root)::

    python tests/vectors/generate_index_terms.py           # rewrite index_term_v1.json
    python tests/vectors/generate_index_terms.py --check   # exit 1 if the file differs
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

if __name__ == "__main__":  # allow running it from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sealstream.crypto import IndexKey, keyed_term

OUT = Path(__file__).with_name("index_term_v1.json")

KEY_A = hashlib.sha256(b"sealstream index term vector key A").digest()
KEY_B = hashlib.sha256(b"sealstream index term vector key B").digest()

CASES = [
    ("ascii", "a plain ASCII word", KEY_A, "acme", 1, "quokka"),
    ("folded", "an accent-folded term (what `folded` holds)", KEY_A, "acme", 1, "cafe"),
    ("accented", "the NFC form of café: another token than `cafe`", KEY_A, "acme", 1, "café"),
    ("cjk", "a CJK word (UTF-8, 6 bytes)", KEY_A, "acme", 1, "東京"),
    ("thai", "a Thai word", KEY_A, "acme", 1, "ภาษา"),
    ("emoji", "an emoji (4 UTF-8 bytes)", KEY_A, "acme", 1, "🦘"),
    ("empty", "the empty term (never indexed, still defined)", KEY_A, "acme", 1, ""),
    ("version", "same key bytes and term, key version 2", KEY_A, "acme", 2, "quokka"),
    ("tenant", "same key bytes and term, another tenant", KEY_A, "acme-2", 1, "quokka"),
    ("key", "another key, same tenant, version and term", KEY_B, "acme", 1, "quokka"),
    ("max-version", "the largest key version", KEY_B, "t", 2**31 - 1, "x"),
]


def build() -> dict[str, object]:
    return {
        "format": "sealstream blind-index token v1 (docs/format.md, 'Blind index tokens')",
        "vectors": [
            {
                "name": name,
                "description": description,
                "key_hex": key.hex(),
                "tenant_id": tenant,
                "key_version": version,
                "term": term,
                "token": keyed_term(IndexKey(tenant, version, key), term),
            }
            for name, description, key, tenant, version, term in CASES
        ],
    }


def main() -> int:
    text = json.dumps(build(), indent=2, ensure_ascii=False) + "\n"
    if "--check" in sys.argv:
        return 0 if OUT.read_text(encoding="utf-8") == text else 1
    OUT.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
