"""Topic keys on the real Postgres and OpenBao: producers agree on a slot's key, a consumer opens
by key id, and a destroyed key leaves its records unopenable with Postgres and the KMS in hand."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import pytest

from sealstream.adapters.postgres import ChatKeyRepository, Database, TopicKeyRepository
from sealstream.adapters.vault import TransitKms
from sealstream.errors import SealRefused, StoreUnavailable
from sealstream.keys.topic_keys import TopicKeys, destroy_topic_keys, topic_key_cutoff
from sealstream.record_seal import HEADER_KEY_ID, RecordOpener, RecordSealer
from sealstream.settings import Settings

CHAT = b"0f8e6b2a-3c1d-4e5f-8a7b-9c0d1e2f3a4b"


@pytest.fixture
def topic_keys(database: Database, kms: TransitKms, settings: Settings) -> Any:
    kms.ensure_key(settings.vault.default_key)

    def make(rotation_seconds: int = 3600, clock: Any = None) -> TopicKeys:
        # A far clock (a slot of 2001) on purpose: no skew check against the database.
        extra = {} if clock is None else {"clock": clock, "max_clock_skew_seconds": None}
        return TopicKeys(
            TopicKeyRepository(database),
            kms,
            kms_key_name=settings.vault.default_key,
            rotation_seconds=rotation_seconds,
            cache_seconds=300,
            **extra,
        )

    return make


def test_two_producers_agree_and_a_third_process_opens(topic_keys: Any, run_id: str) -> None:
    topic = f"t.{run_id}.agree"
    gateway_a, gateway_b, consumer = topic_keys(), topic_keys(), topic_keys()
    assert gateway_a.current(topic).key_id == gateway_b.current(topic).key_id
    sealed, headers = RecordSealer(gateway_b).seal(topic, CHAT, 7, b"the value")
    assert RecordOpener(consumer).open(topic, CHAT, headers, sealed) == b"the value"
    # The key of one topic does not open another topic's records, nor a copy moved there.
    with pytest.raises(SealRefused, match="another topic"):
        RecordOpener(topic_keys()).open(f"{topic}.moved", CHAT, headers, sealed)


def test_a_new_slot_brings_a_new_key_and_the_old_one_still_opens(
    topic_keys: Any, run_id: str
) -> None:
    topic = f"t.{run_id}.rotate"
    now = [1_900_000_000.0]
    producer = topic_keys(rotation_seconds=60, clock=lambda: now[0])
    first = producer.current(topic)
    old, old_headers = RecordSealer(producer).seal(topic, CHAT, 1, b"before")
    now[0] += 60
    assert producer.current(topic).key_id != first.key_id
    assert RecordOpener(topic_keys()).open(topic, CHAT, old_headers, old) == b"before"


def test_a_destroyed_key_cannot_open_even_with_postgres_and_kms(
    topic_keys: Any, database: Database, settings: Settings, run_id: str
) -> None:
    topic = f"t.{run_id}.shred"
    now = [1_000_000_000.0]  # a slot long past (2001): its key is due for destruction
    producer = topic_keys(clock=lambda: now[0])
    sealed, headers = RecordSealer(producer).seal(topic, CHAT, 9, b"expired text")
    repo = TopicKeyRepository(database)
    key_id = dict(headers)[HEADER_KEY_ID].decode()
    row = repo.by_id(key_id)
    assert row is not None and row.wrapped is not None
    # Destruction as it runs a minute after the key's cut-off (retention + segment roll + grace
    # after its slot): only keys of slots that ended before 2001 go, none of the run's others.
    later = row.valid_to - topic_key_cutoff(settings.kafka, row.valid_to) + row.valid_to
    destroyed = destroy_topic_keys(
        repo, settings.kafka, actor="test", now=later + timedelta(minutes=1)
    )
    assert destroyed == [key_id]
    after = repo.by_id(key_id)
    assert after is not None and after.wrapped is None and after.destroyed_at is not None
    # A fresh process (nothing cached) with Postgres and the KMS at hand cannot open it.
    with pytest.raises(SealRefused, match="destroyed"):
        RecordOpener(topic_keys()).open(topic, CHAT, headers, sealed)
    audit = ChatKeyRepository(database).audit_entries(limit=20)
    assert any(e.action == "topic_keys_destroyed" and key_id in e.reason for e in audit)
    # A key still inside the retention is kept.
    current = topic_keys().current(topic)
    destroy_topic_keys(repo, settings.kafka, actor="test")
    assert repo.by_id(current.key_id).wrapped is not None  # type: ignore[union-attr]


def test_destruction_limited_to_some_topics_leaves_the_others_keys(
    topic_keys: Any, database: Database, settings: Settings, run_id: str
) -> None:
    """The admin API's retention run destroys the message topic's keys only (the one topic its
    Kafka principal may describe); keys of other topics wait for the operator's command."""
    now = [1_000_000_000.0]  # a slot of 2001: due for destruction on both topics
    producer = topic_keys(clock=lambda: now[0])
    mine, other = f"t.{run_id}.only-mine", f"t.{run_id}.not-mine"
    key_mine, key_other = producer.current(mine), producer.current(other)
    repo = TopicKeyRepository(database)
    row = repo.by_id(key_mine.key_id)
    assert row is not None
    later = row.valid_to - topic_key_cutoff(settings.kafka, row.valid_to) + row.valid_to
    asked: list[list[str]] = []

    def broker(names: Any) -> dict[str, tuple[int, int]]:
        asked.append(list(names))
        return {}  # neither topic on the broker: the settings' retention applies

    destroyed = destroy_topic_keys(
        repo,
        settings.kafka,
        actor="test",
        now=later + timedelta(minutes=1),
        broker=broker,
        topics=[mine],
    )
    assert destroyed == [key_mine.key_id]
    assert asked == [[mine]]  # the broker is asked about that topic only
    assert repo.by_id(key_other.key_id).wrapped is not None  # type: ignore[union-attr]
    destroy_topic_keys(
        repo,
        settings.kafka,
        actor="test",
        now=later + timedelta(minutes=1),
        broker=broker,
        topics=[other],
    )
    assert repo.by_id(key_other.key_id).wrapped is None  # type: ignore[union-attr]


def test_postgres_down_is_retriable_not_a_refusal(
    settings: Settings, kms: TransitKms, run_id: str
) -> None:
    down = settings.postgres.model_copy(update={"port": 1})  # nothing listens there
    database = Database(down)
    keys = TopicKeys(
        TopicKeyRepository(database),
        kms,
        kms_key_name=settings.vault.default_key,
        rotation_seconds=3600,
        cache_seconds=300,
    )
    headers = [(HEADER_KEY_ID, b"k1"), ("sealstream.event_id", b"1")]
    with pytest.raises(StoreUnavailable):
        RecordOpener(keys).open(f"t.{run_id}.down", CHAT, headers, b"\x01" + b"\x00" * 40)


def test_a_producer_whose_clock_is_far_off_never_seals_under_a_key_soon_destroyed(
    database: Database, kms: TransitKms, settings: Settings, run_id: str
) -> None:
    """A gateway whose clock is two days behind (a VM restored from a snapshot, NTP down) made
    the key of a slot two days old and sealed with it: the next hourly `destroy-topic-keys`
    (on the database's clock) destroyed that key while the records it sealed were still being
    read, so the messages the gateway had accepted were dead-lettered for good. A producer must
    refuse to seal (retriable: the gateway answers 503) while its clock is that far off."""
    kms.ensure_key(settings.vault.default_key)
    topic = f"t.{run_id}.skew"
    repo = TopicKeyRepository(database)
    behind = repo.db_now().timestamp() - 2 * 24 * 3600
    skewed = TopicKeys(
        repo,
        kms,
        kms_key_name=settings.vault.default_key,
        rotation_seconds=3600,
        cache_seconds=300,
        clock=lambda: behind,
    )
    with pytest.raises(StoreUnavailable, match="clock"):
        RecordSealer(skewed).seal(topic, CHAT, 11, b"accepted text")
    destroy_topic_keys(repo, settings.kafka, actor="test")
    # A clock within the tolerated skew still seals, and its key outlives a destruction run.
    near = TopicKeys(
        repo,
        kms,
        kms_key_name=settings.vault.default_key,
        rotation_seconds=3600,
        cache_seconds=300,
        clock=lambda: time.time() - 60,
    )
    sealed, headers = RecordSealer(near).seal(topic, CHAT, 12, b"accepted text")
    destroy_topic_keys(repo, settings.kafka, actor="test")
    fresh = TopicKeys(
        repo,
        kms,
        kms_key_name=settings.vault.default_key,
        rotation_seconds=3600,
        cache_seconds=300,
    )
    assert RecordOpener(fresh).open(topic, CHAT, headers, sealed) == b"accepted text"


def test_keys_outlive_a_retention_raised_on_the_broker(
    topic_keys: Any,
    database: Database,
    settings: Settings,
    kafka_topic_factory: Any,
    run_id: str,
) -> None:
    """An operator raises the message topic's retention on the broker (`kafka-configs`, say,
    so that a lagging ML consumer can catch up) without changing `SEALSTREAM_KAFKA__RETENTION_MS`.
    Kafka then still holds, and serves, records whose key the hourly destruction erased on the
    setting's horizon: every one of them refused. The destruction must take the longer of the
    two retentions, per topic, as the broker has it."""
    from confluent_kafka.admin import (  # type: ignore[attr-defined]
        AdminClient,
        AlterConfigOpType,
        ConfigEntry,
        ConfigResource,
        ResourceType,
    )

    from sealstream.adapters.kafka import kafka_client_config

    kafka = kafka_topic_factory(f"keep-{run_id[:8]}")
    topic = kafka.messages_topic
    longer = settings.kafka.retention_ms * 3
    admin = AdminClient(kafka_client_config(kafka))
    resource = ConfigResource(
        ResourceType.TOPIC,
        topic,
        incremental_configs=[
            ConfigEntry("retention.ms", str(longer), incremental_operation=AlterConfigOpType.SET)
        ],
    )
    for future in admin.incremental_alter_configs([resource]).values():
        future.result(30)
    # A key of a slot 30 days ahead (no destruction run of another test, on the database's
    # clock or of a 2001 slot, reaches it), then destruction a minute after the setting's
    # cut-off for it: Kafka (retention x 3) may still serve what it sealed.
    ahead = time.time() + 30 * 24 * 3600
    producer = topic_keys(clock=lambda: ahead)
    sealed, headers = RecordSealer(producer).seal(topic, CHAT, 5, b"still on the broker")
    repo = TopicKeyRepository(database)
    key_id = dict(headers)[HEADER_KEY_ID].decode()
    row = repo.by_id(key_id)
    assert row is not None
    at_setting = row.valid_to + (row.valid_to - topic_key_cutoff(settings.kafka, row.valid_to))
    destroyed = destroy_topic_keys(
        repo, settings.kafka, actor="test", now=at_setting + timedelta(minutes=1)
    )
    assert key_id not in destroyed
    assert RecordOpener(topic_keys()).open(topic, CHAT, headers, sealed) == b"still on the broker"
    # Past the broker's own retention (+ segment roll + grace) it goes.
    past = at_setting + timedelta(milliseconds=longer - settings.kafka.retention_ms, minutes=1)
    assert key_id in destroy_topic_keys(repo, settings.kafka, actor="test", now=past)
