"""The message topic for Faust apps of downstream consumers: the record, its codec, its topic.

Owns `MessageEvent` (a `faust.Record` with the fields and types of `schemas.events.MessageRecord`),
the codec `sealstream.message.v1` that turns the record's plaintext JSON into it (validated by that
same pydantic model, so a Faust app accepts exactly what the encryptor and indexer accept), and
`MessageTopic`, a `faust.Topic` that opens each sealed value before decoding it and skips and
counts the records it refuses instead of crashing the agent. Usage and the choices behind it:
docs/faust.md.

Shapes: the record key is the chat id, UTF-8 of its canonical text (36 bytes); the value is sealed
(docs/format.md, "Sealed Kafka records": an AEAD blob bound to topic, key and event id) with the
headers `sealstream.key_id` and `sealstream.event_id`. Opening is the consumer library's own code
(`sealstream.consumer.open_message`), run off the event loop; a retriable failure (KMS or Postgres
down) holds the partition and retries, never skips. Nothing here ever puts message text into a
log line, an exception or a `repr`.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, Optional, Tuple  # noqa: UP035  (Faust parses typing.Tuple)
from weakref import WeakKeyDictionary

import faust
from faust.exceptions import KeyDecodeError, ValueDecodeError
from faust.serializers import codecs
from faust.types import AppT, Message
from pydantic import ValidationError

from schemas.events import SCHEMA_VERSION, MessageRecord, describe
from schemas.ids import id_millis
from sealstream.adapters.kafka import kafka_client_config
from sealstream.consumer import MAX_BACKOFF_S, Opener, open_message
from sealstream.consumer import NO_VALUE as NO_VALUE
from sealstream.errors import InvalidMessage, SealstreamError
from sealstream.record_seal import header_pairs
from sealstream.settings import KafkaSettings

log = logging.getLogger(__name__)


class _PrincipalCredentials(faust.SASLCredentials):
    """SASL credentials whose password is looked up when Faust connects, not when the app is
    built: importing an app module (`faust -A`, a test) needs no credentials file."""

    def __init__(self, kafka: KafkaSettings, ssl_context: ssl.SSLContext | None) -> None:
        self._kafka = kafka
        super().__init__(
            username=kafka.principal, mechanism=kafka.sasl_mechanism, ssl_context=ssl_context
        )

    @property
    def password(self) -> str:
        return str(kafka_client_config(self._kafka)["sasl.password"])

    @password.setter
    def password(self, _value: str | None) -> None:
        pass  # always the principal's, from the settings


def faust_broker_credentials(kafka: KafkaSettings) -> faust.SASLCredentials | None:
    """The `broker_credentials` of a `faust.App` for the principal of `kafka` (None on a broker
    without authentication): the same principal, password and mechanism `kafka_client_config`
    gives confluent-kafka clients, for Faust's aiokafka driver."""
    if not kafka.security_protocol.startswith("SASL"):
        return None
    context = None
    if kafka.security_protocol == "SASL_SSL":
        cafile = str(kafka.ssl_ca_location) if kafka.ssl_ca_location else None
        context = ssl.create_default_context(cafile=cafile)
    return _PrincipalCredentials(kafka, context)


CODEC_NAME = "sealstream.message.v1"
"""Faust codec name of the message topic's values (schema version 1)."""

# The same reasons, word for word, as `schemas.events.decode_record` gives the workers' dead
# letters (a unit test keeps them in step), so one refused record reads the same everywhere.
NO_KEY = "record has no key; the key must be chat_id (per-chat ordering, deletion checks)"
KEY_MISMATCH = "record key does not match chat_id (breaks per-chat ordering)"


class InvalidMessageRecord(InvalidMessage, ValueError):
    """A value of the message topic that schema v1 refuses. `reason` names each field and rule
    (`describe` in schemas/events.py), never the input value: it may be message text."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"invalid record: {reason}")
        self.reason = reason


class MessageEvent(
    faust.Record,
    serializer=CODEC_NAME,
    include_metadata=False,  # dumps() writes the topic's own JSON, without Faust's `__faust` key
    isodates=True,
):
    """One chat message of the message topic, as a Faust record (schema version 1).

    Field names and types are those of `schemas.events.MessageRecord`; built by the codec from a
    value that model accepted, so `sent_at` is an aware datetime in UTC, `chat_id` a UUID, the
    text 1..16384 bytes of UTF-8 with a non-blank character, ids 1..128 characters.
    """

    message_id: int
    chat_id: uuid.UUID
    sender_id: str
    text: Optional[str]  # noqa: UP045  (None for a deletion)
    sent_at: datetime
    schema_version: int = SCHEMA_VERSION
    kind: str = "post"  # "post", "edit" or "delete" (schemas.events.MessageKind)
    event_id: Optional[int] = None  # noqa: UP045  (edit/delete: the change's own id)
    tenant_id: str = "default"
    # typing.Optional, not `str | None`: Faust's field parser does not read the `|` union.
    client_message_id: Optional[str] = None  # noqa: UP045
    # Post only: ids of the chat's attachment files it references (empty when none).
    attachment_ids: Tuple[int, ...] = ()  # noqa: UP006

    @classmethod
    def from_record(cls, record: MessageRecord) -> MessageEvent:
        """The Faust record of a validated pydantic record (same values, no copy of checks)."""
        return cls(
            message_id=record.message_id,
            chat_id=record.chat_id,
            sender_id=record.sender_id,
            text=record.text,
            sent_at=record.sent_at,
            schema_version=record.schema_version,
            kind=record.kind,
            event_id=record.event_id,
            tenant_id=record.tenant_id,
            client_message_id=record.client_message_id,
            attachment_ids=record.attachment_ids,
        )

    @property
    def id_time(self) -> float:
        """When the gateway made the message id, in Unix seconds (the pipeline's one clock:
        retention and deletion use it too; `sent_at` is the producer's, kept as metadata)."""
        return id_millis(self.message_id) / 1000

    def __repr__(self) -> str:
        # Faust's own repr lists every field, the text too; events end up in log lines.
        return (
            f"<MessageEvent: message_id={self.message_id} chat_id={self.chat_id} "
            f"sender_id={self.sender_id!r} text=<{len(self.text or '')} chars>>"
        )


class MessageRecordCodec(codecs.Codec):
    """Codec `sealstream.message.v1`: topic JSON (bytes) <-> `MessageEvent`.

    `loads` validates with `MessageRecord` (schemas/events.py) and raises `InvalidMessageRecord`
    naming field and rule; `dumps` accepts a `MessageEvent` or its mapping, validates it the same
    way and writes what the gateway writes (`MessageRecord.value()`).
    """

    def _loads(self, s: bytes) -> MessageEvent:
        try:
            record = MessageRecord.model_validate_json(s)
        except ValidationError as exc:
            reason = describe(exc)
        else:
            return MessageEvent.from_record(record)
        # Raised outside the `except` block: the pydantic error (which quotes the input, hence
        # possibly text) must not ride along as `__context__` into Faust's logs.
        raise InvalidMessageRecord(reason)

    def _dumps(self, obj: Any) -> bytes:
        data = obj.asdict() if isinstance(obj, MessageEvent) else obj
        try:
            record = MessageRecord.model_validate(data)
        except ValidationError as exc:
            reason = describe(exc)
        else:
            return record.value()
        raise InvalidMessageRecord(reason)


codecs.register(CODEC_NAME, MessageRecordCodec())


def key_refusal(key: bytes | None, chat_id: uuid.UUID) -> str | None:
    """Why a record with this key and this value's chat id is refused, or None if it is not.

    Same rules as the workers (`decode_record`): the key must be the chat id, which is what keeps
    one chat's records in order on one partition (and one chat's table rows in one partition).
    """
    if key is None:
        return NO_KEY
    if key != str(chat_id).encode():
        return KEY_MISMATCH
    return None


Outcome = MessageRecord | str  # the validated record, or why it is refused


class MessageSchema(faust.Schema):  # type: ignore[type-arg]  # bytes key, MessageEvent value
    """Key bytes + `MessageEvent` value of a sealed record, refusing what the workers refuse: no
    value (a tombstone), a seal that does not open (not sealed, tampered, wrong binding, key
    unknown or destroyed), a value schema v1 refuses, no key, a key that is not the chat id.

    `opener` opens sealed values (`sealstream.record_seal.RecordOpener`, or `OpenerOnFirstUse`);
    `sealed_only` (setting `kafka.seal_records`) refuses unsealed records, else reads them as
    plaintext. `MessageTopic` opens each value off the event loop first (`open_value`);
    `loads_value` opens it itself, blocking, only for a message that did not pass there.
    """

    def __init__(self, opener: Opener, sealed_only: bool = True) -> None:
        super().__init__(
            key_type=bytes,
            value_type=MessageEvent,
            key_serializer="raw",
            value_serializer=CODEC_NAME,
        )
        self.opener = opener
        self.sealed_only = sealed_only
        # Outcome per message, from `open_value` to `loads_value`; gone with the message.
        self._opened: WeakKeyDictionary[Message, Outcome] = WeakKeyDictionary()

    def _open(self, message: Message) -> Outcome:
        return open_message(
            self.opener,
            message.topic,
            message.key,
            _header_pairs(message.headers),
            message.value,
            sealed_only=self.sealed_only,
        )

    async def open_value(self, message: Message) -> None:
        """Open `message` in a worker thread (the KMS or Postgres may be called), retrying with
        backoff while they are down: the partition waits, the record is never skipped."""
        if message in self._opened:
            return
        delay = 0.1
        while True:
            try:
                self._opened[message] = await asyncio.to_thread(self._open, message)
                return
            except SealstreamError as exc:
                if not exc.retriable:
                    raise
                log.warning(
                    "cannot open records now (%s); retrying in %.1f s (topic %s, partition %s)",
                    type(exc).__name__,
                    delay,
                    message.topic,
                    message.partition,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF_S)

    def loads_value(
        self,
        app: AppT,
        message: Message,
        *,
        loads: Any = None,
        serializer: Any = None,
    ) -> Any:
        outcome = self._opened.get(message)
        if outcome is None:
            outcome = self._open(message)
        if isinstance(outcome, str):
            raise ValueDecodeError(outcome)
        return MessageEvent.from_record(outcome)


def _header_pairs(headers: Any) -> list[tuple[str, bytes]] | None:
    """Faust's headers read as every stage reads them (`record_seal.header_pairs`)."""
    return header_pairs(headers) or None


class OpenerOnFirstUse:
    """An `Opener` built by `factory` at its first use (in a worker thread), so that building a
    Faust app connects to nothing (`faust -A` imports the module); `close()` closes it."""

    def __init__(self, factory: Callable[[], Any]) -> None:
        self._factory = factory
        self._opener: Any = None
        self._lock = threading.Lock()

    def open(
        self,
        topic: str,
        key: bytes | None,
        headers: Sequence[tuple[str, bytes]] | None,
        value: bytes,
    ) -> bytes:
        with self._lock:
            if self._opener is None:
                self._opener = self._factory()  # StoreUnavailable while Postgres is down
            opener = self._opener
        return bytes(opener.open(topic, key, headers, value))

    def close(self) -> None:
        with self._lock:
            opener, self._opener = self._opener, None
        if opener is not None:
            opener.close()


class RefusedRecords:
    """Records of the message topic a Faust app skipped because the schema refuses them.

    Counts by reason (`by_reason`, `total`) and logs each one's topic, partition, offset and
    reason (never its key or value). The records are not copied anywhere: the pipeline's own
    workers refuse the same records and dead-letter them to the Sealstream dead-letter topic, and
    each one stays readable at its offset until the message topic's retention ends.
    """

    def __init__(self) -> None:
        self.by_reason: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())

    def add(self, reason: str, message: Message) -> None:
        self.by_reason[reason] += 1
        log.warning(
            "skipped a record the message schema refuses: %s (topic %s, partition %s, offset %s)",
            reason,
            message.topic,
            message.partition,
            message.offset,
        )


class MessageTopic(faust.Topic):
    """The message topic, read-only: decoded by `MessageSchema`; a refused record is skipped and
    counted in `refusals` (its offset is acknowledged, so the app moves on) instead of being
    thrown into the agent, where Faust's default would crash it. Never declared (created) by the
    app: the topic belongs to Sealstream (`sealstream migrate` sets its retention)."""

    def __init__(self, *args: Any, refusals: RefusedRecords | None = None, **kwargs: Any) -> None:
        self.refusals = refusals if refusals is not None else RefusedRecords()
        super().__init__(*args, **kwargs)

    def _clone_args(self) -> Any:
        # Agents iterate a clone of the topic: it must count into the same `refusals`.
        return {**super()._clone_args(), "refusals": self.refusals}

    def _compile_decode(self) -> None:
        # Faust decodes through a compiled function that calls the schema's synchronous
        # `loads_value`; opening may call the KMS, so it runs first, awaited, off the loop.
        super()._compile_decode()
        decode_opened = self.decode
        schema = self.schema

        async def decode(message: Message, *, propagate: bool = False) -> Any:
            if isinstance(schema, MessageSchema) and message.value is not None:
                await schema.open_value(message)
            return await decode_opened(message, propagate=propagate)

        self.decode = decode  # type: ignore[method-assign]

    async def declare(self) -> None:
        """Never create the message topic: a Faust-made one would keep plaintext for the
        broker's default retention (7 days unless configured) instead of Sealstream's."""

    async def on_key_decode_error(self, exc: Exception, message: Message) -> None:
        self.refusals.add(_reason(exc), message)

    async def on_value_decode_error(self, exc: Exception, message: Message) -> None:
        self.refusals.add(_reason(exc), message)


def _reason(exc: Exception) -> str:
    if isinstance(exc, KeyDecodeError | ValueDecodeError):
        return str(exc)[:600]
    return type(exc).__name__  # not ours: its text could quote the input


def message_topic(
    app: faust.App,
    name: str,
    opener: Opener,
    refusals: RefusedRecords | None = None,
    sealed_only: bool = True,
) -> MessageTopic:
    """The Sealstream message topic `name` (setting `SEALSTREAM_KAFKA__MESSAGES_TOPIC`) for `app`,
    its sealed values opened by `opener` (`sealstream.record_seal.record_opener(settings)`, or
    `OpenerOnFirstUse` of it); `sealed_only`: setting `kafka.seal_records`."""
    return MessageTopic(
        app, topics=[name], schema=MessageSchema(opener, sealed_only), refusals=refusals
    )
