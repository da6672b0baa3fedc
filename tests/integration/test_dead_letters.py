"""Dead-letter tools on the real broker and Postgres: letters read back as metadata only,
filtered, shown by coordinates, replayed once (recorded and audited), refused without a value.
(The whole pipeline's side, the workers dead-lettering and storing a replayed record once, is in
tests/e2e/test_dead_letters.py.)"""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from typing import Any

from confluent_kafka import Consumer

from sealstream.adapters.kafka import (
    DeadLetter,
    DeadLetterReader,
    Publisher,
    dead_letter_headers,
    kafka_client_config,
)
from sealstream.adapters.postgres import ChatKeyRepository, DeadLetterReplays
from sealstream.dead_letters import (
    ALREADY_REPLAYED,
    NOT_FOUND,
    REFUSED,
    REPLAYED,
    REPLAYED_FROM,
    WOULD_REPLAY,
    LetterFilter,
    list_letters,
    replay,
    select,
    show,
)
from sealstream.settings import KafkaSettings
from tests.integration.conftest import KafkaTopics

SECRET = b"zqsecretx the plaintext of a refused record"


def _write_letters(kafka: KafkaSettings, chat: str) -> list[tuple[int, int]]:
    """Three letters as the workers write them (original headers first, then `dlq.*`): a
    schema refusal, an unknown chat, and one whose value the topic refused. Returns their
    coordinates in the dead-letter topic."""
    publisher = Publisher(kafka, client_id="test-dlq-writer")
    try:
        coordinates = []
        for offset, stage, reason, value, extra in [
            (10, "encryptor", "message_id: Input should be a valid integer", SECRET, []),
            (11, "encryptor", f"unknown chat {chat}", SECRET, []),
            (12, "indexer", "sent_at: offset beyond 18:00", None, [("dlq.value", b"omitted: x")]),
        ]:
            letter = DeadLetter(stage, reason, kafka.messages_topic, 1, offset)
            headers: Any = [
                ("sealstream.key_id", b"topic-key-7"),
                ("trace", b"zqtracex"),
                *dead_letter_headers(letter),
                *extra,
            ]
            [d] = publisher.publish(
                kafka.dead_letter_topic, [(chat.encode(), value)], headers=headers
            )
            coordinates.append((d.partition, d.offset))
        return coordinates
    finally:
        publisher.close()


def test_letters_list_filter_and_show_as_metadata_only(kafka_topic_factory: KafkaTopics) -> None:
    kafka = kafka_topic_factory("dlq-list")
    chat = str(uuid.uuid4())
    before = datetime.now(UTC) - timedelta(seconds=1)
    coords = _write_letters(kafka, chat)
    reader = DeadLetterReader(kafka)
    try:
        page = list_letters(reader, LetterFilter(), limit=10)
        assert [i.coordinates for i in page.letters] == coords and not page.truncated
        first = page.letters[0]
        assert (first.stage, first.origin_topic, first.origin_partition, first.origin_offset) == (
            "encryptor",
            kafka.messages_topic,
            1,
            10,
        )
        assert first.chat_id == chat and first.value_bytes == len(SECRET)
        assert first.headers == ("sealstream.key_id", "trace")  # names only, dlq.* left out
        assert first.at >= before
        omitted = page.letters[2]
        assert omitted.value_bytes is None and omitted.value_omitted == "omitted: x"
        # Nothing of a value, nor of another header's value, in what an operator is given.
        shown = json.dumps([asdict(i) for i in page.letters], default=str)
        assert "zqsecretx" not in shown and "zqtracex" not in shown and "topic-key-7" not in shown

        assert [
            i.coordinates for i in list_letters(reader, LetterFilter(reason="UNKNOWN CHAT")).letters
        ] == [coords[1]]
        assert [
            i.coordinates for i in list_letters(reader, LetterFilter(stage="indexer")).letters
        ] == [coords[2]]
        later = datetime.now(UTC) + timedelta(hours=1)
        assert not list_letters(reader, LetterFilter(since=later)).letters
        assert not list_letters(reader, LetterFilter(until=before)).letters
        assert not list_letters(reader, LetterFilter(origin_topic="elsewhere")).letters
        assert len(list_letters(reader, LetterFilter(since=before)).letters) == 3
        limited = list_letters(reader, LetterFilter(), limit=2)
        assert len(limited.letters) == 2 and limited.truncated

        assert show(reader, *coords[1]) == page.letters[1]
        assert show(reader, coords[1][0], coords[2][1] + 1) is None  # past the end
        assert show(reader, 7, 0) is None  # no such partition
    finally:
        reader.close()


def test_replay_republishes_once_recorded_and_audited(
    kafka_topic_factory: KafkaTopics, database: Any
) -> None:
    kafka = kafka_topic_factory("dlq-replay")
    chat = str(uuid.uuid4())
    coords = _write_letters(kafka, chat)
    reader = DeadLetterReader(kafka)
    publisher = Publisher(kafka, client_id="test-dlq-replay")
    ledger = DeadLetterReplays(database)  # type: ignore[arg-type]

    def run(selection: list[tuple[int, int]], **options: Any) -> dict[tuple[int, int], str]:
        report = replay(
            reader,
            publisher,
            ledger,
            selection,
            messages_topic=kafka.messages_topic,
            actor="cli:test",
            **options,
        )
        return {(r.partition, r.offset): r.outcome for r in report.results}

    try:
        assert select(reader, LetterFilter(reason="unknown chat")) == [coords[1]]
        assert run(coords, dry_run=True) == {
            coords[0]: WOULD_REPLAY,
            coords[1]: WOULD_REPLAY,
            coords[2]: REFUSED,  # no value: said so, nothing published
        }
        assert not ledger.replayed(kafka.dead_letter_topic, coords)
        assert run([coords[1], (coords[0][0], 999)]) == {
            coords[1]: REPLAYED,
            (coords[0][0], 999): NOT_FOUND,
        }
        assert run([coords[1]]) == {coords[1]: ALREADY_REPLAYED}
        assert run([coords[1]], force=True) == {coords[1]: REPLAYED}
        row = ledger.replayed(kafka.dead_letter_topic, [coords[1]])[coords[1]]
        assert (row.replays, row.first_replayed_by, row.origin_topic) == (
            2,
            "cli:test",
            kafka.messages_topic,
        )
        audit = ChatKeyRepository(database).audit_entries(uuid.UUID(chat))  # type: ignore[arg-type]
        assert [e.action for e in audit] == ["dead_letter_replayed"] * 2
        assert all(e.actor == "cli:test" and "zq" not in e.reason for e in audit)
    finally:
        publisher.close()
        reader.close()

    # The message topic got the record twice (the forced replay), as it came: key, value and
    # its own headers, no dlq.* header, marked with the letter it was replayed from.
    consumer = Consumer(
        kafka_client_config(
            kafka,
            {
                "group.id": f"test-dlq-{uuid.uuid4().hex}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
            },
        )
    )
    consumer.subscribe([kafka.messages_topic])
    got: list[Any] = []
    deadline = datetime.now(UTC) + timedelta(seconds=30)
    while len(got) < 2 and datetime.now(UTC) < deadline:
        msg = consumer.poll(0.5)
        if msg is not None and not msg.error():
            got.append(msg)
    consumer.close()
    assert len(got) == 2
    for msg in got:
        assert (msg.key(), msg.value()) == (chat.encode(), SECRET)
        assert msg.headers() == [
            ("sealstream.key_id", b"topic-key-7"),
            ("trace", b"zqtracex"),
            (REPLAYED_FROM, f"{coords[1][0]}:{coords[1][1]}".encode()),
        ]
