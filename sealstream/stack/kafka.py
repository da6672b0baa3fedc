"""The local-stack Kafka broker: one KRaft process that is both broker and controller.

This module owns what is specific to Kafka: the Maven-resolved runtime (``stack/kafka/pom.xml``, no
tarball download), ``server.properties`` and ``log4j2.properties`` in the server's data folder, the
one-time storage format (cluster id kept in ``cluster-id``), the ``java`` command line, a probe
that asks the broker for cluster metadata over the Kafka protocol, and authentication: one
password per principal in ``credentials.json`` (0600), SASL listeners, ACL enforcement, and the
SCRAM credentials set after every start (docs/operations.md, "Broker authentication and ACLs").
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import stat
import subprocess
import uuid
from pathlib import Path
from typing import ClassVar

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient
from pydantic import SecretStr

from sealstream.adapters.kafka import kafka_client_config, upsert_scram_credentials
from sealstream.kafka_principals import ADMIN, BROKER, LOCAL_PRINCIPALS
from sealstream.settings import KafkaSettings
from sealstream.stack.base import Server, StackError, write_private

PLAIN_MODULE = "org.apache.kafka.common.security.plain.PlainLoginModule"
SCRAM_MODULE = "org.apache.kafka.common.security.scram.ScramLoginModule"
# Single-node KRaft: the broker is node 1 and also the only controller voter.
NODE_ID = 1
MAIN_CLASS = "kafka.Kafka"
STORAGE_TOOL_CLASS = "kafka.tools.StorageTool"
# The broker jar's name carries the release, e.g. .../kafka_2.13-4.1.2.jar.
_BROKER_JAR = re.compile(r"kafka_2\.13-([0-9][^/:]*)\.jar")
_POM_VERSION = re.compile(r"<kafka\.version>\s*([^<\s]+)\s*</kafka\.version>")

# Console appender only: the runner sends stdout to server.log, so one file holds the whole story.
# Request and state-change loggers stay at WARN, they log every request at INFO/TRACE otherwise.
# log4j's own shutdown hook is off: it would stop logging while Kafka's hook is still shutting down.
LOG4J2_PROPERTIES = """\
# Written by sealstream/stack/kafka.py; rewritten on every `stack up`.
status = warn
shutdownHook = disable
appender.stdout.type = Console
appender.stdout.name = STDOUT
appender.stdout.layout.type = PatternLayout
appender.stdout.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = info
rootLogger.appenderRef.stdout.ref = STDOUT
logger.request.name = kafka.request.logger
logger.request.level = warn
logger.statechange.name = state.change.logger
logger.statechange.level = warn
logger.cleaner.name = kafka.log.LogCleaner
logger.cleaner.level = warn
"""


def _new_cluster_id() -> str:
    """A cluster id in Kafka's own format (``Uuid.toString``: URL-safe base64 of 16 bytes).

    Made in Python so that ``prepare()`` does not start a JVM just for ``random-uuid``. Kafka
    refuses ids that start with ``-`` (they read as command-line flags), so those are redrawn.
    """
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode("ascii")
        if not text.startswith("-"):
            return text


class KafkaServer(Server):
    """Apache Kafka 4.x in KRaft mode, listening on 127.0.0.1 only."""

    name: ClassVar[str] = "kafka"

    @property
    def data(self) -> Path:
        """The data folder, 0700: it holds every principal's password and the topics' records,
        and only this user (the broker's and the services') reads it."""
        path = super().data
        mode = path.stat()
        if stat.S_IMODE(mode.st_mode) != 0o700 and mode.st_uid == os.getuid():
            path.chmod(0o700)
        return path

    @property
    def port(self) -> int:
        return self.ctx.settings.kafka_port

    @property
    def controller_port(self) -> int:
        return self.ctx.settings.kafka_controller_port

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def properties_file(self) -> Path:
        return self.data / "server.properties"

    @property
    def log4j_file(self) -> Path:
        return self.data / "log4j2.properties"

    @property
    def log_dir(self) -> Path:
        """Where the broker keeps topic data and the KRaft metadata log (``log.dirs``)."""
        return self.data / "logs"

    @property
    def cluster_id_file(self) -> Path:
        return self.data / "cluster-id"

    # -- install ---------------------------------------------------------------------------------

    def install(self) -> None:
        # Resolves the pom into ~/.m2 once; later calls only compare the pom with the cached copy.
        self.classpath()

    def classpath(self) -> str:
        return self.ctx.maven_classpath(self.name)

    def version(self) -> str:
        """The Kafka release that runs: from the resolved classpath, else from the pom."""
        cached = self.data / "classpath.txt"
        if cached.exists():
            found = _BROKER_JAR.search(cached.read_text())
            if found:
                return found.group(1)
        pom = self.ctx.repo_root / "stack" / self.name / "pom.xml"
        found = _POM_VERSION.search(pom.read_text())
        return found.group(1) if found else "unknown"

    # -- prepare ---------------------------------------------------------------------------------

    @property
    def credentials_file(self) -> Path:
        """JSON object principal -> password, 0600, made once (``SEALSTREAM_KAFKA__CREDENTIALS_FILE``
        of the processes points here)."""
        return self.data / "credentials.json"

    def credentials(self) -> dict[str, str]:
        """The password of every local principal, generated once (256 bits each) and kept; a
        principal added to `LOCAL_PRINCIPALS` later gets one at the next `stack up`."""
        known: dict[str, str] = {}
        if self.credentials_file.exists():
            known = json.loads(self.credentials_file.read_text())
        missing = [p for p in LOCAL_PRINCIPALS if p not in known]
        if missing:
            known.update({principal: secrets.token_urlsafe(32) for principal in missing})
            # A new 0600 file replaces the old one: whoever holds the old one never reads these.
            write_private(self.credentials_file, json.dumps(known, indent=1))
        self.credentials_file.chmod(0o600)
        return known

    def admin_settings(self) -> KafkaSettings:
        """How the stack itself talks to the broker: as the admin, over PLAIN (its static user
        works before any SCRAM credential exists, on a new data folder as on an old one)."""
        return KafkaSettings(
            bootstrap=self.bootstrap,
            sasl_mechanism="PLAIN",
            username=ADMIN,
            password=SecretStr(self.credentials()[ADMIN]),
        )

    def server_properties(self) -> str:
        host = "127.0.0.1"  # loopback only: the local stack is never reachable from outside
        listeners = f"BROKER://{host}:{self.port},CONTROLLER://{host}:{self.controller_port}"
        passwords = self.credentials()
        broker, admin = passwords[BROKER], passwords[ADMIN]
        # PLAIN's users are static (in this 0600 file): the broker, for its own inter-broker and
        # controller connections, and the admin, so `stack up` can create the SCRAM credentials
        # of everyone else on a running cluster. Every service authenticates with SCRAM.
        plain_broker = (
            f'{PLAIN_MODULE} required username="{BROKER}" password="{broker}" '
            f'user_{BROKER}="{broker}" user_{ADMIN}="{admin}";'
        )
        plain_controller = (
            f'{PLAIN_MODULE} required username="{BROKER}" password="{broker}" '
            f'user_{BROKER}="{broker}";'
        )
        lines = [
            "# Written by sealstream/stack/kafka.py; rewritten on every `stack up`.",
            "process.roles=broker,controller",
            f"node.id={NODE_ID}",
            # A static voter set: a one-node quorum never changes, and it needs no
            # `--standalone` bootstrap of a dynamic quorum when the storage is formatted.
            f"controller.quorum.voters={NODE_ID}@{host}:{self.controller_port}",
            f"listeners={listeners}",
            f"advertised.listeners={listeners}",
            "inter.broker.listener.name=BROKER",
            "controller.listener.names=CONTROLLER",
            # Authentication on both listeners (docs/operations.md, "Broker authentication and
            # ACLs"): SCRAM-SHA-512 for clients; production uses SASL_SSL or mTLS instead.
            "listener.security.protocol.map=BROKER:SASL_PLAINTEXT,CONTROLLER:SASL_PLAINTEXT",
            "sasl.enabled.mechanisms=SCRAM-SHA-512,PLAIN",
            "listener.name.broker.sasl.enabled.mechanisms=SCRAM-SHA-512,PLAIN",
            "listener.name.controller.sasl.enabled.mechanisms=PLAIN",
            "sasl.mechanism.inter.broker.protocol=PLAIN",
            "sasl.mechanism.controller.protocol=PLAIN",
            f"listener.name.broker.scram-sha-512.sasl.jaas.config={SCRAM_MODULE} required;",
            f"listener.name.broker.plain.sasl.jaas.config={plain_broker}",
            f"listener.name.controller.plain.sasl.jaas.config={plain_controller}",
            # ACLs: whatever no ACL allows is refused; the broker and the admin are super users.
            "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            "allow.everyone.if.no.acl.found=false",
            f"super.users=User:{BROKER};User:{ADMIN}",
            f"log.dirs={self.log_dir}",
            "num.partitions=6",
            # One broker: every internal topic must accept a replication factor and ISR of 1.
            "offsets.topic.replication.factor=1",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "share.coordinator.state.topic.replication.factor=1",
            "share.coordinator.state.topic.min.isr=1",
            "min.insync.replicas=1",
            # A replica that fell behind never becomes leader (it would drop acknowledged records).
            "unclean.leader.election.enable=false",
            # Kafka's defaults, written out because docs/security.md derives the on-disk bound of
            # the plaintext topic from them: retention is checked every 5 min, and a deleted
            # segment's files are removed 1 min after that.
            "log.retention.check.interval.ms=300000",
            "log.segment.delete.delay.ms=60000",
            # 50 partitions each (the default) make the first consumer group wait on a small box.
            "offsets.topic.num.partitions=6",
            "transaction.state.log.num.partitions=6",
            # Tests and workers join groups right after start; no reason to wait 3 s for others.
            "group.initial.rebalance.delay.ms=0",
            # Faust creates its changelog/repartition topics itself but also relies on this.
            "auto.create.topics.enable=true",
        ]
        return "\n".join(lines) + "\n"

    def prepare(self) -> None:
        # Config files are rewritten every time, so a port change in settings takes effect.
        # Holds the PLAIN passwords: a new 0600 file replaces the old one.
        write_private(self.properties_file, self.server_properties())
        self.log4j_file.write_text(LOG4J2_PROPERTIES)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        cluster_id = self._cluster_id()
        if (self.log_dir / "meta.properties").exists():
            return  # formatted already: formatting again would fail, and is not needed
        self._format(cluster_id)

    def _cluster_id(self) -> str:
        """The cluster id, made once and kept; recovered from the storage if the file was lost."""
        if self.cluster_id_file.exists():
            return self.cluster_id_file.read_text().strip()
        meta = self.log_dir / "meta.properties"
        found = re.search(r"^cluster\.id=(\S+)$", meta.read_text(), re.M) if meta.exists() else None
        cluster_id = found.group(1) if found else _new_cluster_id()
        self.cluster_id_file.write_text(cluster_id + "\n")
        return cluster_id

    def _format(self, cluster_id: str) -> None:
        cmd = [
            *self._java_command(heap_mb=256),
            STORAGE_TOOL_CLASS,
            "format",
            "--cluster-id",
            cluster_id,
            "--config",
            str(self.properties_file),
            # Belt and braces for a half-written storage folder (e.g. a crash mid-format).
            "--ignore-formatted",
        ]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            tail = "\n".join((result.stdout + result.stderr).splitlines()[-30:])
            raise StackError(f"formatting Kafka storage in {self.log_dir} failed:\n{tail}")

    # -- run -------------------------------------------------------------------------------------

    def _java_command(self, heap_mb: int) -> list[str]:
        return [
            self.ctx.java(17),
            f"-Xms{heap_mb}m",
            f"-Xmx{heap_mb}m",
            # The JVM flags of Kafka's own kafka-run-class.sh.
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-XX:InitiatingHeapOccupancyPercent=35",
            "-XX:+ExplicitGCInvokesConcurrent",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.log4j_file}",
            f"-Dkafka.logs.dir={self.data}",
            "-cp",
            self.classpath(),
        ]

    def argv(self) -> list[str]:
        heap_mb = self.ctx.settings.kafka_heap_mb
        return [*self._java_command(heap_mb), MAIN_CLASS, str(self.properties_file)]

    def probe(self) -> str:
        admin = AdminClient(
            kafka_client_config(
                self.admin_settings(),
                {
                    # Quiet: while the broker starts, every refused connection would be logged.
                    "log_level": 0,
                    "socket.connection.setup.timeout.ms": 2000,
                },
            )
        )
        try:
            metadata = admin.list_topics(timeout=3)
        except KafkaException as exc:
            raise StackError(f"Kafka at {self.bootstrap} does not answer: {exc}") from exc
        if NODE_ID not in metadata.brokers:
            raise StackError(f"Kafka at {self.bootstrap} lists no broker {NODE_ID} yet")
        return f"Apache Kafka {self.version()}"

    def after_ready(self) -> None:
        """Give every local principal its SCRAM credential (idempotent: the same passwords are
        set again), on a data folder made by any release."""
        passwords = self.credentials()
        upsert_scram_credentials(
            self.admin_settings(),
            {p: SecretStr(passwords[p]) for p in LOCAL_PRINCIPALS if p != BROKER},
        )
