"""JSON logs for every process. Log records carry ids and counts, never message text, keys or
bearer tokens (anything token-like is redacted from every line, whichever logger wrote it)."""

from __future__ import annotations

import json
import logging
import re
import sys
import time

_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}
REDACTED = "[redacted]"
# What a bearer token can look like in a log line: a JWT (three base64url parts, the first a
# JSON header, so it starts with "eyJ"), the value of a `token=` / `access_token=` parameter
# (uvicorn's WebSocket handshake line logs the full URL), an `Authorization: Bearer ...` value,
# and the `bearer, <token>` WebSocket subprotocol header. A value stops before a backslash: the
# pattern runs on the JSON line, where a backslash starts an escape that must stay whole.
_TOKEN_LIKE = re.compile(
    r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"
    r"|(?i:(?<=token=))[^&\s\"',;\\]+"
    r"|(?i:(?<=bearer )|(?<=bearer, )|(?<=bearer%2c%20)|(?<=bearer,))[^\s\"',;\\]+"
)


def redact(text: str) -> str:
    """`text` with everything token-like replaced by "[redacted]" (idempotent)."""
    return _TOKEN_LIKE.sub(REDACTED, text)


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value if isinstance(value, int | float | bool | None) else str(value)
        if record.exc_info and record.exc_info[0] is not None:
            # Type only: exception messages from libraries could contain data we do not control.
            entry["exc_type"] = record.exc_info[0].__name__
        # Last step, on the whole line: a token must not get through in the message, its
        # arguments or any extra field, from our code or a library's (uvicorn, httpx, faust).
        return redact(json.dumps(entry))


def configure_logging(service: str, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("cassandra", "opensearch", "kafka", "aiokafka", "faust", "mode", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
