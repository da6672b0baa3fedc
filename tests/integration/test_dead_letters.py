"""Dead-letter tools on the real broker and Postgres: letters read back as metadata only,
filtered, shown by coordinates, replayed once (recorded and audited), refused without a value.
(The whole pipeline's side, the workers dead-lettering and storing a replayed record once, is in
tests/e2e/test_dead_letters.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
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
    BEING_REPLAYED,
    MAX_HEADERS_SHOWN,
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
from sealstream.services import settings_env
from sealstream.settings import KafkaSettings, Settings
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


# --- attacks and operator mistakes (review of issue 13) ------------------------------------


def _publish_letter(
    kafka: KafkaSettings,
    key: bytes,
    value: bytes | None,
    own: list[tuple[str, bytes]],
    letter: DeadLetter,
) -> tuple[int, int]:
    """One letter as the contract writes it: the record's own headers, then the `dlq.*` ones."""
    publisher = Publisher(kafka, client_id="test-dlq-writer")
    try:
        headers: Any = [*own, *dead_letter_headers(letter)]
        [d] = publisher.publish(kafka.dead_letter_topic, [(key, value)], headers=headers)
        return (d.partition, d.offset)
    finally:
        publisher.close()


def _message_topic_records(kafka: KafkaSettings, at_least: int) -> list[Any]:
    """Every record on the message topic (waits for `at_least`, then reads to the end)."""
    consumer = Consumer(
        kafka_client_config(
            kafka,
            {
                "group.id": f"test-dlq-{uuid.uuid4().hex}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
                "enable.partition.eof": True,
            },
        )
    )
    consumer.subscribe([kafka.messages_topic])
    got: list[Any] = []
    eof: set[int] = set()
    deadline = datetime.now(UTC) + timedelta(seconds=30)
    partitions = kafka.partitions
    while datetime.now(UTC) < deadline and (len(got) < at_least or len(eof) < partitions):
        msg = consumer.poll(0.5)
        if msg is None:
            continue
        if msg.error():
            eof.add(msg.partition())
        else:
            got.append(msg)
    consumer.close()
    return got


def test_a_producers_own_dlq_header_is_neither_shown_nor_taken_for_the_letters(
    kafka_topic_factory: KafkaTopics, database: Any
) -> None:
    """A direct producer chooses its record's headers, `dlq.*` names included; the letter keeps
    them before the worker's own. Before: its `dlq.value` was taken for the worker's, shown to
    the operator (a header value a producer set, text included) and made the letter
    unreplayable."""
    kafka = kafka_topic_factory("dlq-spoof")
    chat = str(uuid.uuid4())
    letter = DeadLetter("encryptor", f"unknown chat {chat}", kafka.messages_topic, 0, 5)
    own = [("dlq.value", b"zqspoofx what the producer wrote"), ("dlq.reason", b"zqreasonx")]
    coords = _publish_letter(kafka, chat.encode(), SECRET, own, letter)
    reader = DeadLetterReader(kafka)
    publisher = Publisher(kafka, client_id="test-dlq-spoof")
    try:
        info = show(reader, *coords)
        assert info is not None
        shown = json.dumps(asdict(info), default=str)
        assert "zqspoofx" not in shown and "zqreasonx" not in shown and "zqsecretx" not in shown
        assert info.value_omitted is None and info.value_bytes == len(SECRET)
        assert info.reason == f"unknown chat {chat}"
        assert info.headers == ("dlq.value", "dlq.reason")  # the producer's, by name
        report = replay(
            reader,
            publisher,
            DeadLetterReplays(database),  # type: ignore[arg-type]
            [coords],
            messages_topic=kafka.messages_topic,
            actor="cli:test",
        )
        assert [r.outcome for r in report.results] == [REPLAYED], report.results[0].detail
    finally:
        publisher.close()
        reader.close()


def test_both_stages_letters_of_one_record_replay_it_once(
    kafka_topic_factory: KafkaTopics, database: Any
) -> None:
    """The encryptor and the indexer each letter a record they refuse; both consume the message
    topic, so one republished record serves both. Before: each letter published it again, and
    a record still refused came back as twice as many letters at every replay."""
    kafka = kafka_topic_factory("dlq-twins")
    chat = str(uuid.uuid4())
    own = [("trace", b"zqtracex")]
    twins = [
        _publish_letter(
            kafka,
            chat.encode(),
            SECRET,
            own,
            DeadLetter(stage, f"unknown chat {chat}", kafka.messages_topic, 2, 40),
        )
        for stage in ("encryptor", "indexer")
    ]
    # Another record (other origin offset) is its own replay.
    other = _publish_letter(
        kafka,
        chat.encode(),
        SECRET,
        own,
        DeadLetter("encryptor", f"unknown chat {chat}", kafka.messages_topic, 2, 41),
    )
    reader = DeadLetterReader(kafka)
    publisher = Publisher(kafka, client_id="test-dlq-twins")
    ledger = DeadLetterReplays(database)  # type: ignore[arg-type]
    try:
        report = replay(
            reader,
            publisher,
            ledger,
            [*twins, other],
            messages_topic=kafka.messages_topic,
            actor="cli:test",
        )
        assert [r.outcome for r in report.results] == [REPLAYED] * 3
        assert report.results[0].replayed_to == report.results[1].replayed_to
        assert report.results[2].replayed_to != report.results[0].replayed_to
        rows = ledger.replayed(kafka.dead_letter_topic, [*twins, other])
        assert set(rows) == {*twins, other}  # each letter is marked replayed
    finally:
        publisher.close()
        reader.close()
    assert len(_message_topic_records(kafka, 2)) == 2  # one per record, not one per letter


def _cli(settings: Settings, kafka: KafkaSettings, *args: str) -> subprocess.CompletedProcess[str]:
    """`sealstream dlq ...` as an operator runs it, on these topics and the run's schema."""
    env = {
        **os.environ,
        **settings_env(settings.model_copy(update={"kafka": kafka})),
        "COLUMNS": "300",
        "NO_COLOR": "1",
    }
    return subprocess.run(
        [sys.executable, "-m", "sealstream.cli", "dlq", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_filters_are_checked_like_the_apis_and_a_chat_id_matches_in_any_case(
    kafka_topic_factory: KafkaTopics, settings: Settings, database: Any
) -> None:
    """The admin API refuses a stage other than encryptor|indexer, a chat id that is no UUID and
    an empty reason; the CLI took them as given. Before: `--chat` in capitals (as a UUID is
    often pasted) matched no letter, a misspelt `--stage` listed nothing and said nothing,
    `--reason ""` selected every letter without `--all`, and `--since 1000000d` or coordinates
    with a non-ASCII digit ended in a traceback instead of naming the option."""
    kafka = kafka_topic_factory("dlq-cli")
    chat = str(uuid.uuid4())
    coords = _write_letters(kafka, chat)
    listed = _cli(settings, kafka, "list", "--chat", chat.upper(), "--json")
    assert listed.returncode == 0, listed.stderr
    assert [
        (d["partition"], d["offset"]) for d in json.loads(listed.stdout)["dead_letters"]
    ] == coords
    for args, option in [
        (("list", "--stage", "Encryptor"), "--stage"),
        (("list", "--chat", "zq-not-a-chat"), "--chat"),
        (("list", "--topic", "no spaces/in topics"), "--topic"),
        (("replay", "--reason", "", "--yes"), "--reason"),
        (("list", "--since", "1000000d"), "--since"),
        (("list", "--until", "99999999999d"), "--until"),
        (("show", "\u00b2:1"), "partition:offset"),
        (("replay", "0:0", "--all", "--yes"), "--all"),
    ]:
        out = _cli(settings, kafka, *args)
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        assert option in out.stdout + out.stderr, (args, out.stdout, out.stderr)
        assert "Traceback" not in out.stderr, out.stderr
    # Nothing was replayed by the refused `--reason ""`.
    assert not DeadLetterReplays(database).replayed(kafka.dead_letter_topic, coords)  # type: ignore[arg-type]


class _OtherReplayMeanwhile:
    """The real publisher; on its first publish, before delegating, another operator (another
    process: its own reader, publisher and ledger) replays the same letters, unforced."""

    def __init__(self, kafka: KafkaSettings, database: Any, publisher: Publisher) -> None:
        self.kafka, self.database, self.publisher = kafka, database, publisher
        self.other: list[str] = []
        self.letters: list[tuple[int, int]] = []

    def publish(self, topic: str, items: Any, headers: Any = None, timeout: float = 30.0) -> Any:
        if not self.other:
            reader = DeadLetterReader(self.kafka)
            publisher = Publisher(self.kafka, client_id="test-dlq-other-operator")
            try:
                report = replay(
                    reader,
                    publisher,
                    DeadLetterReplays(self.database),
                    self.letters,
                    messages_topic=self.kafka.messages_topic,
                    actor="admin:other",
                )
                self.other = [r.outcome for r in report.results]
            finally:
                publisher.close()
                reader.close()
        return self.publisher.publish(topic, items, headers=headers, timeout=timeout)


def test_two_operators_replaying_the_same_letter_at_once_publish_it_once(
    kafka_topic_factory: KafkaTopics, database: Any
) -> None:
    """The admin API held a lock per process only: the CLI and the API (or two CLIs) both read
    "never replayed" and both published, and the ledger counted two replays nobody forced.
    A letter is now claimed in Postgres before it is published."""
    kafka = kafka_topic_factory("dlq-race")
    chat = str(uuid.uuid4())
    coords = _write_letters(kafka, chat)[:2]
    reader = DeadLetterReader(kafka)
    publisher = Publisher(kafka, client_id="test-dlq-race")
    sink = _OtherReplayMeanwhile(kafka, database, publisher)
    sink.letters = coords
    ledger = DeadLetterReplays(database)  # type: ignore[arg-type]
    try:
        report = replay(
            reader, sink, ledger, coords, messages_topic=kafka.messages_topic, actor="cli:test"
        )
    finally:
        publisher.close()
        reader.close()
    mine = [r.outcome for r in report.results]
    # Each letter published by exactly one of the two; the other was told it is being replayed.
    assert sorted([mine[0], sink.other[0]]) == sorted([REPLAYED, BEING_REPLAYED]), (
        mine,
        sink.other,
    )
    assert sorted([mine[1], sink.other[1]]) in (
        sorted([REPLAYED, BEING_REPLAYED]),
        sorted([REPLAYED, ALREADY_REPLAYED]),
    ), (mine, sink.other)
    rows = ledger.replayed(kafka.dead_letter_topic, coords)
    assert [rows[c].replays for c in coords] == [1, 1]
    assert len(_message_topic_records(kafka, 2)) == 2  # one per letter, not two


def test_a_letter_the_message_topic_refuses_is_reported_and_the_rest_replayed(
    kafka_topic_factory: KafkaTopics, database: Any
) -> None:
    """A letter whose record the message topic refuses for good (larger than it takes now: its
    limit was lowered, or the letter came from a topic with a higher one). Before: Kafka's
    refusal ended the whole replay (the CLI with a traceback, the API with a 500) and the
    letters after it were never tried."""
    from confluent_kafka.admin import AdminClient

    from tests.e2e.test_pipeline import _set_topic_config

    kafka = kafka_topic_factory("dlq-too-large")
    chat = str(uuid.uuid4())
    big = _publish_letter(
        kafka,
        chat.encode(),
        os.urandom(20_000),  # incompressible: over the message topic's 4 KiB below
        [],
        DeadLetter("encryptor", f"unknown chat {chat}", kafka.messages_topic, 0, 1),
    )
    small = _publish_letter(
        kafka,
        chat.encode(),
        SECRET,
        [],
        DeadLetter("encryptor", f"unknown chat {chat}", kafka.messages_topic, 0, 2),
    )
    _set_topic_config(
        AdminClient(kafka_client_config(kafka)),
        kafka.messages_topic,
        "max.message.bytes",
        "4096",
    )
    reader = DeadLetterReader(kafka)
    publisher = Publisher(kafka, client_id="test-dlq-too-large")
    ledger = DeadLetterReplays(database)  # type: ignore[arg-type]
    try:
        report = replay(
            reader,
            publisher,
            ledger,
            [big, small],
            messages_topic=kafka.messages_topic,
            actor="cli:test",
        )
        # Again: the refused letter is not held by a claim left behind.
        again = replay(
            reader, publisher, ledger, [big], messages_topic=kafka.messages_topic, actor="cli:t"
        )
    finally:
        publisher.close()
        reader.close()
    outcomes = [(r.outcome, r.detail) for r in report.results]
    assert [o for o, _ in outcomes] == [REFUSED, REPLAYED], outcomes
    assert "MSG_SIZE_TOO_LARGE" in outcomes[0][1] and "zqsecretx" not in outcomes[0][1]
    assert [r.outcome for r in again.results] == [REFUSED]
    assert list(ledger.replayed(kafka.dead_letter_topic, [big, small])) == [small]


def test_control_characters_a_producer_put_in_a_header_name_never_reach_the_terminal(
    kafka_topic_factory: KafkaTopics, settings: Settings, database: Any
) -> None:
    """Header names are the producer's choice and `dlq show` prints them: an escape sequence in
    one (set the terminal's title, clear the screen, move the cursor to overwrite "replayable:
    no") went to the operator's terminal as it was. Before: the ESC byte was printed."""
    kafka = kafka_topic_factory("dlq-escape")
    chat = str(uuid.uuid4())
    evil = "x\x1b]0;zqtitle\x07\x1b[2J\x1b[1A\u202e\rend"
    coords = _publish_letter(
        kafka,
        chat.encode(),
        SECRET,
        [(evil, b"v"), ("trace", b"zqtracex")],
        DeadLetter("encryptor", f"unknown chat {chat}", kafka.messages_topic, 0, 1),
    )
    reader = DeadLetterReader(kafka)
    try:
        info = show(reader, *coords)
    finally:
        reader.close()
    assert info is not None
    assert all(name.isprintable() for name in info.headers), info.headers
    out = _cli(settings, kafka, "show", f"{coords[0]}:{coords[1]}")
    assert out.returncode == 0, out.stderr
    for control in ("\x1b", "\x07", "\u202e", "\r"):
        assert control not in out.stdout, repr(out.stdout)
    assert "trace" in out.stdout


def test_a_letter_whose_key_is_no_chat_id_is_not_replayable(
    kafka_topic_factory: KafkaTopics, database: Any
) -> None:
    """The workers refuse a record whose key is not its chat id as written (`str(chat_id)`);
    before, any non-empty key passed as replayable ("yes" in `dlq show`), and a replay only
    made new letters. A chat id in another spelling (capitals, braces, `urn:uuid:`) is not the
    key the workers accept either."""
    kafka = kafka_topic_factory("dlq-odd-key")
    chat = uuid.uuid4()
    keys = [b"zq-not-a-chat", str(chat).upper().encode(), f"urn:uuid:{chat}".encode()]
    coords = [
        _publish_letter(
            kafka,
            key,
            SECRET,
            [],
            DeadLetter(
                "encryptor", "record key does not match chat_id", kafka.messages_topic, 0, i
            ),
        )
        for i, key in enumerate(keys)
    ]
    reader = DeadLetterReader(kafka)
    publisher = Publisher(kafka, client_id="test-dlq-odd-key")
    try:
        infos = [show(reader, *c) for c in coords]
        assert all(i is not None and i.chat_id is None for i in infos), infos
        report = replay(
            reader,
            publisher,
            DeadLetterReplays(database),  # type: ignore[arg-type]
            coords,
            messages_topic=kafka.messages_topic,
            actor="cli:test",
        )
    finally:
        publisher.close()
        reader.close()
    assert [r.outcome for r in report.results] == [REFUSED] * 3, report.results
    assert all("not a chat id" in r.detail and "zq" not in r.detail for r in report.results)


_HOLDER = """
import sys, time
from sealstream.adapters.postgres import Database, DeadLetterReplays
from sealstream.settings import Settings
db = Database(Settings().postgres)
db.open()
with DeadLetterReplays(db).claim(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])) as held:
    print("held" if held else "refused", flush=True)
    time.sleep(600)
"""


def test_a_replay_killed_mid_letter_leaves_no_claim_behind(
    kafka_topic_factory: KafkaTopics, settings: Settings, database: Any
) -> None:
    """A replay process SIGKILLed while it holds a letter: meanwhile the letter is
    `being_replayed` to others; once it is dead the next replay publishes it (the claim is the
    holder's Postgres session, not a row left behind)."""
    kafka = kafka_topic_factory("dlq-killed")
    chat = str(uuid.uuid4())
    coords = _write_letters(kafka, chat)[0]
    env = {**os.environ, **settings_env(settings)}
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, kafka.dead_letter_topic, *map(str, coords)],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    reader = DeadLetterReader(kafka)
    publisher = Publisher(kafka, client_id="test-dlq-killed")
    ledger = DeadLetterReplays(database)  # type: ignore[arg-type]

    def outcome() -> str:
        report = replay(
            reader, publisher, ledger, [coords], messages_topic=kafka.messages_topic, actor="t"
        )
        return report.results[0].outcome

    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert outcome() == BEING_REPLAYED
        holder.kill()
        holder.wait(30)
        # The server ends the dead client's session as soon as it reads the closed socket.
        deadline = datetime.now(UTC) + timedelta(seconds=30)
        result = outcome()
        while result == BEING_REPLAYED and datetime.now(UTC) < deadline:
            result = outcome()
        assert result == REPLAYED
    finally:
        holder.kill()
        publisher.close()
        reader.close()


def test_a_letter_with_thousands_of_headers_is_described_in_a_few_names(
    kafka_topic_factory: KafkaTopics, database: Any
) -> None:
    """Header names are listed, and a producer chooses how many: a 1 MB record of tiny headers
    carries tens of thousands. Before, every distinct name went into the answer: a list of
    1,000 such letters was a response of up to a gigabyte, for the API and the CLI alike."""
    kafka = kafka_topic_factory("dlq-many-headers")
    chat = str(uuid.uuid4())
    own = [(f"h{i:05d}", b"") for i in range(5000)]
    coords = _publish_letter(
        kafka,
        chat.encode(),
        SECRET,
        own,
        DeadLetter("encryptor", f"unknown chat {chat}", kafka.messages_topic, 0, 1),
    )
    reader = DeadLetterReader(kafka)
    try:
        info = show(reader, *coords)
    finally:
        reader.close()
    assert info is not None
    assert info.header_count == 5000
    assert info.headers == tuple(f"h{i:05d}" for i in range(MAX_HEADERS_SHOWN))
