"""Dead letters for operators: list, show and replay the records the workers refused.

A dead letter (sealstream.streaming.DeadLetterWriter) is the refused record as it came (key,
value, its own headers) plus `dlq.*` headers saying which stage refused it, why, and where it was
read from. This module only ever describes a letter by its metadata: coordinates, time, stage,
reason, origin, record key when it is a chat id, value size and the names of the other headers.
A value is opaque (a sealed blob, or an old plaintext record): it is never returned, printed or
logged; `replay` hands it back to Kafka as it is.

Replay republishes key + value + the record's own headers (those not starting with `dlq.`) to
the message topic, plus `sealstream.replayed_from` = "partition:offset" of the letter. It is
idempotent twice over: a letter already replayed (recorded in Postgres, `DeadLetterReplays`) is
skipped unless forced, and a record replayed anyway (forced, or a crash between the broker's
acknowledgement and the record) does not make a second message: the encryptor writes a message
id once and the indexer indexes it at external version 1 (docs/operations.md, "Dead letters").
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Generator, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Protocol

from sealstream.adapters.kafka import Delivery, Headers, StoredLetter
from sealstream.adapters.postgres import ReplayDone, ReplayRow

DLQ_PREFIX = "dlq."
REPLAYED_FROM = "sealstream.replayed_from"
MAX_HEADER_NAME = 64  # header names are shown; a longer one is cut (a producer chose it)
MAX_LIST = 1000  # letters per list or replay call at most (the admin API's limit too)


class LetterSource(Protocol):
    """The dead-letter topic (sealstream.adapters.kafka.DeadLetterReader)."""

    topic: str

    def scan(self, since_ms: int | None = None) -> Generator[StoredLetter, None, None]: ...

    def read(self, partition: int, offset: int) -> StoredLetter | None: ...


class RecordSink(Protocol):
    """An acks=all publisher (sealstream.adapters.kafka.Publisher)."""

    def publish(
        self,
        topic: str,
        items: Sequence[tuple[bytes, bytes | None]],
        headers: Headers | None = None,
        timeout: float = 30.0,
    ) -> list[Delivery]: ...


class ReplayLedger(Protocol):
    """Which letters were replayed (sealstream.adapters.postgres.DeadLetterReplays)."""

    def replayed(
        self, dlq_topic: str, coordinates: Sequence[tuple[int, int]]
    ) -> dict[tuple[int, int], ReplayRow]: ...

    def record(self, done: ReplayDone, actor: str) -> int: ...


@dataclass(frozen=True)
class DeadLetterInfo:
    """What an operator may see of a dead letter: everything but its value."""

    partition: int  # in the dead-letter topic
    offset: int
    at: datetime  # when it was dead-lettered (UTC)
    stage: str  # "encryptor" | "indexer"
    reason: str  # names the field and rule, never the text
    origin_topic: str  # where the record was read from (`dlq.topic`)
    origin_partition: int | None
    origin_offset: int | None
    chat_id: str | None  # the record key when it is a chat id (UUID); else None
    key_bytes: int  # size of the record key (0: none)
    value_bytes: int | None  # size of the value; None: the letter carries none
    value_omitted: str | None  # the `dlq.value` header: why the value was left out
    headers: tuple[str, ...]  # names of the record's own headers (not `dlq.*`)

    @property
    def coordinates(self) -> tuple[int, int]:
        return (self.partition, self.offset)

    def unreplayable(self, messages_topic: str) -> str | None:
        """Why this letter cannot be replayed into `messages_topic`; None if it can."""
        if self.value_omitted is not None or self.value_bytes is None:
            return (
                f"the letter has no value ({self.value_omitted or 'none'}); the original record "
                f"was at {self.origin_topic}/{self.origin_partition}:{self.origin_offset} "
                "until that topic's retention ended: publish it again from its source"
            )
        if self.origin_topic != messages_topic:
            # A letter names its own destination; only the message topic is ever a target,
            # so a forged letter cannot make an operator write into another topic.
            return f"its origin topic {self.origin_topic!r} is not the message topic"
        if self.key_bytes == 0:
            return "the record has no key (chat id): the workers would refuse it again"
        return None


def _text(value: bytes | None, limit: int = 1000) -> str:
    return (value or b"")[:limit].decode("utf-8", "replace")


def _int(value: bytes | None) -> int | None:
    try:
        return int(_text(value, 32))
    except ValueError:
        return None


def _chat_id(key: bytes | None) -> str | None:
    """The key if it is a chat id. Any other key is never shown: a direct producer may have put
    anything there, text included."""
    if not key or len(key) > 64:
        return None
    try:
        return str(uuid.UUID(key.decode("ascii")))
    except (UnicodeDecodeError, ValueError):
        return None


def describe(letter: StoredLetter) -> DeadLetterInfo:
    """The metadata of a letter (its value is measured, never kept)."""
    dlq = {k: v for k, v in letter.headers if k.startswith(DLQ_PREFIX)}
    own = tuple(
        dict.fromkeys(
            k[:MAX_HEADER_NAME] for k, _ in letter.headers if not k.startswith(DLQ_PREFIX)
        )
    )
    omitted = dlq.get("dlq.value")
    return DeadLetterInfo(
        partition=letter.partition,
        offset=letter.offset,
        at=datetime.fromtimestamp(letter.timestamp_ms / 1000, UTC),
        stage=_text(dlq.get("dlq.stage"), 64),
        reason=_text(dlq.get("dlq.reason")),
        origin_topic=_text(dlq.get("dlq.topic"), 255),
        origin_partition=_int(dlq.get("dlq.partition")),
        origin_offset=_int(dlq.get("dlq.offset")),
        chat_id=_chat_id(letter.key),
        key_bytes=len(letter.key or b""),
        value_bytes=None if letter.value is None else len(letter.value),
        value_omitted=None if omitted is None else _text(omitted, 200),
        headers=own,
    )


@dataclass(frozen=True)
class LetterFilter:
    """Which letters to list or replay; every condition given must hold."""

    reason: str | None = None  # substring of the reason, case-insensitive
    stage: str | None = None  # exact: encryptor | indexer
    since: datetime | None = None  # dead-lettered at or after
    until: datetime | None = None  # dead-lettered before
    origin_topic: str | None = None  # exact
    chat_id: str | None = None  # exact (a UUID)

    def matches(self, info: DeadLetterInfo) -> bool:
        return (
            (self.reason is None or self.reason.casefold() in info.reason.casefold())
            and (self.stage is None or info.stage == self.stage)
            and (self.since is None or info.at >= self.since)
            and (self.until is None or info.at < self.until)
            and (self.origin_topic is None or info.origin_topic == self.origin_topic)
            and (self.chat_id is None or info.chat_id == self.chat_id)
        )


@dataclass(frozen=True)
class LetterPage:
    letters: list[DeadLetterInfo]
    truncated: bool  # more letters matched than `limit`: narrow the filter (e.g. --since)


def list_letters(source: LetterSource, where: LetterFilter, limit: int = 100) -> LetterPage:
    """The first `limit` letters matching `where`, oldest first (per partition, in offset
    order), from `where.since` (found by time, not read) to the end of the topic now."""
    # Not below 0: Kafka reads negative times as "latest" (-1) and "earliest" (-2).
    since_ms = None if where.since is None else max(0, int(where.since.timestamp() * 1000))
    found: list[DeadLetterInfo] = []
    # Closed as soon as the page is full: the reader's assignment ends before its next use.
    with closing(source.scan(since_ms)) as letters:
        for letter in letters:
            info = describe(letter)
            if where.matches(info):
                if len(found) == limit:
                    return LetterPage(found, truncated=True)
                found.append(info)
    return LetterPage(found, truncated=False)


def show(source: LetterSource, partition: int, offset: int) -> DeadLetterInfo | None:
    """One letter's metadata by its coordinates in the dead-letter topic; None if none there."""
    letter = source.read(partition, offset)
    return None if letter is None else describe(letter)


# --- replay ----------------------------------------------------------------------------------

REPLAYED = "replayed"
WOULD_REPLAY = "would_replay"  # --dry-run
ALREADY_REPLAYED = "already_replayed"  # skipped: replayed before, not forced
REFUSED = "refused"  # cannot be replayed (no value, not from the message topic, no key)
NOT_FOUND = "not_found"  # no letter at these coordinates (never written, or expired)


@dataclass(frozen=True)
class ReplayResult:
    partition: int
    offset: int
    outcome: str  # one of the constants above
    detail: str  # why, in a sentence (never a value)
    letter: DeadLetterInfo | None = None
    replayed_to: tuple[int, int] | None = None  # (partition, offset) in the message topic


@dataclass
class ReplayReport:
    results: list[ReplayResult] = field(default_factory=list)

    def count(self, outcome: str) -> int:
        return sum(1 for r in self.results if r.outcome == outcome)

    def counts(self) -> dict[str, int]:
        return {
            o: self.count(o)
            for o in (REPLAYED, WOULD_REPLAY, ALREADY_REPLAYED, REFUSED, NOT_FOUND)
            if self.count(o)
        }


def replay_headers(letter: StoredLetter) -> Headers:
    """The record's own headers (not `dlq.*`, not an earlier replay's mark), then the mark of
    this replay: the contract between the pipeline's parts (sealed records carry their key id
    in a `sealstream.*` header, which must travel with the value)."""
    own: Headers = [
        (k, v) for k, v in letter.headers if not k.startswith(DLQ_PREFIX) and k != REPLAYED_FROM
    ]
    return [*own, (REPLAYED_FROM, f"{letter.partition}:{letter.offset}".encode())]


def select(
    source: LetterSource, where: LetterFilter, limit: int = MAX_LIST
) -> list[tuple[int, int]]:
    """The coordinates of the letters `where` selects (see `list_letters`); raises
    `ValueError` if more than `limit` match, so a replay is never silently cut short."""
    page = list_letters(source, where, limit)
    if page.truncated:
        raise ValueError(
            f"more than {limit} dead letters match: narrow the selection (--since, --reason...)"
        )
    return [info.coordinates for info in page.letters]


def replay(
    source: LetterSource,
    sink: RecordSink,
    ledger: ReplayLedger,
    coordinates: Sequence[tuple[int, int]],
    *,
    messages_topic: str,
    actor: str,
    force: bool = False,
    dry_run: bool = False,
    progress: Callable[[ReplayResult], None] = lambda result: None,
) -> ReplayReport:
    """Replay the letters at `coordinates` (partition, offset) of the dead-letter topic into
    `messages_topic`, one at a time, each acknowledged by every in-sync replica (acks=all)
    before it is recorded in `ledger` as replayed by `actor` (audited).

    A letter already in the ledger is skipped unless `force`; one without a value, not from
    the message topic, or without a key is refused; `dry_run` reads and checks, publishes
    nothing. `progress` is called after each letter. Raises `StoreUnavailable` when Kafka or
    Postgres fails; the letters replayed before are recorded, so running it again goes on
    where it stopped.
    """
    report = ReplayReport()
    unique = list(dict.fromkeys(coordinates))
    done_before = ledger.replayed(source.topic, unique)
    for partition, offset in unique:
        result = _replay_one(
            source,
            sink,
            ledger,
            partition,
            offset,
            done_before.get((partition, offset)),
            messages_topic=messages_topic,
            actor=actor,
            force=force,
            dry_run=dry_run,
        )
        report.results.append(result)
        progress(result)
    return report


def _replay_one(
    source: LetterSource,
    sink: RecordSink,
    ledger: ReplayLedger,
    partition: int,
    offset: int,
    before: ReplayRow | None,
    *,
    messages_topic: str,
    actor: str,
    force: bool,
    dry_run: bool,
) -> ReplayResult:
    letter = source.read(partition, offset)
    if letter is None:
        return ReplayResult(
            partition, offset, NOT_FOUND, "no dead letter there (never written, or expired)"
        )
    info = describe(letter)
    if (why := info.unreplayable(messages_topic)) is not None:
        return ReplayResult(partition, offset, REFUSED, f"cannot be replayed: {why}", info)
    if before is not None and not force:
        return ReplayResult(
            partition,
            offset,
            ALREADY_REPLAYED,
            f"replayed {before.replays}x already, last by {before.last_replayed_by} at "
            f"{before.last_replayed_at.isoformat(timespec='seconds')} (--force to replay again)",
            info,
        )
    if dry_run:
        return ReplayResult(partition, offset, WOULD_REPLAY, f"would go to {messages_topic}", info)
    [delivery] = sink.publish(
        messages_topic, [(letter.key or b"", letter.value)], headers=replay_headers(letter)
    )
    times = ledger.record(
        ReplayDone(
            dlq_topic=source.topic,
            dlq_partition=partition,
            dlq_offset=offset,
            origin_topic=info.origin_topic,
            origin_partition=info.origin_partition if info.origin_partition is not None else -1,
            origin_offset=info.origin_offset if info.origin_offset is not None else -1,
            replayed_partition=delivery.partition,
            replayed_offset=delivery.offset,
            chat_id=uuid.UUID(info.chat_id) if info.chat_id else None,
        ),
        actor,
    )
    return ReplayResult(
        partition,
        offset,
        REPLAYED,
        f"to {delivery.topic}/{delivery.partition}:{delivery.offset} (replay {times})",
        info,
        (delivery.partition, delivery.offset),
    )


# --- times given by operators ----------------------------------------------------------------

_RELATIVE = re.compile(r"^(\d+)\s*([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_when(text: str, now: datetime | None = None) -> datetime:
    """An ISO 8601 time (no zone: UTC) or a duration ago ("90s", "15m", "2h", "7d") as an
    aware UTC datetime. Raises `ValueError` naming the accepted forms."""
    now = now or datetime.now(UTC)
    relative = _RELATIVE.match(text.strip())
    if relative:
        amount, unit = relative.groups()
        return now - timedelta(**{_UNITS[unit]: int(amount)})
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"not a time: {text[:40]!r} (give ISO 8601, e.g. 2026-12-01T13:00:00Z, "
            "or a duration ago: 90s, 15m, 2h, 7d)"
        ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def parse_coordinates(text: str) -> tuple[int, int]:
    """ "partition:offset" as two ints; raises `ValueError` naming the expected form."""
    partition, sep, offset = text.partition(":")
    if not sep or not partition.isdigit() or not offset.isdigit():
        raise ValueError(f"not dead-letter coordinates: {text[:40]!r} (give partition:offset)")
    return int(partition), int(offset)


def as_json(info: DeadLetterInfo, replayed: ReplayRow | None = None) -> dict[str, object]:
    """A letter's metadata as JSON (the CLI's `--json` and the admin API answer the same)."""
    body: dict[str, object] = {
        **{k: v for k, v in info.__dict__.items() if k != "at"},
        "at": info.at.isoformat(),
        "headers": list(info.headers),
        "replayed": None,
    }
    if replayed is not None:
        body["replayed"] = {
            "times": replayed.replays,
            "last_at": replayed.last_replayed_at.isoformat(),
            "last_by": replayed.last_replayed_by,
            "to_partition": replayed.replayed_partition,
            "to_offset": replayed.replayed_offset,
        }
    return body
