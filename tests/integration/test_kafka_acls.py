"""Least privilege on the broker: each principal is allowed what its service needs, refused the
rest (docs/operations.md, "Broker authentication and ACLs").

Runs against the local stack's Kafka, which authenticates (SASL/SCRAM) and authorises
(StandardAuthorizer, deny by default). The run's own topics and groups get their ACLs from
`ensure_topics`, as `sealstream migrate` gives the real ones; every principal's password comes from
the local credentials file `sealstream stack up` wrote (`kafka.credentials_file`).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient
from pydantic import SecretStr

from sealstream.adapters.kafka import (
    ConsumerGroupsProgress,
    DeadLetterReader,
    Publisher,
    TopicTail,
    delete_topics,
    ensure_topics,
    kafka_client_config,
    remove_acls,
    topic_retention,
)
from sealstream.errors import StoreUnavailable
from sealstream.kafka_principals import (
    ADMIN_API,
    DELIVERY,
    DIRECT_PRODUCER,
    ENCRYPTOR,
    GATEWAY,
    INDEXER,
    ML_CONSUMER,
    TAIL_GROUP_PREFIX,
)
from sealstream.settings import KafkaSettings, Settings
from tests.conftest import require_port
from tests.integration.conftest import host_port

AUTH_ERRORS = {
    KafkaError.TOPIC_AUTHORIZATION_FAILED,
    KafkaError.GROUP_AUTHORIZATION_FAILED,
    KafkaError.CLUSTER_AUTHORIZATION_FAILED,
    KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
}


@pytest.fixture(scope="module")
def acl_kafka(settings: Settings) -> Iterator[KafkaSettings]:
    """The run's own message, dead-letter and change topics with their ACLs, one record in
    each (written by the operator), removed with their ACLs at the end."""
    require_port("kafka", *host_port(settings.kafka.bootstrap))
    run = uuid.uuid4().hex[:8]
    kafka = settings.kafka.model_copy(
        update={
            "messages_topic": f"{settings.kafka.messages_topic}.acl{run}",
            "dead_letter_topic": f"{settings.kafka.dead_letter_topic}.acl{run}",
            "changes_topic": f"{settings.kafka.changes_topic}.acl{run}",
            "encryptor_group": f"{settings.kafka.encryptor_group}.acl{run}",
            "indexer_group": f"{settings.kafka.indexer_group}.acl{run}",
            "ml_group_prefix": f"{settings.kafka.ml_group_prefix}acl{run}-",
        }
    )
    ensure_topics(kafka)
    operator = Producer(kafka_client_config(kafka, {"acks": "all"}))
    for topic in (kafka.messages_topic, kafka.dead_letter_topic, kafka.changes_topic):
        operator.produce(topic, key=b"k", value=b"opaque", partition=0)
    assert operator.flush(30) == 0
    try:
        yield kafka
    finally:
        delete_topics(kafka, [kafka.messages_topic, kafka.dead_letter_topic, kafka.changes_topic])
        remove_acls(kafka)
        # The groups the allowed reads joined; Kafka would keep them (and offsets) for a week.
        joined = [kafka.encryptor_group, kafka.indexer_group, f"{kafka.ml_group_prefix}model"]
        admin = AdminClient(kafka_client_config(kafka))
        for future in admin.delete_consumer_groups(joined, request_timeout=15).values():
            try:
                future.result(20)
            except KafkaException:
                pass  # never formed: the test that joins it failed first


def principal(kafka: KafkaSettings, name: str) -> KafkaSettings:
    """`kafka` as principal `name`, its password from the local credentials file."""
    return kafka.model_copy(update={"username": name, "password": None})


def write(kafka: KafkaSettings, topic: str) -> str | None:
    """None when the broker acknowledged one record from this principal, else the error."""
    publisher = Publisher(kafka, client_id="acl-test")
    try:
        publisher.publish(topic, [(b"k", b"opaque")], timeout=30)
        return None
    except StoreUnavailable as exc:
        return str(exc)
    finally:
        publisher.close(timeout=2)


def read(kafka: KafkaSettings, topic: str, group: str, subscribe: bool = True) -> str | None:
    """None when this principal fetched the topic's first record, else the name of the
    authorisation error it got.

    `subscribe`: joins `group` like a worker; else assign() with `group` only as librdkafka's
    required group id (never joined, nothing committed), like live delivery."""
    consumer = Consumer(
        kafka_client_config(
            kafka,
            {"group.id": group, "auto.offset.reset": "earliest", "enable.auto.commit": False},
        )
    )
    try:
        if subscribe:
            consumer.subscribe([topic])
        else:
            # A topic the principal may not describe is not in its metadata: librdkafka then
            # waits for it quietly, so the refusal is read from the metadata answer.
            error = consumer.list_topics(topic, timeout=30).topics[topic].error
            if error is not None and error.code() in AUTH_ERRORS:
                return str(error.name())
            consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            error = msg.error()
            if error is None:
                return None
            if error.code() in AUTH_ERRORS:
                return str(error.name())
        return "nothing read in 60 s"
    finally:
        consumer.close()


def refused(outcome: str | None) -> bool:
    """The broker refused it for want of a right (a topic's, a group's or the cluster's)."""
    return outcome is not None and "AUTHORIZATION_FAILED" in outcome


def tail_group() -> str:
    return f"{TAIL_GROUP_PREFIX}acl-test-{uuid.uuid4().hex[:8]}"


# --- allowed ------------------------------------------------------------------------------------


def test_each_service_can_do_what_its_job_needs(acl_kafka: KafkaSettings) -> None:
    k = acl_kafka
    assert write(principal(k, GATEWAY), k.messages_topic) is None
    assert write(principal(k, DIRECT_PRODUCER), k.messages_topic) is None
    assert read(principal(k, ENCRYPTOR), k.messages_topic, k.encryptor_group) is None
    assert write(principal(k, ENCRYPTOR), k.dead_letter_topic) is None
    assert write(principal(k, ENCRYPTOR), k.changes_topic) is None
    assert read(principal(k, INDEXER), k.messages_topic, k.indexer_group) is None
    assert write(principal(k, INDEXER), k.dead_letter_topic) is None
    assert read(principal(k, DELIVERY), k.changes_topic, tail_group(), subscribe=False) is None
    assert write(principal(k, ADMIN_API), k.changes_topic) is None
    assert read(principal(k, ML_CONSUMER), k.messages_topic, f"{k.ml_group_prefix}model") is None


def test_the_admin_api_can_follow_the_worker_groups_for_chat_deletion(
    acl_kafka: KafkaSettings,
) -> None:
    progress = ConsumerGroupsProgress(principal(acl_kafka, ADMIN_API))
    position = progress.position()
    assert position[0] >= 1  # the fixture's record, at least
    # The groups committed nothing on this topic: not passed (and no authorisation error).
    assert progress.passed(position) is False


def test_the_admin_api_reads_dead_letters_and_replays_them_into_the_message_topic(
    acl_kafka: KafkaSettings,
) -> None:
    api = principal(acl_kafka, ADMIN_API)
    reader = DeadLetterReader(api)
    try:
        letters = list(reader.scan())
    finally:
        reader.close()
    # The fixture's letter first (other tests of this module write more, the same).
    assert letters and {(letter.key, letter.value) for letter in letters} == {(b"k", b"opaque")}
    assert write(api, acl_kafka.messages_topic) is None  # a replay
    # Reading dead letters is the admin API's (and the operator's): not the ML consumer's.
    ml_reader = DeadLetterReader(principal(acl_kafka, ML_CONSUMER))
    try:
        with pytest.raises(StoreUnavailable, match="TOPIC_AUTHORIZATION_FAILED"):
            list(ml_reader.scan())
    finally:
        ml_reader.close()


def test_delivery_tails_the_change_topic_without_a_group(acl_kafka: KafkaSettings) -> None:
    tail = TopicTail(principal(acl_kafka, DELIVERY), acl_kafka.changes_topic, "delivery")
    try:
        assert tail.open() == acl_kafka.partitions
        assert tail.poll(1.0) == []  # nothing new since open(), and no error either
    finally:
        tail.close()


# --- refused ------------------------------------------------------------------------------------


def test_the_gateway_cannot_read_the_message_topic(acl_kafka: KafkaSettings) -> None:
    k, gateway = acl_kafka, principal(acl_kafka, GATEWAY)
    assert refused(read(gateway, k.messages_topic, tail_group(), subscribe=False))
    assert refused(read(gateway, k.messages_topic, k.encryptor_group))
    assert refused(write(gateway, k.dead_letter_topic))
    assert refused(write(gateway, k.changes_topic))


def test_the_ml_consumer_reads_the_message_topic_and_nothing_else(
    acl_kafka: KafkaSettings,
) -> None:
    k, ml = acl_kafka, principal(acl_kafka, ML_CONSUMER)
    own_group = f"{k.ml_group_prefix}{uuid.uuid4().hex[:8]}"
    assert refused(write(ml, k.messages_topic))
    # In its own group (DESCRIBE allowed), only the topic right is missing.
    assert read(ml, k.dead_letter_topic, own_group, subscribe=False) == (
        "TOPIC_AUTHORIZATION_FAILED"
    )
    assert read(ml, k.changes_topic, own_group, subscribe=False) == "TOPIC_AUTHORIZATION_FAILED"
    # Joining a worker's group would take partitions (and records) away from the encryptor.
    assert read(ml, k.messages_topic, k.encryptor_group) == "GROUP_AUTHORIZATION_FAILED"
    assert read(ml, k.messages_topic, "not-an-ml-group") == "GROUP_AUTHORIZATION_FAILED"


def test_the_workers_cannot_write_the_message_topic_nor_use_each_others_rights(
    acl_kafka: KafkaSettings,
) -> None:
    k = acl_kafka
    for worker in (ENCRYPTOR, INDEXER):
        assert refused(write(principal(k, worker), k.messages_topic)), worker
    assert refused(write(principal(k, INDEXER), k.changes_topic))
    assert read(principal(k, INDEXER), k.messages_topic, k.encryptor_group) == (
        "GROUP_AUTHORIZATION_FAILED"
    )
    assert refused(read(principal(k, ENCRYPTOR), k.dead_letter_topic, k.encryptor_group))


def test_delivery_the_admin_api_and_direct_producers_cannot_read_the_message_topic(
    acl_kafka: KafkaSettings,
) -> None:
    for name in (DELIVERY, ADMIN_API, DIRECT_PRODUCER):
        outcome = read(principal(acl_kafka, name), acl_kafka.messages_topic, tail_group(), False)
        assert refused(outcome), name


def test_a_topic_the_principal_may_not_describe_is_never_taken_for_deleted(
    acl_kafka: KafkaSettings,
) -> None:
    """Topic keys are destroyed past the retention `topic_retention` reads: a topic left out of
    its answer counts as deleted, so one this principal cannot see must raise, not vanish."""
    topic = acl_kafka.messages_topic
    # Delivery has no right on the message topic at all (a listing would omit it).
    with pytest.raises(StoreUnavailable, match="DESCRIBE_CONFIGS"):
        topic_retention(principal(acl_kafka, DELIVERY), [topic])
    with pytest.raises(StoreUnavailable, match="DESCRIBE_CONFIGS"):
        topic_retention(principal(acl_kafka, ML_CONSUMER), [topic])
    missing = f"{topic}.never-made-{uuid.uuid4().hex[:8]}"
    found = topic_retention(acl_kafka, [topic, missing])  # the operator sees every topic
    assert set(found) == {topic}
    assert found[topic][0] == acl_kafka.retention_ms


def connection_errors(kafka: KafkaSettings) -> list[str]:
    """The errors a client reports when it connects with these settings (it gets no metadata)."""
    errors: list[str] = []
    config = kafka_client_config(kafka, {"error_cb": lambda err: errors.append(err.name())})
    client = Producer(config)
    with pytest.raises(KafkaException):
        client.list_topics(timeout=10)
    deadline = time.monotonic() + 30
    while not errors and time.monotonic() < deadline:
        client.poll(0.5)  # serves the error callbacks
    return errors


def test_a_wrong_password_is_refused(acl_kafka: KafkaSettings) -> None:
    wrong = acl_kafka.model_copy(
        update={"username": GATEWAY, "password": SecretStr("not-the-password")}
    )
    assert "_AUTHENTICATION" in connection_errors(wrong)


def test_a_client_without_credentials_is_refused(acl_kafka: KafkaSettings) -> None:
    anonymous = acl_kafka.model_copy(update={"security_protocol": "PLAINTEXT"})
    errors = connection_errors(anonymous)
    # The broker hangs up on a client that does not start a SASL handshake.
    assert errors and set(errors) <= {"_TRANSPORT", "_ALL_BROKERS_DOWN"}, errors
