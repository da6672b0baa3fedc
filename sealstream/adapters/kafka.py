"""Kafka adapter (confluent-kafka): topic set-up, the acknowledged publisher, the dead-letter writer.

The publisher is idempotent with acks=all: a caller is told "published" only once the broker has
the record on every in-sync replica, which is what lets the gateway answer 202 without ever losing
an acknowledged message. Kafka headers carry ids and reasons only, never message text.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from confluent_kafka import (
    OFFSET_END,
    Consumer,
    ConsumerGroupTopicPartitions,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AclBinding,
    AclBindingFilter,
    AclOperation,
    AclPermissionType,
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewTopic,
    ResourcePatternType,
    ResourceType,
    ScramCredentialInfo,
    ScramMechanism,
    UserScramCredentialAlteration,
    UserScramCredentialUpsertion,
)
from pydantic import SecretStr

from sealstream.errors import SealstreamError, StoreUnavailable
from sealstream.kafka_principals import TAIL_GROUP_PREFIX, Right, rights
from sealstream.settings import KafkaSettings

HOUR_MS = 3_600_000


def kafka_client_config(
    settings: KafkaSettings, extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The configuration of every Kafka client of this code base (confluent-kafka's Producer,
    Consumer and AdminClient): bootstrap servers, security protocol and the SASL credentials of
    the process's principal (`settings.principal`), then the librdkafka properties of `extra`.
    A client that `extra` gives no `client.id` is named after that principal (the process's
    role), never librdkafka's default "rdkafka", which names nobody in a broker or client log.

    Raises `ValueError` when SASL is on and the principal's password is unknown (the message
    names the setting to set; it never holds a password).
    """
    config: dict[str, Any] = {
        "bootstrap.servers": settings.bootstrap,
        "security.protocol": settings.security_protocol.lower(),
        "client.id": settings.principal,
    }
    if settings.security_protocol.startswith("SASL"):
        password = settings.resolved_password()
        config["sasl.mechanism"] = settings.sasl_mechanism
        config["sasl.username"] = settings.principal
        config["sasl.password"] = password.get_secret_value()
    if settings.security_protocol == "SASL_SSL" and settings.ssl_ca_location is not None:
        config["ssl.ca.location"] = str(settings.ssl_ca_location)
    config.update(extra or {})
    return config


def segment_ms_for(retention_ms: int) -> int:
    """How often a topic with this retention rolls a new log segment (milliseconds).

    Kafka deletes whole segments, and only once the *newest* record in a segment is past
    retention, so a record stays on disk for up to retention + segment age (+ the broker's
    `log.retention.check.interval.ms` and `file.delete.delay.ms`). Kafka's default roll is 7 days
    or 1 GiB, which kept plaintext for ~8 days behind a 24 h retention; a quarter of the
    retention, at most an hour, keeps the promise close to what it says.
    """
    return max(1, min(HOUR_MS, retention_ms // 4))


def topic_configs(settings: KafkaSettings) -> dict[str, dict[str, str]]:
    """The config `migrate` gives (and re-applies to) each topic: retention and durability."""

    def config(retention_ms: int) -> dict[str, str]:
        return {
            "retention.ms": str(retention_ms),
            "segment.ms": str(segment_ms_for(retention_ms)),
            # With acks=all, a write is acknowledged only once this many replicas have it
            # (docs/operations.md, "Durability"); a lagging replica never becomes leader.
            "min.insync.replicas": str(settings.min_insync_replicas),
            "unclean.leader.election.enable": "false",
        }

    return {
        # Plaintext lives here: short retention by default (docs/security.md).
        settings.messages_topic: config(settings.retention_ms),
        # Poison records as they came: kept longer so an operator can look, bounded all the same.
        settings.dead_letter_topic: config(settings.retention_ms * 7),
        settings.changes_topic: config(settings.retention_ms),
    }


class RecordRefused(SealstreamError):
    """The broker (or the client, before sending) refused this record for good: too large for
    the topic, or invalid. Publishing it again will fail again; the error code says why."""

    def __init__(self, code: str) -> None:
        super().__init__(f"Kafka refused the record ({code})")
        self.code = code


# Error codes about one record, not about the cluster: retrying cannot help.
_RECORD_REFUSED = {
    KafkaError.MSG_SIZE_TOO_LARGE,
    KafkaError.RECORD_LIST_TOO_LARGE,
    KafkaError.INVALID_RECORD,
    KafkaError.INVALID_MSG,
    KafkaError.INVALID_MSG_SIZE,
}


def _delivery_error(err: KafkaError) -> SealstreamError:
    if err.code() in _RECORD_REFUSED:
        return RecordRefused(err.name())
    return StoreUnavailable(f"Kafka did not acknowledge: {err.name()}")


def ensure_topics(settings: KafkaSettings, timeout: float = 30.0) -> list[str]:
    """Create the message, dead-letter and change topics if missing, (re)apply `topic_configs`
    to them, so a deployment made by an older release gets today's retention and durability,
    and (on an authenticated broker) create each service's ACLs on them (`apply_acls`).

    Returns the topics created. Raises `KafkaException` if the broker refuses a topic or config.
    """
    admin = AdminClient(kafka_client_config(settings))
    existing = set(admin.list_topics(timeout=timeout).topics)
    configs = topic_configs(settings)
    partitions = {
        settings.messages_topic: settings.partitions,
        settings.dead_letter_topic: 1,
        settings.changes_topic: settings.partitions,
    }
    todo = [
        NewTopic(
            topic,
            num_partitions=partitions[topic],
            replication_factor=settings.replication_factor,
            config=config,
        )
        for topic, config in configs.items()
        if topic not in existing
    ]
    created: list[str] = []
    for topic, future in (admin.create_topics(todo) if todo else {}).items():
        try:
            future.result(timeout)
            created.append(topic)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
    _keep_stronger_isr(admin, configs, [t for t in configs if t not in created], timeout)
    # Incremental: only these keys are set, any other override an operator made is kept.
    resources = [
        ConfigResource(
            ResourceType.TOPIC,
            topic,
            incremental_configs=[
                ConfigEntry(name, value, incremental_operation=AlterConfigOpType.SET)
                for name, value in config.items()
            ],
        )
        for topic, config in configs.items()
        if topic not in created
    ]
    for future in (admin.incremental_alter_configs(resources) if resources else {}).values():
        future.result(timeout)
    if settings.security_protocol != "PLAINTEXT":
        # Each service's rights on these topics and groups come with them (broker with ACLs).
        apply_acls(settings, timeout)
    return created


def _keep_stronger_isr(
    admin: AdminClient, configs: dict[str, dict[str, str]], topics: list[str], timeout: float
) -> None:
    """Never lower an existing topic's `min.insync.replicas`: a `migrate` run with the local
    default (1) against production topics must not weaken them (drops the key from `configs`)."""
    if not topics:
        return
    described = admin.describe_configs([ConfigResource(ResourceType.TOPIC, t) for t in topics])
    for resource, future in described.items():
        current = future.result(timeout).get("min.insync.replicas")
        wanted = configs[resource.name]
        if current is not None and int(current.value) > int(wanted["min.insync.replicas"]):
            del wanted["min.insync.replicas"]


def topic_retention(
    settings: KafkaSettings, topics: Sequence[str], timeout: float = 30.0
) -> dict[str, tuple[int, int]]:
    """(`retention.ms`, `segment.ms`) of each of `topics` as the broker applies them (a topic's
    own override, else the broker's default; retention -1: kept forever).

    Each topic is described directly (DESCRIBE_CONFIGS), never looked up in a topic listing
    first: a listing leaves out the topics this principal may not DESCRIBE, which would read as
    deleted. Only a topic the broker answers is unknown (UNKNOWN_TOPIC_OR_PART) is left out.
    Raises `StoreUnavailable` when Kafka does not answer, when this principal may not read a
    topic's configuration (TOPIC_AUTHORIZATION_FAILED: its retention is unknown) or on any other
    error, so a caller never takes a topic it cannot see for a deleted one.
    """
    wanted = sorted(set(topics))
    if not wanted:
        return {}
    admin = AdminClient(kafka_client_config(settings))
    try:
        futures = admin.describe_configs(
            [ConfigResource(ResourceType.TOPIC, t) for t in wanted], request_timeout=timeout
        )
    except KafkaException as exc:
        raise StoreUnavailable(
            f"Kafka did not describe topic configs: {exc.args[0].name()}"
        ) from None
    found: dict[str, tuple[int, int]] = {}
    for resource, future in futures.items():
        try:
            entries = future.result(timeout)
        except KafkaException as exc:
            error = exc.args[0]
            if error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                continue  # deleted (or never made): it holds no record
            if error.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED:
                raise StoreUnavailable(
                    f"Kafka principal {settings.principal!r} may not read the configuration of "
                    f"topic {resource.name!r} (DESCRIBE_CONFIGS): its retention is unknown"
                ) from None
            raise StoreUnavailable(
                f"Kafka did not describe the configs of topic {resource.name!r}: {error.name()}"
            ) from None
        except TimeoutError:
            raise StoreUnavailable(
                f"Kafka did not describe the configs of topic {resource.name!r} in {timeout} s"
            ) from None
        found[resource.name] = (
            int(entries["retention.ms"].value),
            int(entries["segment.ms"].value),
        )
    return found


_ACL_OPERATIONS = {
    "read": AclOperation.READ,
    "write": AclOperation.WRITE,
    "describe": AclOperation.DESCRIBE,
    "describe_configs": AclOperation.DESCRIBE_CONFIGS,
}
_ACL_RESOURCES = {"topic": ResourceType.TOPIC, "group": ResourceType.GROUP}


def acl_binding(right: Right) -> AclBinding:
    """The ALLOW ACL of one `Right`, from any host."""
    return AclBinding(
        _ACL_RESOURCES[right.resource],
        right.name,
        ResourcePatternType.PREFIXED if right.prefixed else ResourcePatternType.LITERAL,
        f"User:{right.principal}",
        "*",
        _ACL_OPERATIONS[right.operation],
        AclPermissionType.ALLOW,
    )


def apply_acls(settings: KafkaSettings, timeout: float = 30.0) -> int:
    """Create the ACLs of `sealstream.kafka_principals.rights(settings)` (run by `migrate`, as
    a super user). Idempotent: Kafka keeps one copy of a binding created twice. Rights removed
    from the table are not revoked here (docs/operations.md says how).

    Returns how many bindings were applied. Raises `KafkaException` if the broker refuses (e.g.
    the process's principal may not alter ACLs, or the broker has no authorizer).
    """
    admin = AdminClient(kafka_client_config(settings))
    bindings = [acl_binding(right) for right in rights(settings)]
    for future in admin.create_acls(bindings, request_timeout=timeout).values():
        future.result(timeout)
    return len(bindings)


def remove_acls(settings: KafkaSettings, timeout: float = 30.0) -> None:
    """Delete exactly the ACLs `apply_acls` makes for `settings` (e.g. a test run's topics and
    groups, which would otherwise stay on the broker after their topics are gone)."""
    admin = AdminClient(kafka_client_config(settings))
    filters = [
        AclBindingFilter(
            binding.restype,
            binding.name,
            binding.resource_pattern_type,
            binding.principal,
            binding.host,
            binding.operation,
            binding.permission_type,
        )
        for binding in map(acl_binding, rights(settings))
    ]
    for future in admin.delete_acls(filters, request_timeout=timeout).values():
        future.result(timeout)


def upsert_scram_credentials(
    settings: KafkaSettings,
    passwords: Mapping[str, SecretStr],
    sha: Literal[256, 512] = 512,
    iterations: int = 8192,
    timeout: float = 30.0,
) -> list[str]:
    """Set the SCRAM-SHA-`sha` credential of every principal in `passwords` on a running
    cluster, connecting with `settings` (a super user); returns the names. Creating and
    replacing are the same call, so this also rotates a password.
    """
    mechanism = ScramMechanism.SCRAM_SHA_256 if sha == 256 else ScramMechanism.SCRAM_SHA_512
    admin = AdminClient(kafka_client_config(settings))
    upserts: list[UserScramCredentialAlteration] = [
        UserScramCredentialUpsertion(
            user, ScramCredentialInfo(mechanism, iterations), password.get_secret_value().encode()
        )
        for user, password in passwords.items()
    ]
    for future in admin.alter_user_scram_credentials(upserts).values():
        future.result(timeout)
    return list(passwords)


def delete_topics(settings: KafkaSettings, topics: Sequence[str]) -> None:
    """Delete `topics` and every ACL naming them (best effort: a missing topic is no error)."""
    admin = AdminClient(kafka_client_config(settings))
    for future in admin.delete_topics(list(topics)).values():
        try:
            future.result(30)
        except KafkaException:
            pass
    if settings.security_protocol == "PLAINTEXT" or not topics:
        return
    filters = [
        AclBindingFilter(
            ResourceType.TOPIC,
            topic,
            ResourcePatternType.LITERAL,
            None,  # type: ignore[arg-type]  # None matches any principal / host
            None,  # type: ignore[arg-type]
            AclOperation.ANY,
            AclPermissionType.ANY,
        )
        for topic in topics
    ]
    for future in admin.delete_acls(filters).values():
        try:
            future.result(30)
        except KafkaException:
            pass


Headers = list[tuple[str, str | bytes | None]]
OnDelivery = Callable[[KafkaError | None, Message], None]


@dataclass(frozen=True)
class Delivery:
    topic: str
    partition: int
    offset: int


class Publisher:
    """An idempotent, acks=all producer with a background poll thread.

    `publish` returns only after the broker acknowledged every record; `publish_async` does the
    same for asyncio callers without blocking their event loop.
    """

    def __init__(self, settings: KafkaSettings, client_id: str, linger_ms: int = 0) -> None:
        self.settings = settings
        self._producer = Producer(
            kafka_client_config(
                settings,
                {
                    "client.id": client_id,
                    "enable.idempotence": True,
                    "acks": "all",
                    # 0: a single post is acknowledged in <1 ms instead of ~3 ms; records queued
                    # while a request is in flight are still sent together.
                    "linger.ms": linger_ms,
                    "compression.type": "lz4",
                    # A record not acknowledged in this time fails its caller (gateway: 503).
                    "delivery.timeout.ms": 30000,
                },
            )
        )
        self._stop = threading.Event()
        self._closed = False
        # A fatal error (e.g. CLUSTER_AUTHORIZATION_FAILED: the principal may write no topic, so
        # the idempotent producer gets no producer id) ends this producer for good.
        self._fatal: str | None = None
        self._poller = threading.Thread(target=self._poll, name="kafka-poll", daemon=True)
        self._poller.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                self._producer.poll(0.05)
            except KafkaException as exc:
                self._fatal = exc.args[0].name()
                return

    def _check_fatal(self) -> None:
        if self._fatal is not None:
            raise StoreUnavailable(f"Kafka producer failed for good: {self._fatal}")

    def _produce(
        self,
        topic: str,
        key: bytes,
        value: bytes | None,
        headers: Headers | None,
        on_done: OnDelivery,
        wait_for_room: bool = True,
    ) -> None:
        self._check_fatal()
        while True:
            try:
                self._producer.produce(
                    topic, value=value, key=key, headers=headers, on_delivery=on_done
                )
                return
            except BufferError:
                if not wait_for_room:  # an event loop must not block: the caller retries
                    raise StoreUnavailable("Kafka's local queue is full") from None
                self._producer.poll(0.05)  # local queue full: wait for deliveries to drain
            except KafkaException as exc:  # refused before sending, e.g. over message.max.bytes
                raise _delivery_error(exc.args[0]) from None

    async def publish_async(
        self,
        topic: str,
        items: Sequence[tuple[bytes, bytes]],
        headers: Headers | None = None,
        timeout: float | None = None,
        record_headers: Sequence[Headers] | None = None,
    ) -> list[Delivery]:
        """Publish and await every acknowledgement, never blocking the event loop.

        `headers` go with every record, then `record_headers[i]` (if given) with record `i`
        (a sealed record's `sealstream.*` headers).

        Raises `StoreUnavailable` when a record was refused, or not acknowledged within
        `timeout` seconds: then the outcome is unknown, since librdkafka keeps trying in the
        background until `delivery.timeout.ms`.
        """
        if not items:
            return []
        loop = asyncio.get_running_loop()
        # One future for the whole request, resolved from the poll thread by the last
        # acknowledgement (or the first failure): one wake-up of the loop per request instead of
        # a future, a thread-safe call and a gather per record.
        done: asyncio.Future[list[Delivery]] = loop.create_future()
        results: list[Delivery | None] = [None] * len(items)
        pending = [len(items)]
        lock = threading.Lock()  # callbacks may run on the poll thread and in `close`'s flush

        def callback_for(index: int) -> OnDelivery:
            def on_delivery(err: KafkaError | None, msg: Message) -> None:
                try:
                    if err is not None:
                        error = StoreUnavailable(f"Kafka did not acknowledge: {err.name()}")
                        loop.call_soon_threadsafe(_fail, done, error)
                        return
                    results[index] = Delivery(
                        msg.topic() or topic, msg.partition() or 0, msg.offset() or 0
                    )
                    with lock:
                        pending[0] -= 1
                        last = pending[0] == 0
                    if last:
                        loop.call_soon_threadsafe(_succeed, done, results)
                except RuntimeError:  # the loop is closed: nobody waits for this any more
                    pass

            return on_delivery

        for index, (key, value) in enumerate(items):
            # With a deadline a full local queue fails at once rather than block the loop.
            self._produce(
                topic,
                key,
                value,
                _headers_of(headers, record_headers, index),
                callback_for(index),
                wait_for_room=timeout is None,
            )
        expiry = None
        if timeout is not None:
            late = StoreUnavailable(
                f"Kafka did not acknowledge within {timeout:.1f}s (outcome unknown)"
            )
            expiry = loop.call_later(timeout, _fail, done, late)
        try:
            return await done
        finally:
            if expiry is not None:
                expiry.cancel()

    def publish(
        self,
        topic: str,
        items: Sequence[tuple[bytes, bytes | None]],
        headers: Headers | None = None,
        timeout: float = 30.0,
        record_headers: Sequence[Headers] | None = None,
    ) -> list[Delivery]:
        """Publish and wait for the acknowledgement of every record (`headers` with every
        record, then `record_headers[i]` with record `i`, as in `publish_async`).

        Raises `RecordRefused` when a record can never be accepted (too large, invalid) and
        `StoreUnavailable` for anything else (no broker, no acknowledgement in `timeout`).
        """
        results: list[Delivery | BaseException | None] = [None] * len(items)
        done = threading.Event()
        remaining = [len(items)]
        lock = threading.Lock()

        def callback_for(index: int) -> OnDelivery:
            def callback(err: KafkaError | None, msg: Message) -> None:
                results[index] = (
                    _delivery_error(err)
                    if err is not None
                    else Delivery(msg.topic() or topic, msg.partition() or 0, msg.offset() or 0)
                )
                with lock:
                    remaining[0] -= 1
                    if remaining[0] == 0:
                        done.set()

            return callback

        if not items:
            return []
        for index, (key, value) in enumerate(items):
            self._produce(
                topic, key, value, _headers_of(headers, record_headers, index), callback_for(index)
            )
        deadline = time.monotonic() + timeout
        while not done.wait(min(0.1, max(0.0, deadline - time.monotonic()))):
            self._check_fatal()
            if time.monotonic() >= deadline:
                raise StoreUnavailable(f"Kafka did not acknowledge within {timeout:.0f}s")
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return [r for r in results if isinstance(r, Delivery)]

    def close(self, timeout: float = 10.0) -> None:
        """Wait up to `timeout` seconds for outstanding acknowledgements, then shut the
        producer down: what is still unacknowledged fails its caller (a purge), and librdkafka's
        threads end now rather than when the object happens to be collected (until then they
        would keep reconnecting to an unreachable broker, in the log). A second call does nothing."""
        if self._closed:
            return
        self._closed = True
        self._producer.flush(timeout)
        self._stop.set()
        self._poller.join(timeout=2)
        self._producer.purge(in_queue=True, in_flight=True)
        self._producer.poll(0)  # serve the purged records' callbacks: their callers fail now
        self._producer.close()


def _headers_of(
    shared: Headers | None, per_record: Sequence[Headers] | None, index: int
) -> Headers | None:
    if per_record is None:
        return shared
    return [*(shared or []), *per_record[index]]


def _succeed(future: asyncio.Future[list[Delivery]], value: Sequence[Delivery | None]) -> None:
    if not future.done():
        future.set_result([d for d in value if d is not None])


def _fail(future: asyncio.Future[list[Delivery]], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


@dataclass(frozen=True)
class DeadLetter:
    """Why a record can never be processed, and where it came from."""

    stage: str  # "encryptor" or "indexer"
    reason: str  # names the field and rule; never the text
    topic: str
    partition: int
    offset: int


def dead_letter_headers(letter: DeadLetter) -> Headers:
    """Where the record came from and why it was dead-lettered (see docs/operations.md)."""
    return [
        ("dlq.stage", letter.stage.encode()),
        ("dlq.reason", letter.reason.encode()[:1000]),
        ("dlq.topic", letter.topic.encode()),
        ("dlq.partition", str(letter.partition).encode()),
        ("dlq.offset", str(letter.offset).encode()),
    ]


class ConsumerGroupsProgress:
    """Where the worker groups are on the message topic (for chat deletion's sweep).

    `position()` is the topic's end offset per partition now; `passed(position)` is True once
    every worker group has committed at least that offset on every partition, i.e. every record
    published before `position()` was taken has been written (or refused) and acknowledged.
    """

    def __init__(self, settings: KafkaSettings, timeout: float = 10.0) -> None:
        self.settings = settings
        self.groups = (settings.encryptor_group, settings.indexer_group)
        self.timeout = timeout

    def _partitions(self) -> list[TopicPartition]:
        topic = self.settings.messages_topic
        admin = AdminClient(kafka_client_config(self.settings))
        metadata = admin.list_topics(topic, timeout=self.timeout).topics[topic]
        if metadata.error is not None:
            raise StoreUnavailable(f"Kafka: no metadata for the message topic ({metadata.error})")
        return [TopicPartition(topic, p) for p in sorted(metadata.partitions)]

    def position(self) -> dict[int, int]:
        # Never joins nor commits: the group id is only there because librdkafka wants one, and
        # looks its coordinator up (DESCRIBE): a tail-prefixed one, which the admin API may.
        consumer = Consumer(
            kafka_client_config(self.settings, {"group.id": f"{TAIL_GROUP_PREFIX}positions"})
        )
        try:
            return {
                tp.partition: consumer.get_watermark_offsets(tp, timeout=self.timeout)[1]
                for tp in self._partitions()
            }
        except KafkaException as exc:
            raise StoreUnavailable(f"Kafka unavailable: {exc.args[0].name()}") from None
        finally:
            consumer.close()

    def passed(self, position: dict[int, int]) -> bool:
        wanted = [TopicPartition(self.settings.messages_topic, p) for p in sorted(position)]
        admin = AdminClient(kafka_client_config(self.settings))
        try:
            for group in self.groups:
                request = [ConsumerGroupTopicPartitions(group, wanted)]
                result = admin.list_consumer_group_offsets(request)[group].result(self.timeout)
                committed = {tp.partition: tp.offset for tp in result.topic_partitions}
                # No commit yet is offset -1001: behind, unless the partition was empty.
                if any(committed.get(p, -1) < end for p, end in position.items() if end > 0):
                    return False
        except KafkaException as exc:
            raise StoreUnavailable(f"Kafka unavailable: {exc.args[0].name()}") from None
        return True


class TopicTail:
    """Every record of a topic from the moment `open()` returns, on every partition: `assign()`
    at the end of each partition, no consumer group membership and no offsets committed.

    For readers that must each see every record (live delivery processes), where a consumer
    group would split the partitions between them. `group.id` is a fresh one per instance only
    because librdkafka requires one; it is never joined (assign, not subscribe) nor committed.
    """

    def __init__(self, settings: KafkaSettings, topic: str, client_id: str) -> None:
        self.settings = settings
        self.topic = topic
        self._consumer = Consumer(
            kafka_client_config(
                settings,
                {
                    "group.id": f"{TAIL_GROUP_PREFIX}{client_id}-{uuid.uuid4().hex}",
                    "client.id": client_id,
                    "enable.auto.commit": False,
                    "enable.auto.offset.store": False,
                    "auto.offset.reset": "latest",
                    "fetch.wait.max.ms": 50,  # latency first: a delivered message waits for this
                },
            )
        )

    def open(self, timeout: float = 10.0) -> int:
        """Assign every partition at its end; returns how many. `StoreUnavailable` when the
        topic has no metadata (missing: run `sealstream migrate`) or Kafka does not answer."""
        try:
            metadata = self._consumer.list_topics(self.topic, timeout=timeout).topics[self.topic]
        except KafkaException as exc:
            raise StoreUnavailable(f"Kafka unavailable: {exc.args[0].name()}") from None
        if metadata.error is not None or not metadata.partitions:
            raise StoreUnavailable(
                f"Kafka: no topic {self.topic!r} ({metadata.error}); run `sealstream migrate`"
            )
        try:
            # The end offset of each partition now (not OFFSET_END, which librdkafka resolves
            # only at the first fetch): every record published after open() returns is seen.
            ends = [
                self._consumer.get_watermark_offsets(TopicPartition(self.topic, p), timeout)[1]
                for p in sorted(metadata.partitions)
            ]
        except KafkaException as exc:
            raise StoreUnavailable(f"Kafka unavailable: {exc.args[0].name()}") from None
        self._consumer.assign(
            [
                TopicPartition(self.topic, p, end if end >= 0 else OFFSET_END)
                for p, end in zip(sorted(metadata.partitions), ends, strict=True)
            ]
        )
        return len(metadata.partitions)

    def poll(self, timeout: float, max_records: int = 500) -> list[bytes]:
        """The values of the records that arrived (possibly none) within `timeout` seconds;
        partition errors other than end-of-partition raise `StoreUnavailable`."""
        values: list[bytes] = []
        # poll() returns as soon as one record is there; consume(n, t) would wait out `t` for n
        # records, which is latency added to every live message.
        first = self._consumer.poll(timeout)
        if first is None:
            return values
        for msg in [first, *self._consumer.consume(max_records - 1, 0)]:
            error = msg.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    continue
                raise StoreUnavailable(f"Kafka: {error.name()}")
            value = msg.value()
            if value is not None:
                values.append(value)
        return values

    def close(self) -> None:
        self._consumer.close()


@dataclass(frozen=True)
class StoredLetter:
    """A record of the dead-letter topic as read. `value` is opaque (possibly sealed, possibly
    an old plaintext record): callers hand it back to Kafka and never show it."""

    partition: int
    offset: int
    timestamp_ms: int  # when the letter was written (the record's Kafka timestamp)
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...]


class DeadLetterReader:
    """Reads the dead-letter topic from the beginning (or a time) up to its end as of the call:
    `assign()` over its partitions, no consumer group joined, no offset ever committed, so an
    operator reading letters never moves anybody's position. `group.id` is a fresh one only
    because librdkafka requires one. Kafka errors raise `StoreUnavailable`."""

    def __init__(self, settings: KafkaSettings, timeout: float = 15.0) -> None:
        self.topic = settings.dead_letter_topic
        self.timeout = timeout
        self._known: list[int] | None = None  # the topic's partitions (see _partitions)
        self._consumer = Consumer(
            kafka_client_config(
                settings,
                {
                    # The tail prefix: the principals that read it (admin API, operator) may
                    # look that group's coordinator up, and no one can commit in it.
                    "group.id": f"{TAIL_GROUP_PREFIX}dlq-reader-{uuid.uuid4().hex}",
                    "client.id": "sealstream-dlq-reader",
                    "enable.auto.commit": False,
                    "enable.auto.offset.store": False,
                    "enable.partition.eof": True,
                    "auto.offset.reset": "earliest",
                    # A fetch left waiting at the end of a read holds the connection: the next
                    # request (watermarks, metadata) queued behind it for the default 500 ms.
                    "fetch.wait.max.ms": 20,
                },
            )
        )

    def _ranges(self, since_ms: int | None) -> dict[int, tuple[int, int]]:
        """Per partition: (first offset to read, end offset now); empty ranges left out."""
        try:
            ranges: dict[int, tuple[int, int]] = {}
            for p in self._partitions():
                low, high = self._consumer.get_watermark_offsets(
                    TopicPartition(self.topic, p), timeout=self.timeout, cached=False
                )
                start = low
                if since_ms is not None:
                    [found] = self._consumer.offsets_for_times(
                        [TopicPartition(self.topic, p, since_ms)], timeout=self.timeout
                    )
                    start = high if found.offset < 0 else max(low, found.offset)
                if start < high:
                    ranges[p] = (start, high)
            return ranges
        except KafkaException as exc:
            raise StoreUnavailable(f"Kafka unavailable: {exc.args[0].name()}") from None

    def _partitions(self) -> list[int]:
        """The topic's partitions, asked once per reader (a reader lives for one command or
        request; a replay reads each letter by coordinates). Raises `KafkaException`, or
        `StoreUnavailable` if there is no such topic."""
        if self._known is None:
            metadata = self._consumer.list_topics(self.topic, timeout=self.timeout).topics[
                self.topic
            ]
            if metadata.error is not None or not metadata.partitions:
                raise StoreUnavailable(
                    f"Kafka: no topic {self.topic!r} ({metadata.error}); run `sealstream migrate`"
                )
            self._known = sorted(metadata.partitions)
        return self._known

    def scan(self, since_ms: int | None = None) -> Generator[StoredLetter, None, None]:
        """Every letter written at or after `since_ms` (epoch milliseconds; None: all), up to
        the end of each partition as it was when the scan began, partition by partition in
        offset order."""
        for partition, (start, end) in self._ranges(since_ms).items():
            yield from self._read_range(partition, start, end)

    def read(self, partition: int, offset: int) -> StoredLetter | None:
        """The letter at these coordinates; None if there is none (never written, or expired)."""
        ranges = self._ranges(None)
        if partition not in ranges:
            return None
        low, high = ranges[partition]
        if not low <= offset < high:
            return None
        for letter in self._read_range(partition, offset, offset + 1):
            return letter
        return None

    def _read_range(
        self, partition: int, start: int, end: int
    ) -> Generator[StoredLetter, None, None]:
        self._consumer.assign([TopicPartition(self.topic, partition, start)])
        deadline = time.monotonic() + self.timeout
        next_offset = start
        try:
            while True:
                # At most what is left of the range: consume() returns once it has that many,
                # instead of waiting out its 0.5 s for records beyond the range.
                messages = self._consumer.consume(max(1, min(500, end - next_offset)), 0.5)
                if not messages and time.monotonic() > deadline:
                    raise StoreUnavailable(
                        f"Kafka: no record of {self.topic}/{partition} within {self.timeout:.0f}s"
                    )
                for msg in messages:
                    error = msg.error()
                    if error is not None:
                        if error.code() == KafkaError._PARTITION_EOF:
                            return  # the end came first (records expired or deleted meanwhile)
                        if error.fatal():
                            raise StoreUnavailable(f"Kafka: {error.name()}")
                        continue  # transient: librdkafka retries; the deadline bounds the wait
                    offset = msg.offset() or 0
                    if offset >= end:
                        return
                    next_offset = offset + 1
                    deadline = time.monotonic() + self.timeout
                    _, stamp = msg.timestamp()
                    yield StoredLetter(
                        partition=partition,
                        offset=offset,
                        timestamp_ms=stamp,
                        key=msg.key(),
                        value=msg.value(),
                        headers=_read_headers(msg),
                    )
                    if offset + 1 >= end:
                        return
        finally:
            self._consumer.unassign()

    def close(self) -> None:
        self._consumer.close()


def _read_headers(msg: Message) -> tuple[tuple[str, bytes | None], ...]:
    """A consumed record's headers in order (a consumer always gets a list of pairs)."""
    raw = msg.headers() or []
    pairs = list(raw.items()) if isinstance(raw, dict) else raw
    return tuple((k, v.encode() if isinstance(v, str) else v) for k, v in pairs)
