"""What text may cross the edge into Postgres, logs and Kafka keys: the one rule for ids, claims
and reasons, as a predicate and as pydantic types that put it in the OpenAPI description.

Postgres `text` cannot hold NUL, and a lone surrogate (valid in JSON's `\\ud800`, not in UTF-8)
cannot be encoded at all: either used to reach the database and fail there, after the key
change it was meant to describe. Checked at the edge, the client gets a 422 naming the field.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, Field

MAX_REASON = 500
# No C0/C1 control character (NUL included), and at least one visible character.
_VISIBLE = r"[^\s\x00-\x1f\x7f-\x9f]"
_ID_CHAR = r"[^\x00-\x1f\x7f-\x9f]"
ID_PATTERN = rf"^{_ID_CHAR}*{_VISIBLE}{_ID_CHAR}*$"
# Free text (a reason): anything but NUL.
TEXT_PATTERN = r"^[^\x00]*$"


def is_utf8(value: str) -> bool:
    """False for a string with a lone surrogate (it has no UTF-8 form)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def storable_text(value: str) -> bool:
    """True when `value` is valid UTF-8 without control characters (NUL included): what an id
    or claim must be to reach Postgres, logs and Kafka keys intact."""
    return is_utf8(value) and not any(ord(c) < 32 or 127 <= ord(c) < 160 for c in value)


def _utf8(value: str) -> str:
    if not is_utf8(value):
        raise ValueError("must be valid UTF-8 (no lone surrogates)")
    return value


Utf8 = AfterValidator(_utf8)
StorableId = Annotated[str, Field(min_length=1, max_length=128, pattern=ID_PATTERN), Utf8]
Reason = Annotated[str, Field(min_length=1, max_length=MAX_REASON, pattern=TEXT_PATTERN), Utf8]
