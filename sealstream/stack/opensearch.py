"""The local-stack OpenSearch: one single-node cluster on 127.0.0.1, plain HTTP.

OpenSearch 2.19 runs from Maven Central jars (``stack/opensearch/pom.xml``, no tarball download).
The distribution's launcher only loads plugins from directories, so ``SealstreamNode.java`` (in
the same folder) starts a ``Node`` subclass with the Netty4 HTTP/transport plugin, the
analysis-common plugin and ``SealstreamIcuPlugin.java`` (ICU analysis from Lucene's
lucene-analysis-icu, under the official analysis-icu plugin's names) on the classpath, as
OpenSearch's own test framework does. This module compiles those sources (only when one of them or
the classpath changed, so `stack up` on an existing data folder picks up a new plugin), writes
``log4j2.properties``, builds the ``java`` command line, and probes the node with a real REST
request.

Without the security plugin there is no TLS or authentication: the node binds to loopback only.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, ClassVar

from opensearchpy import OpenSearch
from opensearchpy.exceptions import OpenSearchException

from sealstream.stack.base import Server, StackError

MAIN_CLASS = "SealstreamNode"
ICU_PLUGIN = "SealstreamIcuPlugin"  # how the node lists the classpath plugin (its class name)
CLUSTER_NAME = "sealstream-local"
NODE_NAME = "sealstream"
_POM_VERSION = re.compile(r"<opensearch\.version>\s*([^<\s]+)\s*</opensearch\.version>")

# Console appender only: the runner sends stdout to server.log, so one file holds the whole story.
# `[%node_name]%marker` is the layout OpenSearch expects; without %node_name it warns at start.
LOG4J2_PROPERTIES = """\
# Written by sealstream/stack/opensearch.py; rewritten on every `stack up`.
status = error
appender.console.type = Console
appender.console.name = console
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = [%d{ISO8601}][%-5p][%-25c{1.}] [%node_name]%marker %m%n
rootLogger.level = info
rootLogger.appenderRef.console.ref = console
"""

# JVM flags of the distribution's launcher (SystemJvmOptions/jvm.options) that matter here. None is
# needed for the node to start; they keep its behaviour the same as a packaged OpenSearch.
JVM_FLAGS = [
    "-XX:+UseG1GC",  # explicit: a 1-CPU CI container would otherwise get SerialGC
    "-XX:-OmitStackTraceInFastThrow",
    "-Djava.awt.headless=true",
    "-Dfile.encoding=UTF-8",
    # Date parsing: OpenSearch 2.x is built and tested against the COMPAT locale data on Java 9+.
    "-Djava.locale.providers=SPI,COMPAT",
    "-Dio.netty.noUnsafe=true",
    "-Dio.netty.noKeySetOptimization=true",
    "-Dio.netty.recycler.maxCapacityPerThread=0",
    "-Dio.netty.allocator.numDirectArenas=0",
    # Our shutdown hook closes the node; log4j's own hook would stop logging before that ends.
    "-Dlog4j.shutdownHookEnabled=false",
    "-Dlog4j2.disable.jmx=true",
]


class OpenSearchServer(Server):
    """OpenSearch 2.19 as a single-node cluster (Netty4 HTTP, analysis-common, ICU analysis), no
    security."""

    name: ClassVar[str] = "opensearch"

    @property
    def port(self) -> int:
        return self.ctx.settings.opensearch_port

    @property
    def transport_port(self) -> int:
        return self.ctx.settings.opensearch_transport_port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def source(self) -> Path:
        return self.ctx.repo_root / "stack" / self.name / f"{MAIN_CLASS}.java"

    @property
    def sources(self) -> list[Path]:
        """Every Java source of the node: the launcher and the plugins it loads (same folder)."""
        return sorted(self.source.parent.glob("*.java"))

    @property
    def classes_dir(self) -> Path:
        return self.data / "classes"

    @property
    def config_dir(self) -> Path:
        """``path.home``/config: OpenSearch reads ``log4j2.properties`` (required) from here."""
        return self.data / "config"

    @property
    def index_dir(self) -> Path:
        """``path.data``: the indices; kept between runs."""
        return self.data / "data"

    @property
    def logs_dir(self) -> Path:
        """``path.logs``: required by the node (slow logs etc. would go here); we log to stdout."""
        return self.data / "logs"

    # -- install ---------------------------------------------------------------------------------

    def classpath(self) -> str:
        return self.ctx.maven_classpath(self.name)

    def install(self) -> None:
        classpath = self.classpath()  # resolves the pom into ~/.m2 once, then cached
        sources = self.sources
        # The stamp covers every source (by name and content) and the classpath: a new plugin
        # source, or a new OpenSearch version, needs a recompile.
        hashed = hashlib.sha256()
        for path in sources:
            hashed.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
        digest = hashlib.sha256(hashed.digest() + classpath.encode()).hexdigest()
        stamp = self.data / "classes.sha256"
        compiled = self.classes_dir / f"{MAIN_CLASS}.class"
        if compiled.exists() and stamp.exists() and stamp.read_text().strip() == digest:
            return
        shutil.rmtree(self.classes_dir, ignore_errors=True)
        self.classes_dir.mkdir(parents=True)
        cmd = [self._javac(), "-cp", classpath, "-d", str(self.classes_dir), *map(str, sources)]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            tail = "\n".join((result.stdout + result.stderr).splitlines()[-30:])
            raise StackError(f"compiling {self.source.parent}/*.java failed:\n{tail}")
        stamp.write_text(digest + "\n")

    def _javac(self) -> str:
        """The `javac` next to the Java 17 `java` that runs the node (same JDK, same bytecode)."""
        sibling = Path(self.ctx.java(17)).resolve().parent / "javac"
        if sibling.exists():
            return str(sibling)
        found = shutil.which("javac")
        if found is None:
            raise StackError(
                "no `javac` found: OpenSearch needs a JDK (apt-get install default-jdk)"
            )
        return found

    def version(self) -> str:
        """The OpenSearch release in the pom (what the probe reports when the node cannot)."""
        pom = self.ctx.repo_root / "stack" / self.name / "pom.xml"
        found = _POM_VERSION.search(pom.read_text())
        return found.group(1) if found else "unknown"

    # -- prepare ---------------------------------------------------------------------------------

    def prepare(self) -> None:
        for folder in (self.config_dir, self.index_dir, self.logs_dir):
            folder.mkdir(parents=True, exist_ok=True)
        # Rewritten every time so a change here takes effect; the index data is left alone.
        (self.config_dir / "log4j2.properties").write_text(LOG4J2_PROPERTIES)

    # -- run -------------------------------------------------------------------------------------

    def node_settings(self) -> dict[str, str]:
        return {
            "path.home": str(self.data),
            "path.data": str(self.index_dir),
            "path.logs": str(self.logs_dir),
            "cluster.name": CLUSTER_NAME,
            "node.name": NODE_NAME,
            # One node that elects itself; with loopback binding the bootstrap checks are skipped.
            "discovery.type": "single-node",
            "network.host": "127.0.0.1",
            "http.port": str(self.port),
            "transport.port": str(self.transport_port),
            # A developer's or CI's disk may be >90% full: don't stop allocating shards for that.
            "cluster.routing.allocation.disk.threshold_enabled": "false",
        }

    def argv(self) -> list[str]:
        heap_mb = self.ctx.settings.opensearch_heap_mb
        return [
            self.ctx.java(17),
            f"-Xms{heap_mb}m",
            f"-Xmx{heap_mb}m",
            *JVM_FLAGS,
            "-cp",
            f"{self.classes_dir}:{self.classpath()}",
            MAIN_CLASS,
            *(f"{key}={value}" for key, value in self.node_settings().items()),
        ]

    def after_ready(self) -> None:
        # One node cannot hold replicas: default new indices to 0 so they are green, not yellow.
        # This is read from the cluster's persistent settings (a node setting is ignored), and
        # persistent settings survive restarts; putting the same value again is a no-op.
        client = self.client(timeout=30.0)
        try:
            client.cluster.put_settings(
                body={"persistent": {"cluster.default_number_of_replicas": 0}}
            )
        except OpenSearchException as exc:
            raise StackError(f"setting OpenSearch cluster defaults failed: {exc}") from exc
        finally:
            client.close()

    def client(self, timeout: float = 3.0) -> OpenSearch:
        # No retries: the probe is polled by the runner, and a refused connection should fail fast.
        return OpenSearch(hosts=[self.url], timeout=timeout, max_retries=0, retry_on_timeout=False)

    def probe(self) -> str:
        client = self.client()
        try:
            health: dict[str, Any] = client.cluster.health()
            info: dict[str, Any] = client.info()
            plugins: dict[str, Any] = client.nodes.info(metric="plugins")
        except OpenSearchException as exc:
            raise StackError(f"OpenSearch at {self.url} does not answer: {exc}") from exc
        finally:
            client.close()
        status = health.get("status")
        if status not in ("green", "yellow"):
            raise StackError(f"OpenSearch at {self.url} answers but its cluster is {status}")
        number = info.get("version", {}).get("number") or self.version()
        names = {
            plugin.get("name")
            for node in plugins.get("nodes", {}).values()
            for plugin in node.get("plugins", [])
        }
        if not names & {ICU_PLUGIN, "analysis-icu"}:
            # A node started before the plugin was added (`stack up` leaves a running node be).
            return (
                f"OpenSearch {number}, WITHOUT ICU analysis: restart it with `sealstream stack "
                "down --only opensearch` then `sealstream stack up --only opensearch`"
            )
        return f"OpenSearch {number}"
