"""Per-chat activity over tumbling windows, computed by Faust from the Sealstream message topic.

An example for downstream (ML) consumers, documented in README.md beside this file and in
docs/faust.md. For each chat and each window of `window_seconds` (by the time in the message id)
it keeps the distinct message ids and sender ids in a windowed Faust table, and publishes after
every change the window's counts (messages, distinct senders; never text or sender ids) to a sink
topic keyed by chat id. Run it with

    faust -A examples.faust_chat_activity.app worker -l info

from the repository root (settings from `SEALSTREAM_*` variables, see `ActivityAppSettings`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import faust
from faust.types import EventT, StreamT
from faust.types.tables import WindowWrapperT
from faust.web import Request, Response, View
from pydantic import BaseModel, Field, model_validator

from sealstream.faust_records import (
    MessageEvent,
    MessageTopic,
    OpenerOnFirstUse,
    RefusedRecords,
    faust_broker_credentials,
    message_topic,
)
from sealstream.record_seal import record_opener
from sealstream.settings import Settings

TABLE_NAME = "chat-activity"


class ChatActivitySettings(BaseModel):
    """The example's own settings (`SEALSTREAM_CHAT_ACTIVITY__<FIELD>`)."""

    model_config = {"frozen": True}

    # The Faust app id, hence the Kafka consumer group and the prefix of the changelog topic.
    group: str = "sealstream-ml-chat-activity"
    window_seconds: int = Field(default=60, ge=1)
    # Windows older than this (behind the newest record of their partition) are dropped from
    # the table and its changelog; keep it short, the table holds sender ids (docs/faust.md).
    expires_seconds: int = Field(default=3600, ge=1)
    sink_topic: str = "sealstream-ml.chat-activity.v1"
    web_enabled: bool = True
    web_host: str = "127.0.0.1"
    web_port: int = 6066
    data_dir: str = ".faust/chat-activity"


class ActivityAppSettings(Settings):
    """One settings object for the app's process: Sealstream's (`SEALSTREAM_KAFKA__BOOTSTRAP`,
    `__MESSAGES_TOPIC`, `__PARTITIONS`, `__REPLICATION_FACTOR`, `__SEAL_RECORDS`, the workers'
    groups to stay out of; `SEALSTREAM_POSTGRES__*` and `SEALSTREAM_VAULT__*` to open the
    sealed records' topic keys) and its own (`SEALSTREAM_CHAT_ACTIVITY__*`)."""

    chat_activity: ChatActivitySettings = Field(default_factory=ChatActivitySettings)

    @model_validator(mode="after")
    def _own_group(self) -> ActivityAppSettings:
        # In the encryptor's or indexer's group the app would take partitions away from them:
        # the records it got would never be encrypted or indexed.
        if self.chat_activity.group in {self.kafka.encryptor_group, self.kafka.indexer_group}:
            raise ValueError(
                "chat_activity.group must be a consumer group of its own, not the encryptor's "
                "or the indexer's"
            )
        return self


class ChatWindow(faust.Record, serializer="json"):
    """One chat's activity in one window so far (the table's value).

    Distinct message ids, not a counter: a record can arrive twice (the gateway publishes again
    under the same id when a client retries after an unknown outcome; Faust redelivers after a
    crash), and counting ids keeps the figure exact. Both lists are sorted.
    """

    message_ids: list[int]
    senders: list[str]

    @property
    def messages(self) -> int:
        return len(self.message_ids)

    @property
    def distinct_senders(self) -> int:
        return len(self.senders)


def empty_window() -> ChatWindow:
    return ChatWindow(message_ids=[], senders=[])


def add_message(window: ChatWindow, message: MessageEvent) -> ChatWindow:
    """`window` with `message` counted (unchanged values if it was already)."""
    ids = set(window.message_ids) | {message.message_id}
    senders = set(window.senders) | {message.sender_id}
    return ChatWindow(message_ids=sorted(ids), senders=sorted(senders))


class ChatWindowActivity(faust.Record, serializer="json", isodates=True, include_metadata=False):
    """What the sink topic carries (key: chat id): a window's counts so far. A later record of
    the same chat and `window_start` replaces an earlier one (the newest is the figure)."""

    chat_id: str
    window_start: datetime
    window_end: datetime
    messages: int
    distinct_senders: int


def id_time(event: EventT[Any] | None) -> float:
    """The window clock: when the message id was made (Unix seconds), not the producer's
    `sent_at` nor the Kafka timestamp, so windows agree with the pipeline's own clock."""
    if event is None:
        raise RuntimeError("the chat-activity window needs the event being processed")
    value = event.value
    assert isinstance(value, MessageEvent)  # MessageTopic delivers nothing else
    return value.id_time


@dataclass(frozen=True)
class ChatActivityApp:
    """The Faust app and the parts a caller (the worker, a test, the web view) reads."""

    app: faust.App
    topic: MessageTopic
    activity: WindowWrapperT
    sink: faust.TopicT
    refusals: RefusedRecords
    settings: ActivityAppSettings
    opener: OpenerOnFirstUse

    def close(self) -> None:
        """Close what opening sealed records opened (its Postgres pool), after `app.stop()`; a
        `faust worker` process leaves it to its exit."""
        self.opener.close()

    def windows(self, chat_id: str | None = None) -> list[ChatWindowActivity]:
        """The windows this process holds (its partitions'), oldest first; one chat's or all."""
        size = self.settings.chat_activity.window_seconds
        rows = []
        for key, value in list(self.activity.table.data.items()):
            chat, (start, _end) = key
            if chat_id is None or chat == chat_id:
                rows.append(window_activity(chat, start, size, value))
        return sorted(rows, key=lambda r: (r.window_start, r.chat_id))


def window_activity(chat: str, start: float, size: int, window: ChatWindow) -> ChatWindowActivity:
    return ChatWindowActivity(
        chat_id=chat,
        window_start=datetime.fromtimestamp(start, UTC),
        window_end=datetime.fromtimestamp(start + size, UTC),
        messages=window.messages,
        distinct_senders=window.distinct_senders,
    )


def brokers(bootstrap: str) -> str:
    """Faust's broker URL list from a Kafka bootstrap string (`h1:9092,h2:9092`)."""
    return ";".join(f"kafka://{host.strip()}" for host in bootstrap.split(",") if host.strip())


def build_app(settings: ActivityAppSettings) -> ChatActivityApp:
    """The app, its table, agent, sink and web view. Connects to nothing until started."""
    kafka, own = settings.kafka, settings.chat_activity
    app = faust.App(
        own.group,
        broker=brokers(kafka.bootstrap),
        broker_credentials=faust_broker_credentials(kafka),
        store="memory://",  # rebuilt from the changelog topic at start-up
        datadir=own.data_dir,
        web_enabled=own.web_enabled,
        web_bind=own.web_host,
        web_port=own.web_port,
        # A new group starts at the oldest record still on the topic (at most its retention).
        consumer_auto_offset_reset="earliest",
        # The changelog and sink topics get the message topic's layout: a table row is written
        # to the changelog partition of the record that changed it (the chat's partition).
        topic_partitions=kafka.partitions,
        topic_replication_factor=kafka.replication_factor,
        topic_disable_leader=True,  # no `<group>-__assignor-__leader` topic
    )
    refusals = RefusedRecords()
    # Built at the first record, in a worker thread: building the app connects to nothing.
    opener = OpenerOnFirstUse(lambda: record_opener(settings))
    topic = message_topic(app, kafka.messages_topic, opener, refusals, kafka.seal_records)
    size = own.window_seconds
    activity = (
        app.Table(
            TABLE_NAME,
            default=empty_window,
            value_type=ChatWindow,
            partitions=kafka.partitions,
        )
        .tumbling(size, expires=own.expires_seconds)
        .relative_to(id_time)  # type: ignore[attr-defined]  # on WindowWrapper, not its T
    )
    sink = app.topic(
        own.sink_topic,
        key_type=str,
        value_type=ChatWindowActivity,
        partitions=kafka.partitions,
        # Counts per chat id: kept no longer than the messages they come from (docs/faust.md,
        # "Deletions").
        retention=kafka.retention_ms / 1000,
    )

    async def count_activity(messages: StreamT[MessageEvent]) -> None:
        # Faust declares only the topics it reads; without this the broker would auto-create
        # the sink on the first send, with its own partition count and retention.
        await sink.maybe_declare()
        async for message in messages:
            if message.kind != "post":
                # An edit or deletion is no new message (its message was counted when posted);
                # counting it would also put it in the window of its message's id time, which
                # may have closed long ago.
                continue
            chat = str(message.chat_id)
            before: ChatWindow = activity[chat].value()
            after = add_message(before, message)
            if after == before:
                continue  # a message already counted: nothing changed
            activity[chat] = after
            start = activity.table.window.current(message.id_time)[0]
            await sink.send(key=chat, value=window_activity(chat, start, size, after))

    app.agent(topic, name=f"{own.group}.count-activity")(count_activity)
    built = ChatActivityApp(app, topic, activity, sink, refusals, settings, opener)

    class ChatActivityView(View):
        """`GET /chat-activity/` (every window this worker holds) and
        `GET /chat-activity/{chat_id}/` (one chat's), plus the refused-record counts."""

        async def get(self, request: Request, chat_id: str | None = None) -> Response:
            return self.json(
                {
                    "windows": [w.asdict() for w in built.windows(chat_id)],
                    "refused": dict(refusals.by_reason),
                }
            )

    app.page("/chat-activity/")(ChatActivityView)
    app.page("/chat-activity/{chat_id}/")(ChatActivityView)
    return built


def _from_environment() -> Any:
    return build_app(ActivityAppSettings()).app


# The worker's entry point (`faust -A examples.faust_chat_activity.app`): Faust imports this
# module and needs the app object here; building it reads settings but connects to nothing.
app = _from_environment()
