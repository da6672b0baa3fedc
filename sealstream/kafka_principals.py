"""Who may do what on the broker: one Kafka principal per service, and the rights of each.

Plain data, no client library: `sealstream migrate` turns `rights(settings)` into ACLs
(sealstream/adapters/kafka.py `apply_acls`), `sealstream stack up` makes a password for every
principal of `LOCAL_PRINCIPALS`, and docs/operations.md ("Broker authentication and ACLs") shows
the same table. Anything not listed here is refused (`allow.everyone.if.no.acl.found=false`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sealstream.settings import KAFKA_OPERATOR, KafkaSettings
from sealstream.settings import TAIL_GROUP_PREFIX as TAIL_GROUP_PREFIX

# The broker itself (inter-broker and controller traffic) and the operator: super users, never
# checked against ACLs. `migrate`, `stack up`, the benchmarks and the tests (as "the operator")
# act as ADMIN.
BROKER = "sealstream-broker"
ADMIN = KAFKA_OPERATOR
GATEWAY = "sealstream-gateway"
ENCRYPTOR = "sealstream-encryptor"
INDEXER = "sealstream-indexer"
DELIVERY = "sealstream-delivery"
ADMIN_API = "sealstream-admin-api"
# Downstream consumers of the message topic (sealstream.consumer, Faust apps): read only.
ML_CONSUMER = "sealstream-ml"
# Services that post straight to the message topic (sealstream.producer).
DIRECT_PRODUCER = "sealstream-producer"
# The reader has no Kafka client: a name with no password and no right, so a client added to it
# by mistake fails at once instead of running as someone else.
READER = "sealstream-reader"

# Consumers that read with assign() (TopicTail, DeadLetterReader) never join a group, but
# librdkafka wants a group id and looks its coordinator up (DESCRIBE on the group): theirs start
# with this: `TAIL_GROUP_PREFIX`, defined in settings (which refuses an ML group prefix
# overlapping it) and re-exported here.

SUPER_USERS = (BROKER, ADMIN)
SERVICE_PRINCIPALS = (
    GATEWAY,
    ENCRYPTOR,
    INDEXER,
    DELIVERY,
    ADMIN_API,
    ML_CONSUMER,
    DIRECT_PRODUCER,
)
LOCAL_PRINCIPALS = (*SUPER_USERS, *SERVICE_PRINCIPALS)

# The principal of each service `sealstream run <name>` starts (the reader has no Kafka client).
BY_SERVICE = {
    "ingest": GATEWAY,
    "encryptor": ENCRYPTOR,
    "indexer": INDEXER,
    "delivery": DELIVERY,
    "admin": ADMIN_API,
    "reader": READER,
}

Resource = Literal["topic", "group"]
Operation = Literal["read", "write", "describe", "describe_configs"]


@dataclass(frozen=True)
class Right:
    """`principal` may do `operation` on the `resource` named `name` (every name starting with
    `name` when `prefixed`). READ and WRITE imply DESCRIBE in Kafka."""

    principal: str
    operation: Operation
    resource: Resource
    name: str
    prefixed: bool = False


def rights(kafka: KafkaSettings) -> list[Right]:
    """Every right of every service principal for the topics and groups `kafka` names.

    Why each one is needed (the client that uses it):
    - gateway: publishes posts (idempotent producer: WRITE on the topic is enough since
      Kafka 2.8, KIP-679), its readiness lists the topic (DESCRIBE, implied by WRITE);
    - encryptor/indexer: consume the message topic in their group, dead-letter poison records;
      the encryptor also publishes what it stored to the change topic;
    - delivery: reads the change topic with assign() (no group membership, no commits; its
      client still looks up the coordinator of its throwaway group id);
    - admin API: publishes deletions to the change topic; chat deletion reads the end offsets
      of the message topic (a consumer whose throwaway group id is tail-prefixed) and the
      committed offsets of both worker groups; its dead-letter
      routes read the dead-letter topic with assign() (`DeadLetterReader`: a throwaway group id
      under `TAIL_GROUP_PREFIX`, never joined nor committed) and replay letters into the
      message topic (WRITE);
    - ML consumer: reads the message topic in groups of its own prefix, nothing else;
    - direct producer: publishes to the message topic.
    """
    messages, dlq, changes = kafka.messages_topic, kafka.dead_letter_topic, kafka.changes_topic
    return [
        Right(GATEWAY, "write", "topic", messages),
        Right(ENCRYPTOR, "read", "topic", messages),
        Right(ENCRYPTOR, "read", "group", kafka.encryptor_group),
        Right(ENCRYPTOR, "write", "topic", dlq),
        Right(ENCRYPTOR, "write", "topic", changes),
        Right(INDEXER, "read", "topic", messages),
        Right(INDEXER, "read", "group", kafka.indexer_group),
        Right(INDEXER, "write", "topic", dlq),
        Right(DELIVERY, "read", "topic", changes),
        Right(DELIVERY, "describe", "group", TAIL_GROUP_PREFIX, prefixed=True),
        Right(ADMIN_API, "write", "topic", changes),
        Right(ADMIN_API, "describe", "topic", messages),
        Right(ADMIN_API, "describe", "group", kafka.encryptor_group),
        Right(ADMIN_API, "describe", "group", kafka.indexer_group),
        Right(ADMIN_API, "read", "topic", dlq),
        Right(ADMIN_API, "describe", "group", TAIL_GROUP_PREFIX, prefixed=True),
        Right(ADMIN_API, "write", "topic", messages),
        # The retention run destroys topic keys past the retention the broker applies to the
        # topic (sealstream/keys/topic_keys.py), which it reads from the topic's config.
        Right(ADMIN_API, "describe_configs", "topic", messages),
        Right(ML_CONSUMER, "read", "topic", messages),
        Right(ML_CONSUMER, "read", "group", kafka.ml_group_prefix, prefixed=True),
        Right(DIRECT_PRODUCER, "write", "topic", messages),
    ]
