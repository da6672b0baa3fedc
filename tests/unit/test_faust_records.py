"""The Faust record, codec and topic of the message topic (sealstream/faust_records.py), no I/O.

The codec must accept exactly what `schemas.events.MessageRecord` accepts, refuse the rest with the
field and the rule (never the value), and the topic must skip and count what it refuses instead of
throwing it into the agent.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import faust
import pytest
from faust.exceptions import ValueDecodeError
from faust.serializers import codecs
from faust.types import Message

from examples.faust_chat_activity.app import (
    ActivityAppSettings,
    ChatActivitySettings,
    add_message,
    empty_window,
)
from schemas.events import MessageRecord, decode_record
from sealstream.errors import SealRefused, StoreUnavailable
from sealstream.faust_records import (
    CODEC_NAME,
    KEY_MISMATCH,
    NO_KEY,
    NO_VALUE,
    InvalidMessageRecord,
    MessageEvent,
    MessageRecordCodec,
    key_refusal,
    message_topic,
)
from sealstream.record_seal import RecordOpener, RecordSealer, TopicKey
from sealstream.settings import KafkaSettings

SECRET = "zqsecret launch words"
CHAT = uuid.UUID("0f8e6b2a-3c1d-4e5f-8a7b-9c0d1e2f3a4b")


def value(**changes: object) -> bytes:
    record = {
        "schema_version": 1,
        "message_id": 1234567890123456789,
        "chat_id": str(CHAT),
        "tenant_id": "acme",
        "sender_id": "alice",
        "text": SECRET,
        "client_message_id": "c-1",
        "sent_at": "2026-03-01T12:00:00+02:00",
    }
    record.update(changes)
    return json.dumps({k: v for k, v in record.items() if v is not ...}).encode()


def test_a_valid_value_decodes_to_the_record_with_the_same_fields_in_utc() -> None:
    event = codecs.loads(CODEC_NAME, value())
    assert isinstance(event, MessageEvent)
    assert event.message_id == 1234567890123456789
    assert event.chat_id == CHAT and isinstance(event.chat_id, uuid.UUID)
    assert (event.tenant_id, event.sender_id, event.text) == ("acme", "alice", SECRET)
    assert event.client_message_id == "c-1" and event.schema_version == 1
    assert event.sent_at == datetime(2026, 3, 1, 10, 0, tzinfo=UTC)
    assert event.sent_at.utcoffset() == timedelta(0)
    # Fields and defaults are the contract's: a value without the optional ones decodes too.
    minimal = codecs.loads(
        CODEC_NAME, value(tenant_id=..., client_message_id=..., schema_version=...)
    )
    assert (minimal.tenant_id, minimal.client_message_id, minimal.schema_version) == (
        "default",
        None,
        1,
    )
    assert set(MessageEvent._options.fields) == set(MessageRecord.model_fields)


def test_dumps_writes_what_the_gateway_writes() -> None:
    record = MessageRecord.model_validate_json(value())
    event = MessageEvent.from_record(record)
    assert event.dumps() == record.value()
    assert codecs.dumps(CODEC_NAME, event) == record.value()
    assert codecs.loads(CODEC_NAME, event.dumps()) == event


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"sender_id": ""}, "sender_id: String should have at least 1 character"),
        ({"chat_id": "zq-not-a-uuid"}, "chat_id: Input should be a valid UUID"),
        ({"message_id": 0}, "message_id: Input should be greater than or equal to 1"),
        ({"sent_at": "2026-03-01T12:00:00"}, "sent_at: Value error, must carry a UTC offset"),
        ({"sent_at": "2026-03-01T12:00:00+19:00"}, "sent_at: Value error, UTC offset must be"),
        ({"text": "   "}, "text: Value error, text must contain a non-blank character"),
        ({"text": "x" * 16385}, "text: Value error, text is 16385 bytes of UTF-8; the limit"),
        ({"schema_version": 2}, "schema_version: Input should be 1"),
        ({SECRET: 1}, "(unexpected field): Extra inputs are not permitted"),
        ({"sender_id": ...}, "sender_id: Field required"),
    ],
)
def test_an_invalid_value_is_refused_with_field_and_reason_never_the_value(
    changes: dict[str, object], reason: str
) -> None:
    with pytest.raises(InvalidMessageRecord) as caught:
        MessageRecordCodec().loads(value(**changes))
    message = str(caught.value)
    assert message.startswith(f"invalid record: {reason}")
    assert SECRET not in message and "zq-not-a-uuid" not in message
    # Nothing chained: the pydantic error quotes the input.
    assert caught.value.__context__ is None and caught.value.__cause__ is None
    # The workers' decoder refuses the same value for the same reason.
    assert decode_record(value(**changes), CHAT.bytes) == message


def test_faust_reports_the_codec_refusal_as_a_value_decode_error() -> None:
    app = faust.App("unit-faust-records", web_enabled=False)
    with pytest.raises(ValueDecodeError, match="sender_id: String should have at least 1"):
        app.serializers.loads_value(MessageEvent, value(sender_id=""), serializer=CODEC_NAME)
    with pytest.raises(ValueDecodeError, match="record: Invalid JSON"):
        app.serializers.loads_value(MessageEvent, b"{oops", serializer=CODEC_NAME)


def test_key_rules_are_the_workers() -> None:
    right, wrong = str(CHAT).encode(), str(uuid.uuid4()).encode()
    assert key_refusal(right, CHAT) is None
    assert key_refusal(None, CHAT) == NO_KEY == decode_record(value(), None)
    assert key_refusal(wrong, CHAT) == KEY_MISMATCH == decode_record(value(), wrong)
    assert isinstance(decode_record(value(), right), MessageRecord)


class MemoryKeys:
    """`TopicKeySource` in memory (our own port): one key per topic."""

    def __init__(self) -> None:
        self.keys: dict[str, TopicKey] = {}

    def current(self, topic: str) -> TopicKey:
        return self.keys.setdefault(topic, TopicKey(f"{topic}.k1", topic, os.urandom(32)))

    def has_current(self, topic: str) -> bool:
        return topic in self.keys

    def by_id(self, topic: str, key_id: str) -> TopicKey:
        key = self.keys.get(topic)
        if key is None or key.key_id != key_id:
            raise SealRefused(f"header sealstream.key_id: unknown key of topic {topic}")
        return key


class FlakyOpener:
    """Fails retriably `failures` times (the KMS down), then opens."""

    def __init__(self, opener: RecordOpener, failures: int) -> None:
        self.opener, self.failures, self.calls = opener, failures, 0

    def open(self, topic: str, key: bytes | None, headers: Any, value: bytes) -> bytes:
        self.calls += 1
        if self.calls <= self.failures:
            raise StoreUnavailable("KMS down")
        return self.opener.open(topic, key, headers, value)


TOPIC = "t.messages"


def message(
    key: bytes | None,
    payload: bytes | None,
    offset: int = 7,
    headers: list[tuple[str, bytes]] | None = None,
) -> Message:
    return Message(TOPIC, 2, offset, 0.0, 0, headers or [], key, payload, None)


def sealed(
    sealer: RecordSealer, key: bytes | None, payload: bytes, offset: int, event_id: int = 0
) -> Message:
    """A record sealed as producers seal it (`event_id`: the record's own unless given)."""
    if not event_id:
        event_id = json.loads(payload).get("event_id") or json.loads(payload)["message_id"]
    value, headers = sealer.seal(TOPIC, key or str(CHAT).encode(), event_id, payload)
    return message(key, value, offset, headers)


def test_the_topic_opens_sealed_records_skips_and_counts_refused_ones_and_passes_the_rest() -> None:
    keys = MemoryKeys()
    sealer, opener = RecordSealer(keys), RecordOpener(keys)
    app = faust.App("unit-faust-records-topic", web_enabled=False)
    topic = message_topic(app, TOPIC, opener)
    clone = topic.clone()  # what an agent iterates: must count into the same place
    right = str(CHAT).encode()
    tampered = sealed(sealer, right, value(), 9)
    assert tampered.value is not None
    tampered.value = tampered.value[:-1] + bytes([tampered.value[-1] ^ 1])
    inputs = [
        sealed(sealer, right, value(), 0),
        sealed(sealer, right, value(sender_id=""), 1),
        sealed(sealer, None, value(), 2),
        sealed(sealer, str(uuid.uuid4()).encode(), value(), 3),
        message(right, None, 4),
        sealed(sealer, right, b"\xff\xfe not json " + SECRET.encode(), 5, event_id=5),
        message(right, value(), 6),  # plaintext: not sealed
        sealed(sealer, right, value(), 7, event_id=99),  # sealed as another event
        tampered,
    ]

    async def decode_all() -> list[object]:
        return [await clone.decode(m) for m in inputs]

    events = asyncio.run(decode_all())
    assert isinstance(events[0].value, MessageEvent)  # type: ignore[attr-defined]
    assert events[0].value.text == SECRET  # type: ignore[attr-defined]
    assert events[0].key == right  # type: ignore[attr-defined]
    assert events[1:] == [None] * 8  # skipped, not thrown
    assert topic.refusals is clone.refusals
    assert topic.refusals.total == 8
    reasons = topic.refusals.by_reason
    assert reasons[KEY_MISMATCH] == 1
    assert reasons[NO_VALUE] == 1
    assert reasons["record key: missing (a sealed record binds its record key)"] == 1
    assert reasons["record is not sealed: header sealstream.key_id missing"] == 1
    assert reasons["header sealstream.event_id does not match the record's event id"] == 1
    assert sum(n for r, n in reasons.items() if "authentication failed" in r) == 1
    assert sum(n for r, n in reasons.items() if r.startswith("invalid record: ")) == 2
    assert not any(SECRET in reason for reason in reasons)


def test_a_topic_with_sealing_off_still_opens_sealed_records_and_reads_plaintext() -> None:
    keys = MemoryKeys()
    app = faust.App("unit-faust-records-plain", web_enabled=False)
    topic = message_topic(app, TOPIC, RecordOpener(keys), sealed_only=False)
    right = str(CHAT).encode()

    async def decode_all() -> list[object]:
        plain = message(right, value(), 0)
        return [
            await topic.decode(plain),
            await topic.decode(sealed(RecordSealer(keys), right, value(), 1)),
        ]

    events = asyncio.run(decode_all())
    assert [e.value.text for e in events] == [SECRET, SECRET]  # type: ignore[attr-defined]


def test_a_kms_outage_holds_the_record_and_retries_never_skips() -> None:
    keys = MemoryKeys()
    flaky = FlakyOpener(RecordOpener(keys), failures=3)
    app = faust.App("unit-faust-records-flaky", web_enabled=False)
    topic = message_topic(app, TOPIC, flaky)
    record = sealed(RecordSealer(keys), str(CHAT).encode(), value(), 0)
    event = asyncio.run(topic.decode(record))
    assert event.value.text == SECRET  # type: ignore[attr-defined]
    assert flaky.calls == 4
    assert topic.refusals.total == 0


def test_repr_of_an_event_holds_no_text() -> None:
    event = codecs.loads(CODEC_NAME, value())
    assert SECRET not in repr(event) and SECRET not in str(event)
    assert str(CHAT) in repr(event)


def test_window_counts_each_message_id_once() -> None:
    first = codecs.loads(CODEC_NAME, value(message_id=5, sender_id="alice"))
    again = codecs.loads(CODEC_NAME, value(message_id=5, sender_id="alice"))
    other = codecs.loads(CODEC_NAME, value(message_id=6, sender_id="bob"))
    window = add_message(add_message(add_message(empty_window(), first), again), other)
    assert (window.messages, window.distinct_senders) == (2, 2)
    window = add_message(window, codecs.loads(CODEC_NAME, value(message_id=7)))
    assert (window.messages, window.distinct_senders) == (3, 2)


def test_the_app_refuses_the_pipelines_consumer_groups() -> None:
    kafka = KafkaSettings()
    for group in (kafka.encryptor_group, kafka.indexer_group):
        with pytest.raises(ValueError, match="consumer group of its own"):
            ActivityAppSettings(kafka=kafka, chat_activity=ChatActivitySettings(group=group))
    assert ActivityAppSettings(kafka=kafka).chat_activity.group == "sealstream-ml-chat-activity"


def test_an_offset_west_of_utc_is_held_in_utc() -> None:
    event = codecs.loads(CODEC_NAME, value(sent_at="2026-03-01T00:30:00-05:00"))
    assert event.sent_at == datetime(2026, 3, 1, 5, 30, tzinfo=timezone.utc)  # noqa: UP017
