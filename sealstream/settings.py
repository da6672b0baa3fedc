"""Typed configuration: one settings object per process, built once at start-up and passed down.

Every value comes from environment variables with the ``SEALSTREAM_`` prefix (nested values with a
double underscore, e.g. ``SEALSTREAM_KAFKA__BOOTSTRAP``). Defaults point at the local stack started
by ``sealstream stack up``; its ports sit in the 1xxxx range so they never collide with a system
Postgres/Redis/Kafka a developer may already run. Secrets are ``SecretStr`` and print masked.
Nothing here connects to anything.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_STACK_DIR = Path(".stack")
# Credentials of the local stack only (loopback, throwaway data); production sets its own.
LOCAL_POSTGRES_PASSWORD = "sealstream-local"  # noqa: S105 - local stack only, refused in production
LOCAL_AUTH_SECRET = "local-stack-only-not-a-secret-0123456789"  # noqa: S105 - idem
# The Kafka super user `migrate` and other operator commands run as (sealstream/kafka_principals.py).
KAFKA_OPERATOR = "sealstream-admin"
# Consumers that never join a group (TopicTail, DeadLetterReader) take a throwaway group id
# starting with this (sealstream/kafka_principals.py re-exports it).
TAIL_GROUP_PREFIX = "sealstream-tail-"

# Local-stack ports. docker-compose.yml publishes the same numbers (a test checks they agree).
KAFKA_PORT = 19092
KAFKA_CONTROLLER_PORT = 19093
CASSANDRA_PORT = 19042
CASSANDRA_STORAGE_PORT = 17000
OPENSEARCH_PORT = 19200
OPENSEARCH_TRANSPORT_PORT = 19300
POSTGRES_PORT = 15432
REDIS_PORT = 16379
OPENBAO_PORT = 18200
S3PROXY_PORT = 19000
INGEST_PORT = 8443
READER_PORT = 8444
ENCRYPTOR_PORT = 8445
INDEXER_PORT = 8446
ADMIN_PORT = 8447
DELIVERY_PORT = 8448


class StackSettings(BaseSettings):
    """How the local stack is laid out and sized (``SEALSTREAM_STACK_*``)."""

    model_config = SettingsConfigDict(env_prefix="SEALSTREAM_STACK_", frozen=True)

    dir: Path = DEFAULT_STACK_DIR
    kafka_port: int = KAFKA_PORT
    kafka_controller_port: int = KAFKA_CONTROLLER_PORT
    cassandra_port: int = CASSANDRA_PORT
    cassandra_storage_port: int = CASSANDRA_STORAGE_PORT
    opensearch_port: int = OPENSEARCH_PORT
    opensearch_transport_port: int = OPENSEARCH_TRANSPORT_PORT
    postgres_port: int = POSTGRES_PORT
    redis_port: int = REDIS_PORT
    openbao_port: int = OPENBAO_PORT
    s3proxy_port: int = S3PROXY_PORT
    # Heaps are sized so all six servers fit together in a few GiB (see README "Memory").
    kafka_heap_mb: int = 512
    cassandra_heap_mb: int = 1024
    opensearch_heap_mb: int = 768
    s3proxy_heap_mb: int = 256
    # Durability of the local stack (docs/operations.md, "Durability"). The defaults sync before
    # acknowledging; the other values exist only to measure what that costs (docs/stack.md).
    postgres_fsync: bool = True
    cassandra_commitlog_sync: Literal["periodic", "group", "batch"] = "batch"
    cassandra_commitlog_group_window_ms: int = Field(default=10, ge=1)


class KafkaSettings(BaseModel):
    model_config = {"frozen": True}

    bootstrap: str = f"127.0.0.1:{KAFKA_PORT}"
    # Broker authentication (docs/operations.md, "Broker authentication and ACLs"). Locally
    # SASL/SCRAM over plaintext on 127.0.0.1; production uses SASL_SSL (with `ssl_ca_location`).
    security_protocol: Literal["PLAINTEXT", "SASL_PLAINTEXT", "SASL_SSL"] = "SASL_PLAINTEXT"
    sasl_mechanism: Literal["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"] = "SCRAM-SHA-512"
    # The principal this process runs as. Unset: a service started by `sealstream run` takes
    # its own (sealstream/kafka_principals.py); any other process (migrate, benchmarks, tests)
    # acts as the operator, `KAFKA_OPERATOR`, whose password only an operator's file holds.
    username: str | None = None
    # Unset: read from `credentials_file` (a JSON object principal -> password), which
    # `sealstream stack up` writes (0600) for the local stack; production mounts its own.
    password: SecretStr | None = None
    credentials_file: Path = DEFAULT_STACK_DIR / "kafka" / "credentials.json"
    # CA bundle that signed the brokers' certificates (SASL_SSL); unset: the system's.
    ssl_ca_location: Path | None = None
    # Consumer groups of the ML consumer principal start with this (a prefixed ACL allows them).
    ml_group_prefix: str = "sealstream-ml-"
    messages_topic: str = "sealstream.messages.v1"
    dead_letter_topic: str = "sealstream.messages.dlq.v1"
    # What the encryptor stored (schemas/changes.py): ciphertext and ids only, read by delivery.
    changes_topic: str = "sealstream.changes.v1"
    encryptor_group: str = "sealstream-encryptor"
    indexer_group: str = "sealstream-indexer"
    partitions: int = 6
    # Records are sealed (seal_records), and a topic key is destroyed once every record sealed
    # under it is past this retention (docs/security.md): keep it short all the same.
    retention_ms: int = 24 * 3600 * 1000
    # Topic durability (docs/operations.md, "Durability"): the local broker is alone, so 1 and 1;
    # production runs 3 brokers with replication_factor 3 and min_insync_replicas 2.
    replication_factor: int = Field(default=1, ge=1)
    min_insync_replicas: int = Field(default=1, ge=1)
    # The workers' consumer group membership (sealstream.streaming, docs/operations.md "Consumer
    # runtime"). A crashed worker's partitions move to the others after session_timeout_ms.
    session_timeout_ms: int = Field(default=10_000, ge=1_000)
    heartbeat_interval_ms: int = Field(default=2_000, ge=100)
    # A member that does not poll for this long is removed from the group. The runtime keeps
    # polling (partitions paused) while a batch is held by retries, so only a stuck worker hits it.
    max_poll_interval_ms: int = Field(default=300_000, ge=1_000)
    # How long a revocation waits for the batch in hand to finish (then commits it) before it
    # abandons that partition's records uncommitted to the new owner. Below max_poll_interval_ms.
    revoke_wait_ms: int = Field(default=5_000, ge=0)
    # Sealed message topic (docs/format.md "Sealed Kafka records", docs/operations.md "Topic
    # keys"): producers seal every record's value under the topic key of the current rotation
    # slot; consumers open it. Off: producers publish plaintext and consumers still open sealed
    # records (so switching it off never dead-letters what was sealed before), only to measure
    # the cost (`sealstream bench pipeline`) or to read an old plaintext backlog.
    seal_records: bool = True
    # One topic data key per topic per slot of this length; every producer uses the same one.
    topic_key_rotation_seconds: int = Field(default=3600, ge=60, le=7 * 24 * 3600)
    # How long a consumer keeps a topic key it unwrapped (memory only, looked up by key id).
    topic_key_cache_seconds: float = Field(default=300.0, gt=0)
    # Added to retention + segment roll before a topic key is destroyed: producers' clock skew,
    # the broker's log.retention.check.interval.ms (5 min) and file.delete.delay.ms (1 min).
    topic_key_destroy_grace_ms: int = Field(default=15 * 60 * 1000, ge=0)

    def acting_as(self, principal: str) -> KafkaSettings:
        """These settings with `principal` as the username, unless one was configured: the
        configured one (production, one principal per process) always wins, with its password.

        Raises `ValueError` when a password is configured without a username: whose password it
        is cannot be guessed, so the message names the username setting and `principal`, never
        the password.
        """
        if self.username is not None:
            return self
        if self.password is not None:
            raise ValueError(
                "SEALSTREAM_KAFKA__PASSWORD is set but SEALSTREAM_KAFKA__USERNAME is not: set "
                f"SEALSTREAM_KAFKA__USERNAME to the principal that password belongs to "
                f"(this process expects {principal!r} unless your broker names it otherwise)"
            )
        return self.model_copy(update={"username": principal})

    @property
    def principal(self) -> str:
        """The Kafka principal (SASL username) this process authenticates as."""
        return self.username or KAFKA_OPERATOR

    def resolved_password(self) -> SecretStr:
        """The password of `principal`: `password`, else its entry in `credentials_file`.

        Raises `ValueError` naming the setting to set; the password is never in the message.
        """
        if self.password is not None:
            return self.password
        try:
            known = json.loads(self.credentials_file.read_text())
        except FileNotFoundError:
            known = {}
        except ValueError:
            raise ValueError(f"kafka.credentials_file {self.credentials_file}: not JSON") from None
        if not isinstance(known, dict) or not isinstance(known.get(self.principal), str):
            raise ValueError(
                f"no Kafka password for principal {self.principal!r}: set "
                "SEALSTREAM_KAFKA__PASSWORD, or run `sealstream stack up` so that "
                f"{self.credentials_file} holds it"
            )
        return SecretStr(known[self.principal])

    @model_validator(mode="after")
    def _check_ml_group_prefix(self) -> KafkaSettings:
        # The ML principal may READ every group starting with the prefix (a prefixed ACL): one
        # that also matches a worker group would let a leaked ML credential join it and commit
        # past records the worker never stored. Two prefixes share groups iff one starts with
        # the other.
        prefix = self.ml_group_prefix
        if not prefix:
            raise ValueError("kafka.ml_group_prefix must not be empty (it would match every group)")
        others = {
            "kafka.encryptor_group": self.encryptor_group,
            "kafka.indexer_group": self.indexer_group,
            "the tail group prefix": TAIL_GROUP_PREFIX,
        }
        for name, other in others.items():
            if other.startswith(prefix) or prefix.startswith(other):
                raise ValueError(
                    f"kafka.ml_group_prefix {prefix!r} overlaps {name} {other!r}: the ML "
                    "consumer could join that group; pick a prefix that is not the start of it and "
                    "does not start with it"
                )
        return self

    @model_validator(mode="after")
    def _check_group_timings(self) -> KafkaSettings:
        if self.max_poll_interval_ms < self.session_timeout_ms:
            raise ValueError("kafka.max_poll_interval_ms must be >= kafka.session_timeout_ms")
        if self.heartbeat_interval_ms >= self.session_timeout_ms:
            raise ValueError("kafka.heartbeat_interval_ms must be < kafka.session_timeout_ms")
        if self.revoke_wait_ms >= self.max_poll_interval_ms:
            raise ValueError("kafka.revoke_wait_ms must be < kafka.max_poll_interval_ms")
        if self.topic_key_rotation_seconds * 1000 > self.retention_ms:
            # A key lives until its slot's end + retention: a slot longer than the retention
            # would keep the records of its first hours openable (in a backup, with Postgres and
            # the KMS) for up to slot + retention, well past the retention.
            raise ValueError(
                "kafka.topic_key_rotation_seconds must be at most kafka.retention_ms / 1000 (a "
                "topic key outlives its slot by the retention)"
            )
        return self


ConsistencyName = Literal[
    "ONE", "TWO", "THREE", "QUORUM", "ALL", "LOCAL_QUORUM", "EACH_QUORUM", "LOCAL_ONE"
]


class CassandraSettings(BaseModel):
    model_config = {"frozen": True}

    hosts: tuple[str, ...] = ("127.0.0.1",)
    port: int = CASSANDRA_PORT
    keyspace: str = "sealstream"
    replication: str = "{'class': 'SimpleStrategy', 'replication_factor': 1}"
    # A write is acknowledged (and the encryptor commits its offset) once this many replicas have
    # it in their commit log; LOCAL_QUORUM is 1 of 1 locally and 2 of 3 in production. Reads use
    # LOCAL_QUORUM too, so a read after an acknowledged write sees it (2 + 2 > 3).
    write_consistency: ConsistencyName = "LOCAL_QUORUM"
    read_consistency: ConsistencyName = "LOCAL_QUORUM"


class PostgresSettings(BaseModel):
    model_config = {"frozen": True}

    host: str = "127.0.0.1"
    port: int = POSTGRES_PORT
    database: str = "sealstream"
    user: str = "sealstream"
    password: SecretStr = SecretStr(LOCAL_POSTGRES_PASSWORD)
    schema_name: str = "sealstream"

    def conninfo(self) -> str:
        """libpq connection string; only built where a connection is opened, never logged."""
        return (
            f"host={self.host} port={self.port} dbname={self.database} user={self.user} "
            f"password={self.password.get_secret_value()} options=-csearch_path={self.schema_name}"
        )


class RedisSettings(BaseModel):
    model_config = {"frozen": True}

    url: str = f"redis://127.0.0.1:{REDIS_PORT}/0"
    key_prefix: str = "sealstream:"


class KmsCluster(BaseModel):
    """A further Vault/OpenBao cluster (one per region) holding the master keys of its tenants."""

    model_config = {"frozen": True}

    address: str
    token: SecretStr | None = None
    token_file: Path | None = None

    @model_validator(mode="after")
    def _check(self) -> KmsCluster:
        # Never fall back on the default cluster's token: that would send it to another server.
        if self.token is None and self.token_file is None:
            raise ValueError("a KMS cluster needs a token or a token_file")
        return self


class VaultSettings(BaseModel):
    model_config = {"frozen": True}

    address: str = f"http://127.0.0.1:{OPENBAO_PORT}"
    token: SecretStr | None = None
    # Local stack only: `stack up` writes the root token here when it initialises OpenBao.
    token_file: Path = DEFAULT_STACK_DIR / "openbao" / "root-token"
    transit_mount: str = "transit"
    default_key: str = "sealstream-cmk"
    # Further KMS clusters by region name (JSON in SEALSTREAM_VAULT__CLUSTERS, e.g.
    # `{"eu": {"address": "https://kms.eu:8200", "token_file": "/run/secrets/kms-eu"}}`). A tenant
    # registered with a region keeps its master key there (docs/operations.md).
    clusters: dict[str, KmsCluster] = Field(default_factory=dict)

    def for_region(self, region: str) -> VaultSettings:
        """These settings pointed at the cluster of `region` (KeyError if none is configured)."""
        cluster = self.clusters[region]
        return self.model_copy(
            update={
                "address": cluster.address,
                "token": cluster.token,
                # The validator guarantees a token or a file: the default file is never read.
                "token_file": cluster.token_file or self.token_file,
                "clusters": {},
            }
        )

    def resolved_token(self) -> SecretStr:
        if self.token is not None:
            return self.token
        if self.token_file.exists():
            return SecretStr(self.token_file.read_text().strip())
        raise ValueError(
            "no Vault/OpenBao token: set SEALSTREAM_VAULT__TOKEN, or run `sealstream stack up` "
            f"so that {self.token_file} exists"
        )


class OpenSearchSettings(BaseModel):
    model_config = {"frozen": True}

    url: str = f"http://127.0.0.1:{OPENSEARCH_PORT}"
    index_prefix: str = "sealstream"


class ObjectStoreSettings(BaseModel):
    """The S3-compatible object store that holds encrypted attachments (``SEALSTREAM_OBJECT_STORE__*``,
    adapter `sealstream.adapters.object_store`, docs/operations.md "Object store").

    Locally S3Proxy (`sealstream stack up`), which writes its generated credentials to
    `credentials_file`; production sets `access_key` and `secret_key` (or a file of its own).
    """

    model_config = {"frozen": True}

    endpoint: str = f"http://127.0.0.1:{S3PROXY_PORT}"
    bucket: str = Field(default="sealstream-attachments", min_length=3, max_length=63)
    region: str = "us-east-1"
    access_key: SecretStr | None = None
    secret_key: SecretStr | None = None
    # Local stack only: `stack up` writes `{"access_key": ..., "secret_key": ...}` here (0600).
    credentials_file: Path = DEFAULT_STACK_DIR / "s3proxy" / "credentials.json"
    # Path-style URLs (`endpoint/bucket/key`): S3Proxy and most self-hosted stores need them.
    path_style: bool = True
    # Files at least this large go up as multipart uploads of parts this size; S3 refuses parts
    # under 5 MiB (except the last) and more than 10,000 parts, so 8 MiB covers files to 78 GiB.
    part_size_bytes: int = Field(default=8 * 1024 * 1024, ge=5 * 1024 * 1024, le=5 * 1024**3)
    # botocore: connection set-up and per-read socket timeouts, attempts per request (first try
    # included; retries back off, "standard" mode: throttling, 5xx and connection errors).
    connect_timeout_seconds: float = Field(default=3.0, gt=0)
    read_timeout_seconds: float = Field(default=30.0, gt=0)
    max_attempts: int = Field(default=4, ge=1, le=20)
    # `sealstream attachments sweep-uploads` aborts multipart uploads started longer ago than this.
    abandoned_upload_hours: float = Field(default=24.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> ObjectStoreSettings:
        if (self.access_key is None) != (self.secret_key is None):
            raise ValueError("object_store: set both access_key and secret_key, or neither")
        return self

    def resolved_credentials(self) -> tuple[str, SecretStr]:
        """(access key id, secret access key): from the settings, else from `credentials_file`.

        Raises ValueError naming what to set when neither is there.
        """
        if self.access_key is not None and self.secret_key is not None:
            return self.access_key.get_secret_value(), self.secret_key
        if self.credentials_file.exists():
            data = json.loads(self.credentials_file.read_text())
            return str(data["access_key"]), SecretStr(str(data["secret_key"]))
        raise ValueError(
            "no object-store credentials: set SEALSTREAM_OBJECT_STORE__ACCESS_KEY and "
            f"SEALSTREAM_OBJECT_STORE__SECRET_KEY, or run `sealstream stack up` so that "
            f"{self.credentials_file} exists"
        )


class KeyCacheSettings(BaseModel):
    """How long and how many plaintext DEKs a process keeps in memory (never anywhere else)."""

    model_config = {"frozen": True}

    max_entries: int = Field(default=100_000, ge=1)
    ttl_seconds: float = Field(default=300.0, gt=0)
    # Upper bound on how long a process may keep encrypting with an old version if it missed
    # the Redis invalidation message (normally it learns of a rotation within milliseconds).
    pointer_ttl_seconds: float = Field(default=30.0, gt=0)
    redis_ttl_seconds: int = Field(default=3600, ge=1)
    default_tenant: str = "default"
    # Rotation policy (docs/operations.md). A chat's DEK is rotated once its current version is
    # older than `rotate_max_age_days` (by `sealstream keys rotate-due`) or has sealed
    # `rotate_max_messages` messages (by the encryptor, as soon as it crosses the limit).
    # None turns a rule off.
    rotate_max_age_days: float | None = Field(default=90.0, gt=0)
    rotate_max_messages: int | None = Field(default=1_000_000, ge=1)


class AuthSettings(BaseModel):
    """Signed bearer tokens (HS256 JWT, user id in `sub`) shared by the gateway and the reader."""

    model_config = {"frozen": True}

    secret: SecretStr = SecretStr(LOCAL_AUTH_SECRET)
    issuer: str = "sealstream"
    token_ttl_seconds: int = Field(default=3600, ge=60)


class HttpLimits(BaseModel):
    """What one listener accepts from a client before refusing (docs/security.md, "Limits").

    Answers: a request head (request line and headers) over `max_header_bytes` gets 431; a body
    over `max_body_bytes` (by Content-Length or counted as it streams in, chunked or not) gets
    413; a WebSocket message over `max_ws_frame_bytes` closes the socket with 1009; a connection
    beyond `max_connections` open at once gets 503 (with Retry-After) and is closed; a request
    head not complete within `head_timeout_seconds` of connecting (or of the request's first
    byte), or a body not complete within `body_timeout_seconds` after its head, gets 408 and the
    connection is closed. A streamed attachment download whose client takes none of the next
    piece within `send_timeout_seconds` is cut off (the reader; docs/operations.md).
    """

    model_config = {"frozen": True}

    max_header_bytes: int = Field(default=16 * 1024, ge=1024)
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    # A message frame holds at most 16 KiB of text, which JSON escaping may grow a few times.
    max_ws_frame_bytes: int = Field(default=128 * 1024, ge=1024)
    max_connections: int = Field(default=1000, ge=1)
    # A request head (or, once the head is in, its body) not complete within these seconds of
    # the connection opening / the request starting gets 408 and the connection is closed.
    head_timeout_seconds: float = Field(default=10.0, gt=0)
    body_timeout_seconds: float = Field(default=60.0, gt=0)
    # A streamed response (an attachment download) whose client takes none of the next piece
    # (about 1 MiB) within these seconds is cut off: its thread and store connection are freed.
    send_timeout_seconds: float = Field(default=60.0, gt=0)


class HttpSettings(BaseModel):
    """Where an HTTP service listens; TLS is on when a certificate and key are given."""

    model_config = {"frozen": True}

    host: str = "127.0.0.1"
    port: int
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # e.g. SEALSTREAM_INGEST__LIMITS='{"max_body_bytes": 2097152}' (JSON, like every nested value)
    limits: HttpLimits = Field(default_factory=HttpLimits)

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None and self.tls_key is not None


# One subclass per service so each has its own default port: an environment that sets only
# `SEALSTREAM_READER__HOST` must still get the reader's port, not a validation error.
class IngestHttp(HttpSettings):
    port: int = INGEST_PORT
    # A full batch (500 messages of up to 16 KiB) must fit in one body.
    limits: HttpLimits = Field(default_factory=lambda: HttpLimits(max_body_bytes=10 * 1024 * 1024))


class ReaderHttp(HttpSettings):
    port: int = READER_PORT


class EncryptorHttp(HttpSettings):
    port: int = ENCRYPTOR_PORT


class IndexerHttp(HttpSettings):
    port: int = INDEXER_PORT


class AdminHttp(HttpSettings):
    port: int = ADMIN_PORT


class DeliveryHttp(HttpSettings):
    """Live delivery (`sealstream run delivery`): where it listens and what it holds per client
    (docs/operations.md, "Live delivery")."""

    port: int = DELIVERY_PORT
    # Most events a resume may replay before it answers `cursor_expired` (the client then
    # refetches history from the reader): bounds the Cassandra read and the burst a reconnect
    # costs.
    max_resume_events: int = Field(default=1000, ge=1, le=100_000)
    # Events waiting to be written to one slow client; past it the client is dropped
    # (`error` `too_slow`, socket closed) rather than holding memory without bound.
    max_queued_events: int = Field(default=1000, ge=10)
    # Chats one WebSocket may follow at once.
    max_subscriptions: int = Field(default=100, ge=1)
    # SSE comment lines `: keep-alive` this often, so proxies keep an idle stream open.
    sse_keepalive_seconds: float = Field(default=15.0, gt=0)


class GatewaySettings(BaseModel):
    """How long the gateway waits for each dependency, and its idempotency window
    (docs/operations.md, "Deadlines and idempotency"). A dependency that does not answer in
    time costs the client a `503` with `Retry-After`, never a hang."""

    model_config = {"frozen": True}

    # Pool checkout, connection set-up, `statement_timeout` and a client-side watchdog per use
    # of a connection (a hung server answers nothing, not even a statement timeout).
    postgres_deadline_seconds: float = Field(default=2.0, gt=0)
    # Wait for Kafka's acknowledgement; librdkafka keeps trying in the background until its own
    # delivery timeout, and a retry re-publishes under the same message id anyway.
    kafka_deadline_seconds: float = Field(default=5.0, gt=0)
    # Each Vault/OpenBao call of chat creation, retries included.
    kms_deadline_seconds: float = Field(default=3.0, gt=0)
    # The read of a message's row before an edit or a sender's deletion (waiting for a thread
    # and a first connection included); posts never read Cassandra.
    cassandra_deadline_seconds: float = Field(default=2.0, gt=0)
    idempotency_window_hours: float = Field(default=24.0, gt=0)
    # Keys the fingerprints of message texts in the claim table (never a plain hash of a text,
    # which a Postgres leak would expose to a dictionary attack). Unset: derived from
    # `auth.secret`; set it separately so that rotating the auth secret keeps open claims.
    fingerprint_secret: SecretStr | None = None

    @field_validator("fingerprint_secret")
    @classmethod
    def _fingerprint_secret(cls, value: SecretStr | None) -> SecretStr | None:
        # Refused, not replaced: an empty value (an unset variable passed on) used to fall
        # back silently to the auth secret.
        if value is not None and len(value.get_secret_value().encode()) < 16:
            raise ValueError(
                "gateway.fingerprint_secret: at least 16 bytes; unset it to derive the key "
                "from auth.secret"
            )
        return value

    def fingerprint_key(self, auth: AuthSettings) -> bytes:
        secret = self.fingerprint_secret or auth.secret
        return secret.get_secret_value().encode()


class WorkerLeaseSettings(BaseModel):
    """How a process that makes message ids leases its Snowflake worker id from Postgres
    (``SEALSTREAM_WORKER_LEASE__*``, docs/operations.md "Message ids across processes")."""

    model_config = {"frozen": True}

    # A crashed holder's id is free again after this long (by the database's clock).
    ttl_seconds: float = Field(default=30.0, gt=0)
    renew_seconds: float = Field(default=10.0, gt=0)
    # The process stops making ids this long before the lease it last renewed would expire.
    margin_seconds: float = Field(default=5.0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> WorkerLeaseSettings:
        if self.renew_seconds + self.margin_seconds >= self.ttl_seconds:
            raise ValueError(
                "worker_lease: renew_seconds + margin_seconds must be below ttl_seconds "
                "(else a healthy process would stop making ids between two renewals)"
            )
        return self


class DeletionSettings(BaseModel):
    model_config = {"frozen": True}

    # Chat deletion waits at most this long for both worker groups to commit past the deletion
    # point before its second sweep of the index (the receipt says whether they got there).
    sweep_seconds: float = Field(default=60.0, ge=0, le=3600)


class EditSettings(BaseModel):
    model_config = {"frozen": True}

    # How long after posting a sender may edit or delete their own message (seconds, from the
    # message id's time). The gateway refuses later changes (422) and the encryptor dead-letters
    # them; live delivery's resume looks this far back for edits a client missed.
    window_seconds: int = Field(default=48 * 3600, ge=60, le=30 * 24 * 3600)


class AttachmentSettings(BaseModel):
    """Attachment files (``SEALSTREAM_ATTACHMENTS__*``; docs/operations.md "Attachments",
    format in docs/format.md "Attachment files")."""

    model_config = {"frozen": True}

    # Largest file the gateway accepts (plaintext bytes); a larger body is refused with 413
    # as soon as it passes the limit, and nothing of it stays in the object store.
    max_bytes: int = Field(default=256 * 1024 * 1024, ge=1, le=5 * 1024**4)
    # Content types an upload may declare (exact match of the media type, parameters such as
    # `; charset=` ignored); anything else is refused with 415. JSON list in the environment.
    content_types: tuple[str, ...] = (
        "image/png",
        "image/jpeg",
        "image/gif",
        "image/webp",
        "application/pdf",
        "text/plain",
        "audio/mpeg",
        "audio/ogg",
        "video/mp4",
        "application/zip",
        "application/octet-stream",
    )
    # Plaintext bytes per encrypted segment (file format v1; the Range granularity).
    segment_size: int = Field(default=64 * 1024, ge=64, le=16 * 1024 * 1024)
    # Attachments one message may reference.
    max_per_message: int = Field(default=10, ge=1, le=100)
    # Uploads one user may have under way at once on one gateway; more are refused with 429.
    # Each upload holds one of the gateway's upload threads (`ingest.service.UPLOAD_THREADS`)
    # for its whole transfer, however slow: without a share per user, one user trickling that
    # many bodies held every other user's uploads.
    uploads_per_user: int = Field(default=4, ge=1)
    # Downloads under way at once on one reader (beyond: 503 with Retry-After) and of one user
    # on it (beyond: 429). A download holds a thread and a few MiB of plaintext for as long as
    # its client takes to read it: these bound the reader's memory whatever clients do.
    downloads_at_once: int = Field(default=64, ge=1)
    downloads_per_user: int = Field(default=16, ge=1)

    @model_validator(mode="after")
    def _downloads_cover_a_message(self) -> AttachmentSettings:
        # A client showing a message fetches its files side by side: never refuse that.
        if self.downloads_per_user < self.max_per_message:
            raise ValueError(
                f"downloads_per_user ({self.downloads_per_user}) must be at least "
                f"max_per_message ({self.max_per_message})"
            )
        return self


class Settings(BaseSettings):
    """Connection settings shared by every Sealstream process (``SEALSTREAM_*``)."""

    model_config = SettingsConfigDict(
        env_prefix="SEALSTREAM_", env_nested_delimiter="__", frozen=True, extra="ignore"
    )

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    cassandra: CassandraSettings = Field(default_factory=CassandraSettings)
    postgres: PostgresSettings = Field(default_factory=PostgresSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    vault: VaultSettings = Field(default_factory=VaultSettings)
    opensearch: OpenSearchSettings = Field(default_factory=OpenSearchSettings)
    keys: KeyCacheSettings = Field(default_factory=KeyCacheSettings)
    object_store: ObjectStoreSettings = Field(default_factory=ObjectStoreSettings)
    attachments: AttachmentSettings = Field(default_factory=AttachmentSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    ingest: IngestHttp = Field(default_factory=IngestHttp)
    reader: ReaderHttp = Field(default_factory=ReaderHttp)
    # Health and metrics endpoints of the two consumer workers.
    encryptor_http: EncryptorHttp = Field(default_factory=EncryptorHttp)
    indexer_http: IndexerHttp = Field(default_factory=IndexerHttp)
    # Key-lifecycle admin API (operators only: tokens with the admin role).
    admin: AdminHttp = Field(default_factory=AdminHttp)
    # Live delivery of stored changes to subscribed clients (WebSocket and SSE).
    delivery: DeliveryHttp = Field(default_factory=DeliveryHttp)
    # The worker bits of the Snowflake message ids this process makes. None (the default): lease
    # a free one from Postgres; a number: lease exactly that one (start-up fails if it is taken).
    worker_id: int | None = Field(default=None, ge=0, le=1023)
    worker_lease: WorkerLeaseSettings = Field(default_factory=WorkerLeaseSettings)
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    deletion: DeletionSettings = Field(default_factory=DeletionSettings)
    edits: EditSettings = Field(default_factory=EditSettings)
    # "production" refuses the local-stack defaults (auth secret, no TLS) at start-up.
    environment: Literal["local", "production"] = "local"

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.kafka.partitions < 1:
            raise ValueError("kafka.partitions must be at least 1")
        if self.kafka.min_insync_replicas > self.kafka.replication_factor:
            raise ValueError(
                "kafka.min_insync_replicas must not exceed kafka.replication_factor "
                "(every acks=all write would be refused)"
            )
        if self.environment == "production":
            if self.auth.secret.get_secret_value() == LOCAL_AUTH_SECRET:
                raise ValueError("auth.secret is the local default; set SEALSTREAM_AUTH__SECRET")
            if len(self.auth.secret.get_secret_value()) < 32:
                raise ValueError("auth.secret must be at least 32 characters")
            if not (self.ingest.tls and self.reader.tls and self.admin.tls and self.delivery.tls):
                raise ValueError(
                    "production needs TLS: set ingest/reader/admin/delivery tls_cert and tls_key"
                )
            if self.postgres.password.get_secret_value() == LOCAL_POSTGRES_PASSWORD:
                raise ValueError("postgres.password is the local default")
            if self.kafka.security_protocol != "SASL_SSL":
                raise ValueError(
                    "kafka.security_protocol must be SASL_SSL in production (credentials and "
                    "records would cross the network in clear)"
                )
        return self
