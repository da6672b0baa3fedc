"""The producer library: post chat messages straight to the sealed Kafka message topic.

For services that publish to Kafka themselves instead of calling the gateway (importers, bots,
bridges). A `MessageProducer` does what the gateway does before it answers `202`:

1. validates each message against the record schema (`schemas.events.MessageRecord`) and raises
   `InvalidProducerMessage` naming the field and rule (never the value) before anything is sent;
2. takes its message ids (and an edit's or deletion's event id) from a worker id leased from
   Postgres (`sealstream.worker_ids`), the same mechanism as the gateways, so no two processes
   ever make the same id;
3. seals each value (`sealstream.record_seal.RecordSealer`: the value is an AEAD blob bound to
   topic, chat id and event id, the topic key id travels in a header);
4. publishes with acks=all and idempotence (`sealstream.adapters.kafka.Publisher`) and returns
   only once the broker acknowledged every record, with the ids assigned.

Retrying without duplicates: a failure after the ids were assigned raises `NotAcknowledged`
carrying the prepared records. The records may or may not be on the topic (a timeout is an
unknown outcome: librdkafka may still deliver them); publish *the same records* again
(`producer.publish(error.records)`): they keep their message ids, and every stage of the pipeline
stores by id, so a record that arrives twice is one message. Never call `send` again with the
same text after an unknown outcome: that makes a new id, hence a second message.

Usage (docs in README.md, "Posting straight to Kafka")::

    from sealstream.producer import MessageProducer, NotAcknowledged
    from sealstream.settings import Settings

    with MessageProducer(Settings(), service="importer") as producer:
        sent = producer.send({"chat_id": chat, "sender_id": "bot", "text": "hello"})
        print(sent.message_id)
"""

from __future__ import annotations

import re
import uuid
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Protocol

from pydantic import ValidationError

from schemas.events import MessageRecord
from sealstream.adapters.kafka import Delivery, Headers, Publisher
from sealstream.errors import InvalidMessage, StoreUnavailable
from sealstream.kafka_principals import DIRECT_PRODUCER
from sealstream.record_seal import record_sealer
from sealstream.settings import Settings
from sealstream.worker_ids import lease_worker_id

MAX_PREPARED = 100_000
"""How many prepared records a producer remembers for `publish` (a retry's records are recent)."""

# Fields a caller may give. The ids are the producer's: `message_id` only to name the message an
# edit or deletion changes; `event_id` never.
CALLER_FIELDS = frozenset(MessageRecord.model_fields) - {"event_id"}

# Our own field names are echoed in errors; a caller's unknown field name only when it looks like
# an identifier (a long or odd "name" could be message text put in the wrong place).
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
# A model-level rule names its field first: "Value error, text: required when kind is edit".
_RULE_FIELD = re.compile(r"^Value error, ([a-z_]+):")
_QUOTED = re.compile(r"`[^`]*`")


class InvalidProducerMessage(InvalidMessage, ValueError):
    """A message the record schema refuses; nothing of its batch was published.

    `field` is the first field at fault, dotted, with the message's index in a batch
    (`"messages.3.sender_id"`; `"sender_id"` for a single message; `"messages.3"` when the
    message itself is not a mapping); `problems` lists every `(field, rule)`. Neither holds a value
    given (it may be message text).
    """

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        self.field = problems[0][0]
        super().__init__("; ".join(f"{field}: {rule}" for field, rule in problems)[:1000])


class NotAcknowledged(StoreUnavailable):
    """Kafka did not acknowledge these records (no broker, a timeout, the KMS down while sealing).

    Retriable. The outcome may be unknown (some or all of them may be on the topic already):
    publish `records` again with `MessageProducer.publish` (same message ids, so no duplicate
    message), not the original messages with `send` (new ids: duplicates).
    """

    def __init__(self, records: Sequence[MessageRecord], cause: str) -> None:
        super().__init__(
            f"{len(records)} record(s) not acknowledged ({cause}); publish the same records "
            "again to retry without duplicates"
        )
        self.records = tuple(records)


@dataclass(frozen=True)
class Sent:
    """One record acknowledged by Kafka: the ids assigned and where it landed.

    `event_id` is the change's id: the message id for a post, a new id for an edit or deletion.
    """

    message_id: int
    event_id: int
    chat_id: uuid.UUID
    kind: str
    partition: int
    offset: int


class IdSource(Protocol):
    """Makes Snowflake ids (`sealstream.worker_ids.LeasedIds`); `next_id` may raise the
    retriable `WorkerIdUnavailable`."""

    def next_id(self) -> int: ...


class Sealer(Protocol):
    """Seals one record's value (`sealstream.record_seal.RecordSealer`)."""

    def seal(
        self, topic: str, key: bytes, event_id: int, value: bytes
    ) -> tuple[bytes, list[tuple[str, bytes]]]: ...


class AckedPublisher(Protocol):
    """Publishes and waits for every acknowledgement (`sealstream.adapters.kafka.Publisher`)."""

    def publish(
        self,
        topic: str,
        items: Sequence[tuple[bytes, bytes | None]],
        headers: Headers | None = None,
        timeout: float = 30.0,
        record_headers: Sequence[Headers] | None = None,
    ) -> list[Delivery]: ...


class MessageProducer:
    """Validated, id-assigned, sealed, acknowledged posts, edits and deletions to the message
    topic (`settings.kafka.messages_topic`). A context manager: entering it leases a worker id
    (Postgres), builds the sealer (KMS, Postgres) and the Kafka producer; leaving it flushes and
    releases them. Thread-safe: one producer per process is enough. On the broker it
    authenticates as the direct-producer principal (`sealstream-producer`: write on the message
    topic, nothing else) unless `settings.kafka.username` names another.

    A message is a mapping of `MessageRecord` fields: `chat_id` (UUID or its text), `sender_id`,
    `text`, and optionally `tenant_id` (the chat's tenant; `"default"`), `client_message_id`,
    `sent_at` (aware datetime or RFC 3339 text; now by default), `kind` (`"post"`, default;
    `"edit"` or `"delete"` with the `message_id` they change and, for an edit, the new `text`).
    A post must not carry `message_id`, nor any message `event_id`: the producer makes them.

    Entering raises `WorkerIdConflict` (the configured `SEALSTREAM_WORKER_ID` is held),
    `WorkerIdUnavailable` or `StoreUnavailable` (Postgres down). The pipeline's workers still
    check what the schema cannot (the chat exists, `tenant_id` is its tenant, an edit is its
    sender's, in time) and dead-letter records that fail.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        service: str = "producer",
        timeout_seconds: float = 30.0,
        ids: IdSource | None = None,
        sealer: Sealer | None = None,
        publisher: AckedPublisher | None = None,
    ) -> None:
        """`timeout_seconds`: longest a call waits for Kafka's acknowledgement before it raises
        `NotAcknowledged`. `ids`, `sealer`, `publisher`: given ones are used as they are (and
        not closed); the others are built from `settings` on entering."""
        self.settings = settings
        # As the direct-producer principal (write on the message topic only) unless this
        # process configured its own (`SEALSTREAM_KAFKA__USERNAME`).
        self.kafka = settings.kafka.acting_as(DIRECT_PRODUCER)
        self.topic = settings.kafka.messages_topic
        self.service = service
        self.timeout_seconds = timeout_seconds
        self._given = (ids, sealer, publisher)
        self._ids, self._sealer, self._publisher = self._given
        self._stack = ExitStack()
        # The ids of the records `prepare` made (the newest MAX_PREPARED), which `publish`
        # alone takes: change id -> (message id, event id, chat, kind).
        self._prepared: OrderedDict[int, tuple[int, int | None, uuid.UUID, str]] = OrderedDict()

    def __enter__(self) -> MessageProducer:
        try:
            self._open()
        except BaseException:
            self._stack.close()
            raise
        return self

    def _open(self) -> None:
        if self._ids is None:
            self._ids = self._stack.enter_context(lease_worker_id(self.settings, self.service))
        if self._sealer is None:
            sealer = record_sealer(self.settings)
            self._stack.callback(sealer.close)
            self._sealer = sealer
        if self._publisher is None:
            # acks=all and idempotence: built in one place, sealstream.adapters.kafka.Publisher.
            publisher = Publisher(self.kafka, client_id=f"{self.service}-producer")
            self._stack.callback(publisher.close)
            self._publisher = publisher

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Flush what is queued, release the worker id and the sealer (idempotent); entering
        again builds them afresh."""
        self._stack.close()
        self._ids, self._sealer, self._publisher = self._given

    # --- the calls -------------------------------------------------------------------------------

    def send(self, message: Mapping[str, Any]) -> Sent:
        """Validate, assign ids, seal and publish one message; return once Kafka acknowledged it.

        Raises `InvalidProducerMessage` (naming the field; nothing published), the retriable
        `WorkerIdUnavailable` (no valid id lease now; nothing published), `NotAcknowledged`
        (retry with `publish(error.records)`) or `RecordRefused` (Kafka refuses this record for
        good, e.g. larger than the topic's limit).
        """
        [sent] = self.publish([self.prepare(message)])
        return sent

    def send_batch(self, messages: Sequence[Mapping[str, Any]]) -> list[Sent]:
        """`send` for several messages, published together; all are validated before any is
        published (one invalid message: `InvalidProducerMessage` naming `messages.N.<field>`,
        nothing published). Returns one `Sent` per message, in order."""
        return self.publish(self.prepare_batch(messages))

    def prepare(self, message: Mapping[str, Any]) -> MessageRecord:
        """The validated record of one message, with its ids (nothing is published)."""
        return self._record(message, "")

    def prepare_batch(self, messages: Sequence[Mapping[str, Any]]) -> list[MessageRecord]:
        """Validated records with their ids, in order (nothing is published); the first invalid
        message raises `InvalidProducerMessage` naming `messages.N.<field>`."""
        if isinstance(messages, Mapping | str | bytes):
            raise InvalidProducerMessage([("messages", "must be a sequence of mappings")])
        return [self._record(m, f"messages.{i}.") for i, m in enumerate(messages)]

    def publish(self, records: Sequence[MessageRecord]) -> list[Sent]:
        """Seal and publish prepared records (from `prepare`, or `NotAcknowledged.records` of an
        earlier attempt) and wait for Kafka's acknowledgement of all of them.

        Publishing the same records again is safe: same ids, one message. Raises
        `NotAcknowledged` (outcome unknown: call again with the same records) or
        `RecordRefused`.
        """
        if self._sealer is None or self._publisher is None:
            raise RuntimeError("MessageProducer is used outside its `with` block")
        if not records:
            return []
        records = self._checked(records)
        try:
            items: list[tuple[bytes, bytes | None]] = []
            record_headers: list[Headers] = []
            for record in records:
                key = record.key()
                if not self.settings.kafka.seal_records:  # only to measure the cost
                    items.append((key, record.value()))
                    record_headers.append([])
                    continue
                # Bound to topic, chat id (the key) and event id: a sealed value copied to
                # another topic, chat or position does not open (docs/format.md).
                sealed, headers = self._sealer.seal(
                    self.topic, key, record.change_id, record.value()
                )
                items.append((key, sealed))
                record_headers.append([(name, value) for name, value in headers])
            deliveries = self._publisher.publish(
                self.topic, items, timeout=self.timeout_seconds, record_headers=record_headers
            )
        except StoreUnavailable as exc:
            raise NotAcknowledged(records, str(exc)) from None
        return [
            Sent(r.message_id, r.change_id, r.chat_id, r.kind, d.partition, d.offset)
            for r, d in zip(records, deliveries, strict=True)
        ]

    # --- validation ------------------------------------------------------------------------------

    def _checked(self, records: Sequence[MessageRecord]) -> list[MessageRecord]:
        """`records` validated again, each one made by this producer's `prepare` with these
        very ids and chat: pydantic's `model_copy(update=...)` and `model_construct` skip
        validation, and a record built by hand carries ids no lease made (one that reuses an
        id overwrites another message of the chat). `InvalidProducerMessage` naming
        `records.N.<field>` otherwise; nothing is published."""
        checked: list[MessageRecord] = []
        problems: list[tuple[str, str]] = []
        for i, record in enumerate(records):
            prefix = f"records.{i}."
            if not isinstance(record, MessageRecord):
                problems.append((f"records.{i}", "must be a MessageRecord from prepare()"))
                continue
            try:
                again = MessageRecord.model_validate(record.model_dump())
            except ValidationError as exc:
                found = _problems(exc, prefix)
            else:
                found = []
                if self._prepared.get(again.change_id) != _identity(again):
                    found = [
                        (
                            f"{prefix}message_id",
                            "not a record this producer prepared with these ids and chat "
                            "(prepare() or send() make the ids; publish takes their records "
                            "back unchanged, for a retry)",
                        )
                    ]
                checked.append(again)
            problems += found
        if problems:
            # Outside any `except` block: pydantic's error quotes the input (possibly text).
            raise InvalidProducerMessage(problems)
        return checked

    def _remember(self, record: MessageRecord) -> MessageRecord:
        self._prepared[record.change_id] = _identity(record)
        while len(self._prepared) > MAX_PREPARED:
            self._prepared.popitem(last=False)
        return record

    def _check(self, message: object, prefix: str) -> Mapping[str, Any]:
        """Problems the caller can fix that the schema alone does not name."""
        if not isinstance(message, Mapping):
            raise InvalidProducerMessage([(prefix.rstrip(".") or "message", "must be a mapping")])
        problems = []
        for name in message:
            if name == "event_id":
                problems.append((f"{prefix}event_id", "made by the producer; leave it out"))
            elif name not in CALLER_FIELDS:
                shown = name if isinstance(name, str) and _NAME.fullmatch(name) else "(name hidden)"
                problems.append((f"{prefix}{shown}", "unexpected field"))
        if message.get("kind", "post") == "post" and "message_id" in message:
            problems.append(
                (
                    f"{prefix}message_id",
                    "made by the producer for a post; leave it out (to retry, publish the "
                    "records of the first attempt again)",
                )
            )
        if problems:
            raise InvalidProducerMessage(problems)
        return message

    def _record(self, message: Mapping[str, Any], prefix: str) -> MessageRecord:
        fields = dict(self._check(message, prefix))
        fields.setdefault("sent_at", datetime.now(UTC))
        if self._ids is None:
            raise RuntimeError("MessageProducer is used outside its `with` block")
        if fields.get("kind", "post") == "post":
            fields["message_id"] = self._ids.next_id()
        else:
            fields["event_id"] = self._ids.next_id()
        try:
            return self._remember(MessageRecord.model_validate(fields))
        except ValidationError as exc:
            problems = _problems(exc, prefix)
        # Raised outside the `except` block: pydantic's error quotes the input (possibly text)
        # and must not ride along as `__context__` into a caller's log.
        raise InvalidProducerMessage(problems)


def _identity(record: MessageRecord) -> tuple[int, int | None, uuid.UUID, str]:
    """What a prepared record's ids were made for: an id reused for another message, kind or
    chat is not the record prepared."""
    return (record.message_id, record.event_id, record.chat_id, record.kind)


def _problems(error: ValidationError, prefix: str) -> list[tuple[str, str]]:
    """(field, rule) of each problem pydantic found, never the input (as `schemas.events.describe`,
    whose wording it keeps, with the field apart so a caller can act on it)."""
    found = []
    for e in error.errors():
        loc = [str(p) for p in e["loc"]]
        rule = _QUOTED.sub("`…`", e["msg"])
        if not loc:
            named = _RULE_FIELD.match(rule)
            if named:
                loc = [named.group(1)]
                rule = rule[named.end() :].strip()
            else:
                rule = rule.removeprefix("Value error, ")
        name = ".".join(p if p in MessageRecord.model_fields else "(name hidden)" for p in loc)
        found.append((f"{prefix}{name}" if name else prefix.rstrip(".") or "message", rule))
    return found
