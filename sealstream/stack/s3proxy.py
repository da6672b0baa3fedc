"""The local-stack object store: S3Proxy serving the S3 API over a filesystem blob store.

This module owns what is specific to S3Proxy: the Maven-resolved runtime (``stack/s3proxy/pom.xml``),
a generated access key and secret kept in ``credentials.json`` (0600, read by
`ObjectStoreSettings.resolved_credentials`), ``s3proxy.conf`` (0600: it holds the secret) and
``logback.xml`` in the server's data folder, the ``java`` command line, and a probe that signs a
real S3 ``ListBuckets`` request with those credentials.

Objects are plain files under ``blobs/<bucket>/<key>`` (jclouds' ``filesystem-nio2`` provider; the
older ``filesystem`` one logs that it is deprecated). S3Proxy has no lifecycle rules on this
backend, so incomplete multipart uploads are swept by ``sealstream attachments sweep-uploads``
(docs/operations.md, "Object store").
"""

from __future__ import annotations

import json
import re
import secrets
from pathlib import Path
from typing import ClassVar

import boto3
from botocore.config import Config

from sealstream.stack.base import Server, StackError, write_private

MAIN_CLASS = "org.gaul.s3proxy.Main"
_POM_VERSION = re.compile(r"<s3proxy\.version>\s*([^<\s]+)\s*</s3proxy\.version>")

# Jetty (shaded into S3Proxy) and jclouds log every request at DEBUG without a config of our own.
LOGBACK_XML = """\
<!-- Written by sealstream/stack/s3proxy.py; rewritten on every `stack up`. -->
<configuration>
  <appender name="STDOUT" class="ch.qos.logback.core.ConsoleAppender">
    <encoder><pattern>%d{ISO8601} %-5level %logger{36} - %msg%n</pattern></encoder>
  </appender>
  <logger name="org.gaul.shaded" level="WARN"/>
  <logger name="org.eclipse.jetty" level="WARN"/>
  <logger name="org.jclouds" level="WARN"/>
  <root level="INFO"><appender-ref ref="STDOUT"/></root>
</configuration>
"""


class S3ProxyServer(Server):
    """S3Proxy 2.x on 127.0.0.1, AWS signature v2 or v4, one generated local key pair."""

    name: ClassVar[str] = "s3proxy"
    start_timeout: ClassVar[float] = 120.0

    @property
    def port(self) -> int:
        return self.ctx.settings.s3proxy_port

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def blobs_dir(self) -> Path:
        return self.data / "blobs"

    @property
    def credentials_file(self) -> Path:
        return self.data / "credentials.json"

    def version(self) -> str:
        pom = self.ctx.repo_root / "stack" / self.name / "pom.xml"
        found = _POM_VERSION.search(pom.read_text())
        return found.group(1) if found else "unknown"

    def install(self) -> None:
        self.ctx.maven_classpath(self.name)

    def credentials(self) -> dict[str, str]:
        """The local access key and secret, made once (random) and kept in a 0600 file."""
        path = self.credentials_file
        if path.exists():
            data: dict[str, str] = json.loads(path.read_text())
            return data
        data = {
            "access_key": "local" + secrets.token_hex(8),
            "secret_key": secrets.token_urlsafe(32),
        }
        write_private(path, json.dumps(data) + "\n")
        return data

    def prepare(self) -> None:
        creds = self.credentials()
        self.blobs_dir.mkdir(parents=True, exist_ok=True)
        (self.data / "logback.xml").write_text(LOGBACK_XML)
        conf = "\n".join(
            [
                "# Written by sealstream/stack/s3proxy.py; rewritten on every `stack up`.",
                f"s3proxy.endpoint={self.endpoint}",  # loopback only
                "s3proxy.authorization=aws-v2-or-v4",
                f"s3proxy.identity={creds['access_key']}",
                f"s3proxy.credential={creds['secret_key']}",
                "jclouds.provider=filesystem-nio2",
                f"jclouds.filesystem.basedir={self.blobs_dir}",
                # The filesystem provider ignores these, but S3Proxy refuses to start without them.
                "jclouds.identity=local",
                "jclouds.credential=local",
            ]
        )
        write_private(self.data / "s3proxy.conf", conf + "\n")

    def argv(self) -> list[str]:
        heap_mb = self.ctx.settings.s3proxy_heap_mb
        return [
            self.ctx.java(17),
            f"-Xmx{heap_mb}m",
            "-XX:+UseSerialGC",  # one small heap, no parallel GC threads on a 2-core box
            "-Djava.awt.headless=true",
            f"-Dlogback.configurationFile={self.data / 'logback.xml'}",
            "-cp",
            self.ctx.maven_classpath(self.name),
            MAIN_CLASS,
            "--properties",
            str(self.data / "s3proxy.conf"),
        ]

    def probe(self) -> str:
        if not self.credentials_file.exists():
            raise StackError(f"no credentials in {self.credentials_file} (not prepared yet)")
        creds = self.credentials()
        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=creds["access_key"],
            aws_secret_access_key=creds["secret_key"],
            region_name="us-east-1",
            config=Config(
                connect_timeout=2,
                read_timeout=3,
                retries={"max_attempts": 1},
                s3={"addressing_style": "path"},
            ),
        )
        try:
            buckets = client.list_buckets()["Buckets"]  # a signed request: checks the key too
        finally:
            client.close()
        return f"S3Proxy {self.version()} ({len(buckets)} bucket(s))"
