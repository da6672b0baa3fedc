"""The producer library's validation, ids and retry contract (sealstream/producer.py), no I/O.

Fakes stand in for our own ports only (id source, sealer, publisher): a bad message must be refused
before anything is published, naming the field and never the value; ids come from the id source;
a failed publish hands back the records so a retry keeps their ids.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import pytest

from schemas.events import MessageRecord
from schemas.ids import SnowflakeIds
from sealstream.adapters.kafka import Delivery, Headers
from sealstream.errors import InvalidMessage, StoreUnavailable
from sealstream.producer import InvalidProducerMessage, MessageProducer, NotAcknowledged
from sealstream.settings import Settings

SECRET = "zqsecret launch words"
CHAT = uuid.UUID("0f8e6b2a-3c1d-4e5f-8a7b-9c0d1e2f3a4b")


class FakeSealer:
    """Marks the value as sealed and says which event it was bound to."""

    def seal(
        self, topic: str, key: bytes, event_id: int, value: bytes
    ) -> tuple[bytes, list[tuple[str, bytes]]]:
        return b"sealed:" + value, [("sealstream.event_id", str(event_id).encode())]


class FakePublisher:
    def __init__(self, fail_times: int = 0) -> None:
        self.published: list[tuple[str, bytes, bytes | None, Headers]] = []
        self.fail_times = fail_times

    def publish(
        self,
        topic: str,
        items: Sequence[tuple[bytes, bytes | None]],
        headers: Headers | None = None,
        timeout: float = 30.0,
        record_headers: Sequence[Headers] | None = None,
    ) -> list[Delivery]:
        if self.fail_times:
            self.fail_times -= 1
            raise StoreUnavailable(f"Kafka did not acknowledge within {timeout:.0f}s")
        assert record_headers is not None and len(record_headers) == len(items)
        self.published += [
            (topic, k, v, h) for (k, v), h in zip(items, record_headers, strict=True)
        ]
        return [Delivery(topic, 0, len(self.published) + i) for i in range(len(items))]


def producer(publisher: FakePublisher | None = None) -> tuple[MessageProducer, FakePublisher]:
    sink = publisher or FakePublisher()
    made = MessageProducer(
        Settings(), ids=SnowflakeIds(7), sealer=FakeSealer(), publisher=sink, timeout_seconds=2
    )
    return made, sink


def message(**changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {"chat_id": str(CHAT), "sender_id": "alice", "text": SECRET}
    fields.update(changes)
    return {k: v for k, v in fields.items() if v is not ...}


def refused(call: Any) -> InvalidProducerMessage:
    with pytest.raises(InvalidProducerMessage) as caught:
        call()
    error = caught.value
    assert isinstance(error, InvalidMessage)
    assert "zqsecret" not in str(error) and "launch" not in str(error)
    assert error.__context__ is None or "zqsecret" not in str(error.__context__)
    return error


def test_a_post_gets_an_id_is_sealed_and_published_keyed_by_chat() -> None:
    made, sink = producer()
    with made:
        sent = made.send(message())
    [(topic, key, value, headers)] = sink.published
    assert topic == Settings().kafka.messages_topic
    assert key == str(CHAT).encode()
    assert value is not None and value.startswith(b"sealed:")
    record = MessageRecord.model_validate_json(value.removeprefix(b"sealed:"))
    assert record.message_id == sent.message_id == sent.event_id
    assert (record.chat_id, record.sender_id, record.text) == (CHAT, "alice", SECRET)
    assert record.sent_at.tzinfo is not None
    assert headers == [("sealstream.event_id", str(sent.message_id).encode())]
    assert (sent.message_id >> 12) & 1023 == 7  # the id source's worker id


def test_a_batch_gets_distinct_ids_in_order() -> None:
    made, sink = producer()
    with made:
        sent = made.send_batch([message(text=f"zq {i}") for i in range(50)])
    ids = [s.message_id for s in sent]
    assert len(set(ids)) == 50 and ids == sorted(ids)
    assert [s.offset for s in sent] == sorted({s.offset for s in sent})
    assert len(sink.published) == 50


def test_an_edit_and_a_deletion_get_an_event_id_after_their_message() -> None:
    made, sink = producer()
    with made:
        [post] = made.send_batch([message()])
        edit = made.send(message(kind="edit", message_id=post.message_id, text="zq new"))
        gone = made.send(message(kind="delete", message_id=post.message_id, text=...))
    assert edit.message_id == gone.message_id == post.message_id
    assert post.message_id < edit.event_id < gone.event_id
    assert sink.published[2][3] == [("sealstream.event_id", str(gone.event_id).encode())]


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"sender_id": ""}, "sender_id"),
        ({"sender_id": ...}, "sender_id"),
        ({"chat_id": "not-a-uuid"}, "chat_id"),
        ({"text": "   "}, "text"),
        ({"text": "x" * (16 * 1024 + 1)}, "text"),
        ({"sent_at": "2026-01-01T00:00:00"}, "sent_at"),
        ({"tenant_id": "t" * 129}, "tenant_id"),
        ({"kind": "shout"}, "kind"),
        ({"kind": "edit"}, "message_id"),
        ({"kind": "delete", "message_id": 5}, "text"),
        ({"message_id": 42}, "message_id"),
        ({"event_id": 42}, "event_id"),
        ({"colour": "red"}, "colour"),
        ({SECRET: 1}, "(name hidden)"),
    ],
)
def test_a_bad_message_is_refused_naming_its_field_and_nothing_is_published(
    changes: dict[str, Any], field: str
) -> None:
    made, sink = producer()
    with made:
        error = refused(lambda: made.send(message(**changes)))
    assert error.field == field, error.problems
    assert str(error).startswith(f"{field}: "), str(error)
    assert sink.published == []


def test_one_bad_message_of_a_batch_is_named_by_index_and_none_is_published() -> None:
    made, sink = producer()
    batch = [message(), message(), message(sent_at="yesterday"), message()]
    with made:
        error = refused(lambda: made.send_batch(batch))
    assert error.field == "messages.2.sent_at"
    assert sink.published == []


def test_a_non_mapping_message_is_refused() -> None:
    made, sink = producer()
    with made:
        assert refused(lambda: made.send_batch([message(), "hello"])).field == "messages.1"  # type: ignore[list-item]
    assert sink.published == []


def test_an_unacknowledged_publish_hands_back_the_records_and_a_retry_keeps_their_ids() -> None:
    made, sink = producer(FakePublisher(fail_times=1))
    with made:
        with pytest.raises(NotAcknowledged) as caught:
            made.send_batch([message(text="zq one"), message(text="zq two")])
        assert caught.value.retriable
        records = caught.value.records
        sent = made.publish(records)
    assert [s.message_id for s in sent] == [r.message_id for r in records]
    assert [
        MessageRecord.model_validate_json(v.removeprefix(b"sealed:"))
        for _, _, v, _ in sink.published
        if v is not None
    ] == list(records)


def test_using_it_outside_its_with_block_is_an_error() -> None:
    made = MessageProducer(Settings(), publisher=FakePublisher(), sealer=FakeSealer())
    with pytest.raises(RuntimeError, match="with"):
        made.send(message())
