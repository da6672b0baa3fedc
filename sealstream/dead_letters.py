"""Dead letters for operators: list, show and replay the records the workers refused.

A dead letter (sealstream.streaming.DeadLetterWriter) is the refused record as it came (key,
value, its own headers) plus `dlq.*` headers saying which stage refused it, why, and where it was
read from. This module only ever describes a letter by its metadata: coordinates, time, stage,
reason, origin, record key when it is a chat id, value size and the names of the other headers.
A value is opaque (a sealed blob, or an old plaintext record): it is never returned, printed or
logged; `replay` hands it back to Kafka as it is. Every string shown is `printable` (no control
character of a producer's reaches a terminal).

Replay republishes key + value + the record's own headers (those not starting with `dlq.`) to
the message topic, plus `sealstream.replayed_from` = "partition:offset" of the letter. It is
idempotent twice over: a letter already replayed (recorded in Postgres, `DeadLetterReplays`) is
skipped unless forced, and a record replayed anyway (forced, or a crash between the broker's
acknowledgement and the record) does not make a second message: the encryptor writes a message
id once and the indexer indexes it at external version 1 (docs/operations.md, "Dead letters").
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Callable, Generator, Sequence
from contextlib import AbstractContextManager, closing
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Protocol

from sealstream.adapters.kafka import Delivery, Headers, RecordRefused, StoredLetter
from sealstream.adapters.postgres import ReplayDone, ReplayRow

DLQ_PREFIX = "dlq."
REPLAYED_FROM = "sealstream.replayed_from"
MAX_HEADER_NAME = 64  # header names are shown; a longer one is cut (a producer chose it)
MAX_HEADERS_SHOWN = 32  # names of the first 32 distinct headers at most (a producer chose them)
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

    def claim(
        self, dlq_topic: str, partition: int, offset: int
    ) -> AbstractContextManager[bool]: ...

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
    headers: tuple[str, ...]  # names of the record's own headers, the first MAX_HEADERS_SHOWN
    header_count: int  # how many own headers the record has (names shown: at most 32 of them)

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
        if self.chat_id is None:
            return (
                f"the record key is not a chat id ({self.key_bytes} bytes): the workers would "
                "refuse it again"
            )
        return None


def printable(text: str) -> str:
    """`text` with every character that is not printable (escape sequences, BEL, CR, bidi
    overrides) written as `\\xNN` / `\\uNNNN`: what a letter says goes to an operator's
    terminal, and header names are a producer's choice (an ESC could retitle the terminal,
    clear it or overwrite a line)."""
    if text.isprintable():
        return text
    return "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text
    )


def _text(value: bytes | None, limit: int = 1000) -> str:
    return printable((value or b"")[:limit].decode("utf-8", "replace"))


def _int(value: bytes | None) -> int | None:
    try:
        return int(_text(value, 32))
    except ValueError:
        return None


def _chat_id(key: bytes | None) -> str | None:
    """The key if it is a chat id as the workers take it (`str(chat_id)`: lower case, hyphens;
    another spelling is refused by them). Any other key is never shown: a direct producer may
    have put anything there, text included."""
    if not key or len(key) != 36:
        return None
    try:
        text = key.decode("ascii")
        return text if str(uuid.UUID(text)) == text else None
    except (UnicodeDecodeError, ValueError):
        return None


def split_headers(
    letter: StoredLetter,
) -> tuple[list[tuple[str, bytes | None]], dict[str, bytes | None]]:
    """The record's own headers (as it came, in order) and the letter's `dlq.*` headers.

    The writer appends its block after the record's own headers, starting with `dlq.stage`; a
    direct producer may name its own headers `dlq.*` too, so the block is what follows the
    *last* `dlq.stage` (no `dlq.stage`: the trailing `dlq.*` headers); other names there are
    the record's. A producer's `dlq.value`
    is thus never taken for the writer's (shown to the operator, or refusing the replay)."""
    headers = list(letter.headers)
    names = [k for k, _ in headers]
    if "dlq.stage" in names:
        start = len(names) - 1 - names[::-1].index("dlq.stage")
    else:
        start = len(names)
        while start > 0 and names[start - 1].startswith(DLQ_PREFIX):
            start -= 1
    block = {k: v for k, v in headers[start:] if k.startswith(DLQ_PREFIX)}
    later = [(k, v) for k, v in headers[start:] if not k.startswith(DLQ_PREFIX)]
    return headers[:start] + later, block


def describe(letter: StoredLetter) -> DeadLetterInfo:
    """The metadata of a letter (its value is measured, never kept)."""
    own_headers, dlq = split_headers(letter)
    names: dict[str, None] = {}
    for k, _ in own_headers:  # a producer chose how many: never more than a few names shown
        if len(names) == MAX_HEADERS_SHOWN:
            break
        names.setdefault(printable(k[:MAX_HEADER_NAME]))
    own = tuple(names)
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
        header_count=len(own_headers),
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
BEING_REPLAYED = "being_replayed"  # skipped: another replay (process) holds it now
REFUSED = "refused"  # cannot be replayed (no value, not from the message topic, key not a chat id, too large)
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
            for o in (REPLAYED, WOULD_REPLAY, ALREADY_REPLAYED, BEING_REPLAYED, REFUSED, NOT_FOUND)
            if self.count(o)
        }


def replay_headers(letter: StoredLetter) -> Headers:
    """The record's own headers (not `dlq.*`, not an earlier replay's mark), then the mark of
    this replay: the contract between the pipeline's parts (sealed records carry their key id
    in a `sealstream.*` header, which must travel with the value)."""
    own_headers, _ = split_headers(letter)
    own: Headers = [
        (k, v) for k, v in own_headers if not k.startswith(DLQ_PREFIX) and k != REPLAYED_FROM
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

    A letter already in the ledger is skipped unless `force`; one another replay (another
    process) is publishing now is skipped (`being_replayed`): each letter is claimed in the
    ledger while it is published and recorded; one without a value, not from
    the message topic, without a key, or that the message topic refuses for good (too large for
    it now) is refused, and the others go on; `dry_run` reads and checks, publishes
    nothing. Letters of the same record (both stages refused it: same origin, key, value and
    headers) publish it once: both stages read the message topic, and a record still refused
    would otherwise come back as twice as many letters at every replay; each letter is
    recorded. `progress` is called after each letter. Raises `StoreUnavailable` when Kafka or
    Postgres fails; the letters replayed before are recorded, so running it again goes on
    where it stopped.
    """
    report = ReplayReport()
    unique = list(dict.fromkeys(coordinates))
    done_before = ledger.replayed(source.topic, unique)
    sent: dict[bytes, ReplayResult] = {}  # record digest -> the result that published it
    for partition, offset in unique:
        result = _replay_one(
            source,
            sink,
            ledger,
            partition,
            offset,
            done_before.get((partition, offset)),
            sent,
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
    sent: dict[bytes, ReplayResult],
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
        return _already(partition, offset, before, info)
    digest = _record_digest(info, letter)
    twin = sent.get(digest)
    with_twin = "" if twin is None else f" with letter {twin.partition}:{twin.offset} (same record)"
    if dry_run:
        result = ReplayResult(
            partition, offset, WOULD_REPLAY, f"would go to {messages_topic}{with_twin}", info
        )
        sent.setdefault(digest, result)
        return result
    # Claimed in Postgres while it is published and recorded: another process replaying it
    # now skips it (the claim ends with this block, or with this process).
    with ledger.claim(source.topic, partition, offset) as held:
        if not held:
            return ReplayResult(
                partition,
                offset,
                BEING_REPLAYED,
                "another replay is publishing it now (see `dlq show` when it is done)",
                info,
            )
        # Read again under the claim: another replay may have recorded it since we began.
        now = ledger.replayed(source.topic, [(partition, offset)]).get((partition, offset))
        if now is not None and not force:
            return _already(partition, offset, now, info)
        if twin is not None and twin.replayed_to is not None:
            delivery = Delivery(messages_topic, *twin.replayed_to)
        else:
            try:
                [delivery] = sink.publish(
                    messages_topic,
                    [(letter.key or b"", letter.value)],
                    headers=replay_headers(letter),
                )
            except RecordRefused as exc:  # this record only (too large for the topic now)
                why = (
                    f"the message topic refused the record for good ({exc.code}): check its limits"
                )
                return ReplayResult(partition, offset, REFUSED, f"cannot be replayed: {why}", info)
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
    result = ReplayResult(
        partition,
        offset,
        REPLAYED,
        f"to {delivery.topic}/{delivery.partition}:{delivery.offset} (replay {times}){with_twin}",
        info,
        (delivery.partition, delivery.offset),
    )
    sent.setdefault(digest, result)
    return result


def _already(partition: int, offset: int, row: ReplayRow, info: DeadLetterInfo) -> ReplayResult:
    return ReplayResult(
        partition,
        offset,
        ALREADY_REPLAYED,
        f"replayed {row.replays}x already, last by {row.last_replayed_by} at "
        f"{row.last_replayed_at.isoformat(timespec='seconds')} (--force to replay again)",
        info,
    )


def _record_digest(info: DeadLetterInfo, letter: StoredLetter) -> bytes:
    """What makes two letters the same record: origin, key, value and own headers (a digest:
    up to 1,000 values are not kept in memory)."""
    h = hashlib.sha256()
    origin = f"{info.origin_topic}/{info.origin_partition}:{info.origin_offset}"
    for part in (origin.encode(), letter.key or b"", letter.value or b""):
        h.update(len(part).to_bytes(8, "big") + part)
    for name, value in replay_headers(letter)[:-1]:  # the replay mark names the letter
        raw = value.encode() if isinstance(value, str) else value or b""
        h.update(len(name).to_bytes(8, "big") + name.encode() + len(raw).to_bytes(8, "big") + raw)
    return h.digest()


# --- times given by operators ----------------------------------------------------------------

_RELATIVE = re.compile(r"^(\d+)\s*([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_when(text: str, now: datetime | None = None) -> datetime:
    """An ISO 8601 time (no zone: UTC) or a duration ago ("90s", "15m", "2h", "7d") as an
    aware UTC datetime. Raises `ValueError` naming the accepted forms (or the range, for a
    duration reaching before year 1)."""
    now = now or datetime.now(UTC)
    relative = _RELATIVE.match(text.strip())
    if relative:
        amount, unit = relative.groups()
        try:
            return now - timedelta(**{_UNITS[unit]: int(amount)})
        except OverflowError:
            raise ValueError(
                f"{text[:40]!r} ago is before year 1 (give a shorter duration)"
            ) from None
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"not a time: {text[:40]!r} (give ISO 8601, e.g. 2026-12-01T13:00:00Z, "
            "or a duration ago: 90s, 15m, 2h, 7d)"
        ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


_COORDINATES = re.compile(r"^([0-9]{1,10}):([0-9]{1,19})$")  # ASCII digits: int() takes others


def parse_coordinates(text: str) -> tuple[int, int]:
    """ "partition:offset" as two ints; raises `ValueError` naming the expected form."""
    match = _COORDINATES.match(text)
    if match is None:
        raise ValueError(f"not dead-letter coordinates: {text[:40]!r} (give partition:offset)")
    return int(match[1]), int(match[2])


# --- filters given by operators (the CLI; the admin API checks the same rules) ---------------

STAGES = ("encryptor", "indexer")
TOPIC_PATTERN = r"^[A-Za-z0-9._-]{1,249}$"  # Kafka's rule for topic names
MAX_REASON_FILTER = 200


def operator_filter(
    *,
    reason: str | None = None,
    stage: str | None = None,
    since: str | None = None,
    until: str | None = None,
    topic: str | None = None,
    chat: str | None = None,
    now: datetime | None = None,
) -> LetterFilter:
    """A `LetterFilter` of options as typed: the admin API's rules (a stage of `STAGES`, a
    chat id that is a UUID, in any case, a reason of 1..200 characters, a Kafka topic name,
    times as `parse_when`). Raises `ValueError` starting with the option's name (`--stage: ...`):
    a filter that can match nothing, or everything, is a typo, never a silent empty list or a
    replay of every letter."""

    def fail(option: str, why: str) -> ValueError:
        return ValueError(f"{option}: {why}")

    if reason is not None and not 1 <= len(reason) <= MAX_REASON_FILTER:
        raise fail("--reason", f"give 1 to {MAX_REASON_FILTER} characters (--all: every letter)")
    if stage is not None and stage not in STAGES:
        raise fail("--stage", f"{stage[:40]!r} is not a stage (give {' or '.join(STAGES)})")
    if topic is not None and not re.match(TOPIC_PATTERN, topic):
        raise fail("--topic", f"{topic[:40]!r} is not a Kafka topic name ({TOPIC_PATTERN})")
    chat_id = None
    if chat is not None:
        try:
            chat_id = str(uuid.UUID(chat.strip()))
        except ValueError:
            raise fail("--chat", f"{chat[:40]!r} is not a chat id (a UUID)") from None
    times: dict[str, datetime | None] = {}
    for option, raw in (("--since", since), ("--until", until)):
        try:
            times[option] = None if raw is None else parse_when(raw, now)
        except ValueError as err:
            raise fail(option, str(err)) from None
    return LetterFilter(
        reason=reason,
        stage=stage,
        since=times["--since"],
        until=times["--until"],
        origin_topic=topic,
        chat_id=chat_id,
    )


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
