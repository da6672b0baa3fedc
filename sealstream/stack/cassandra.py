"""Apache Cassandra 5.0 for the local stack, run from Maven Central jars (no tarball, no Docker).

`stack/cassandra/pom.xml` pins `org.apache.cassandra:cassandra-all`; Maven resolves it into ~/.m2
and we start `CassandraDaemon` on that classpath with the JVM flags Cassandra's own launch scripts
would use on JDK 17 (`conf/jvm17-server.options`), a minimal single-node cassandra.yaml and a
small logback.xml, all written under the server's data folder. Start-up is tuned for a 2-core box:
no gossip settling, a short ring delay, one token, small memtables and caches.

No JMX port is opened (we never set `cassandra.jmx.local.port`), so nothing can collide with a
Cassandra a developer runs on 7199; the consequence is that `nodetool` cannot reach this node.
"""

from __future__ import annotations

import json
from pathlib import Path

from sealstream.stack.base import Server, StackError

MAIN_CLASS = "org.apache.cassandra.service.CassandraDaemon"
HOST = "127.0.0.1"
CLUSTER_NAME = "sealstream-local"
#: Initial heap; -Xmx is `StackSettings.cassandra_heap_mb` (see argv()).
INITIAL_HEAP_MB = 256

# The JPMS section of Cassandra 5.0's conf/jvm17-server.options. Cassandra reaches into JDK
# internals (Unsafe, direct buffers, the RMI registry, jamm's object sizing, ...); without these it
# fails at start-up or later with InaccessibleObjectException.
JVM17_MODULE_FLAGS: tuple[str, ...] = (
    "--add-exports", "java.base/jdk.internal.misc=ALL-UNNAMED",
    "--add-exports", "java.management.rmi/com.sun.jmx.remote.internal.rmi=ALL-UNNAMED",
    "--add-exports", "java.rmi/sun.rmi.registry=ALL-UNNAMED",
    "--add-exports", "java.rmi/sun.rmi.server=ALL-UNNAMED",
    "--add-exports", "java.sql/java.sql=ALL-UNNAMED",
    "--add-exports", "java.base/java.lang.ref=ALL-UNNAMED",
    "--add-exports", "jdk.unsupported/sun.misc=ALL-UNNAMED",
    "--add-exports", "jdk.compiler/com.sun.tools.javac.file=ALL-UNNAMED",
    "--add-exports", "jdk.attach/sun.tools.attach=ALL-UNNAMED",
    "--add-opens", "java.base/java.lang.module=ALL-UNNAMED",
    "--add-opens", "java.base/jdk.internal.loader=ALL-UNNAMED",
    "--add-opens", "java.base/jdk.internal.ref=ALL-UNNAMED",
    "--add-opens", "java.base/jdk.internal.reflect=ALL-UNNAMED",
    "--add-opens", "java.base/jdk.internal.math=ALL-UNNAMED",
    "--add-opens", "java.base/jdk.internal.module=ALL-UNNAMED",
    "--add-opens", "java.base/jdk.internal.util.jar=ALL-UNNAMED",
    "--add-opens", "jdk.management/com.sun.management.internal=ALL-UNNAMED",
    "--add-opens", "java.base/sun.nio.ch=ALL-UNNAMED",
    "--add-opens", "java.base/java.io=ALL-UNNAMED",
    "--add-opens", "java.base/java.lang.reflect=ALL-UNNAMED",
    "--add-opens", "jdk.compiler/com.sun.tools.javac=ALL-UNNAMED",
    "--add-opens", "java.base/java.lang=ALL-UNNAMED",
    "--add-opens", "java.base/java.util=ALL-UNNAMED",
    "--add-opens", "java.base/java.nio=ALL-UNNAMED",
)  # fmt: skip

# Logging: INFO (and up) to system.log in the data folder; only WARN and ERROR to the console,
# which the runner captures as server.log, so its log tail shows why a start failed without
# drowning in Cassandra's chatty INFO start-up lines.
LOGBACK_XML = """\
<configuration scan="false" debug="false">
  <shutdownHook class="ch.qos.logback.core.hook.DefaultShutdownHook"/>
  <appender name="FILE" class="ch.qos.logback.core.rolling.RollingFileAppender">
    <file>{log}</file>
    <rollingPolicy class="ch.qos.logback.core.rolling.FixedWindowRollingPolicy">
      <fileNamePattern>{log}.%i</fileNamePattern>
      <minIndex>1</minIndex>
      <maxIndex>2</maxIndex>
    </rollingPolicy>
    <triggeringPolicy class="ch.qos.logback.core.rolling.SizeBasedTriggeringPolicy">
      <maxFileSize>20MB</maxFileSize>
    </triggeringPolicy>
    <encoder>
      <pattern>%-5level [%thread] %date{{ISO8601}} %F:%L - %msg%n</pattern>
    </encoder>
  </appender>
  <appender name="STDOUT" class="ch.qos.logback.core.ConsoleAppender">
    <filter class="ch.qos.logback.classic.filter.ThresholdFilter">
      <level>WARN</level>
    </filter>
    <encoder>
      <pattern>%-5level [%thread] %date{{ISO8601}} %F:%L - %msg%n</pattern>
    </encoder>
  </appender>
  <root level="INFO">
    <appender-ref ref="FILE"/>
    <appender-ref ref="STDOUT"/>
  </root>
</configuration>
"""


def _q(value: str) -> str:
    """Quote a scalar for YAML (a JSON string is a valid YAML scalar, whatever the path holds)."""
    return json.dumps(value)


def _write_if_changed(path: Path, text: str) -> None:
    # Rewriting identical bytes would be harmless, but leaving the file alone keeps its mtime
    # meaningful and makes prepare() visibly idempotent.
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


class CassandraServer(Server):
    """Single-node Cassandra: native CQL on `cassandra_port`, gossip on `cassandra_storage_port`."""

    name = "cassandra"
    # Alone on 2 cores it answers CQL in about 7 s (cold or warm); the base class's 180 s timeout
    # leaves room for the other JVMs of the stack starting at the same time.

    @property
    def port(self) -> int:
        return self.ctx.settings.cassandra_port

    @property
    def storage_port(self) -> int:
        return self.ctx.settings.cassandra_storage_port

    @property
    def config_file(self) -> Path:
        return self.data / "cassandra.yaml"

    @property
    def logback_file(self) -> Path:
        return self.data / "logback.xml"

    @property
    def storage(self) -> Path:
        return self.data / "storage"

    def _classpath(self) -> str:
        return self.ctx.maven_classpath(self.name)

    def install(self) -> None:
        # Resolves (and on first use downloads) cassandra-all and its ~100 dependency jars.
        self._classpath()

    def _jamm_jar(self, classpath: str) -> str:
        # Cassandra measures object sizes with jamm, which must be loaded as a Java agent; take
        # the exact jar Maven resolved so the agent always matches cassandra-all's dependency.
        for entry in classpath.split(":"):
            if Path(entry).name.startswith("jamm-") and entry.endswith(".jar"):
                return entry
        raise StackError("com.github.jbellis:jamm is missing from the resolved Cassandra classpath")

    def commitlog_sync_yaml(self) -> str:
        """How the commit log reaches the disk (`SEALSTREAM_STACK_CASSANDRA_COMMITLOG_SYNC`).

        `batch` (the default) and `group` acknowledge a write only after its commit-log segment
        was fsynced, so an acknowledged write survives a crash; the encryptor commits its Kafka
        offsets on that acknowledgement. Measured on this machine (docs/stack.md), `batch` kept
        the one-row write latency of `periodic` while `group` added its window to it, and both
        wrote encryptor-sized batches equally fast. `periodic` acknowledges at once and fsyncs
        every 10 s: a SIGKILL then lost acknowledged writes (issue 9, item 5); it is kept only
        so the cost can be measured (`sealstream bench durability`).
        """
        mode = self.ctx.settings.cassandra_commitlog_sync
        window = self.ctx.settings.cassandra_commitlog_group_window_ms
        lines = {
            "periodic": [
                "# Acknowledges before the fsync: NOT durable across a crash (measurement only).",
                "commitlog_sync: periodic",
                "commitlog_sync_period: 10000ms",
            ],
            "group": [
                "# Durable: a write is acknowledged once the commit log holding it is fsynced;",
                f"# writes arriving within {window} ms share one fsync (docs/stack.md).",
                "commitlog_sync: group",
                f"commitlog_sync_group_window: {window}ms",
            ],
            "batch": [
                "# Durable: every write waits for an fsync of the commit log before its ack.",
                "commitlog_sync: batch",
            ],
        }[mode]
        return "\n".join(lines)

    def cassandra_yaml(self) -> str:
        """A minimal single-node config; everything not named keeps Cassandra 5.0's default."""
        storage = self.storage
        return f"""\
# Written by sealstream.stack.cassandra on every `stack up`; edits here are overwritten.
cluster_name: {_q(CLUSTER_NAME)}
# One node, one token: nothing to balance, and token allocation stays out of start-up.
num_tokens: 1
initial_token: 0
partitioner: org.apache.cassandra.dht.Murmur3Partitioner
endpoint_snitch: SimpleSnitch
dynamic_snitch: false
auto_bootstrap: false

data_file_directories:
  - {_q(str(storage / "data"))}
commitlog_directory: {_q(str(storage / "commitlog"))}
saved_caches_directory: {_q(str(storage / "saved_caches"))}
hints_directory: {_q(str(storage / "hints"))}
cdc_raw_directory: {_q(str(storage / "cdc_raw"))}

seed_provider:
  - class_name: org.apache.cassandra.locator.SimpleSeedProvider
    parameters:
      - seeds: {_q(f"{HOST}:{self.storage_port}")}
listen_address: {HOST}
rpc_address: {HOST}
storage_port: {self.storage_port}
native_transport_port: {self.port}
start_native_transport: true

{self.commitlog_sync_yaml()}
commitlog_segment_size: 16MiB
commitlog_total_space: 256MiB

# Sized so that Cassandra fits beside five other servers (see README "Memory"). The memtable
# space is Cassandra's own default for a 1 GiB heap (a quarter of it): at 64 MiB it flushed every
# ~45,000 messages, and each flush on the shared two cores stalled writes for up to a second
# (docs/benchmarks.md).
memtable_heap_space: 256MiB
memtable_offheap_space: 64MiB
key_cache_size: 16MiB
row_cache_size: 0MiB
counter_cache_size: 0MiB
file_cache_size: 64MiB
networking_cache_size: 16MiB
concurrent_reads: 8
concurrent_writes: 8
concurrent_counter_writes: 8
concurrent_compactors: 1
memtable_flush_writers: 1

# The encryptor writes one unlogged batch per (chat, bucket) partition; such single-partition
# batches are cheap, so warn only well above their usual size.
batch_size_warn_threshold: 64KiB
batch_size_fail_threshold: 1024KiB

# Nothing to snapshot or tune on throw-away local data.
auto_snapshot: false
snapshot_before_compaction: false
"""

    def prepare(self) -> None:
        for sub in ("data", "commitlog", "saved_caches", "hints", "cdc_raw", "triggers"):
            (self.storage / sub).mkdir(parents=True, exist_ok=True)
        _write_if_changed(self.config_file, self.cassandra_yaml())
        log = str(self.data / "system.log")
        _write_if_changed(self.logback_file, LOGBACK_XML.format(log=log))

    def argv(self) -> list[str]:
        classpath = self._classpath()
        heap = self.ctx.settings.cassandra_heap_mb
        return [
            self.ctx.java(17),
            # Production Cassandra pins -Xms to -Xmx; here a small initial heap lets G1 grow it
            # on demand, which halves resident memory at idle (about 0.7 GiB instead of 1.5 GiB
            # for a 1 GiB heap) at no measurable cost in start-up time.
            f"-Xms{min(INITIAL_HEAP_MB, heap)}m",
            f"-Xmx{heap}m",
            # Cassandra's jvm-server.options default; its threads are many and shallow.
            "-Xss256k",
            # G1 as in jvm17-server.options, minus the 16m region size meant for big heaps.
            "-XX:+UseG1GC",
            "-XX:+ParallelRefProcEnabled",
            "-XX:MaxGCPauseMillis=300",
            # Die instead of limping on with a broken heap; the runner reports the exit.
            "-XX:+ExitOnOutOfMemoryError",
            # No hsperfdata mmap file (jvm-server.options does the same).
            "-XX:+PerfDisableSharedMem",
            "-Djava.net.preferIPv4Stack=true",
            "-Djdk.attach.allowAttachSelf=true",
            *JVM17_MODULE_FLAGS,
            # Netty settings of jvm17-server.options (Unsafe direct buffers, pre-4.1.75 pooling).
            "-Dio.netty.tryReflectionSetAccessible=true",
            "-Dio.netty.allocator.useCacheForAllThreads=true",
            "-Dio.netty.allocator.maxOrder=11",
            f"-javaagent:{self._jamm_jar(classpath)}",
            "-Dcassandra-foreground=yes",
            f"-Dcassandra.config={self.config_file.as_uri()}",
            f"-Dcassandra.storagedir={self.storage}",
            f"-Dcassandra.logdir={self.data}",
            f"-Dlogback.configurationFile={self.logback_file.as_uri()}",
            # An empty triggers folder of our own (the default one is under $CASSANDRA_HOME).
            f"-Dcassandra.triggers_dir={self.storage / 'triggers'}",
            # Single node: nobody to gossip with, so skip the settle wait and shrink the ring
            # delay (default 30 s) that start-up otherwise sleeps through.
            "-Dcassandra.skip_wait_for_gossip_to_settle=0",
            "-Dcassandra.ring_delay_ms=1000",
            "-Dcassandra.superuser_setup_delay_ms=0",
            "-cp",
            classpath,
            MAIN_CLASS,
        ]

    def probe(self) -> str:
        # Imported here so the rest of the stack (and `--help`) does not pay for the driver.
        from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile
        from cassandra.policies import DCAwareRoundRobinPolicy

        profile = ExecutionProfile(
            # SimpleSnitch puts the node in "datacenter1"; naming it silences the driver warning.
            load_balancing_policy=DCAwareRoundRobinPolicy(local_dc="datacenter1"),
            request_timeout=5,
        )
        cluster = Cluster(
            [HOST],
            port=self.port,
            execution_profiles={EXEC_PROFILE_DEFAULT: profile},
            connect_timeout=3,
            control_connection_timeout=3,
            # The probe is polled; a failed attempt must not leave reconnection threads behind.
            schema_metadata_enabled=False,
            token_metadata_enabled=False,
        )
        try:
            session = cluster.connect()
            row = session.execute("SELECT release_version FROM system.local").one()
            if row is None:
                raise StackError("Cassandra answered but system.local has no row")
            return f"Apache Cassandra {row.release_version}"
        finally:
            cluster.shutdown()
