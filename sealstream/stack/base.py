"""The contract every local-stack server implements, and the shared context they run in.

A server is described by a small class: how to install it (idempotent, cached), how to prepare its
data folder, the argv that runs it in the foreground, and a *real* protocol probe that says whether
it answers. The runner (`sealstream.stack.runner`) does the spawning, pid files, readiness polling
and log tails, so a server module holds only what is specific to that server.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from sealstream.settings import StackSettings


class StackError(RuntimeError):
    """A server could not be installed, started or reached; the message says why."""


def write_private(path: Path, text: str) -> None:
    """Replace `path` with a file holding `text`, readable by its owner only (0600).

    The text goes to a new 0600 file in the same folder (`tempfile.mkstemp`), synced, then
    renamed over `path` (`os.replace`, atomic): a reader holding the old file (perhaps 0644, made
    by an older release) keeps reading the old content, never the new secret, and a reader
    opening `path` meanwhile sees the whole old or the whole new file, never an empty one.
    Raises `OSError`; the temporary file is removed on failure.
    """
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a crash
    finally:
        os.close(directory)


@dataclass(frozen=True)
class StackContext:
    """Where the stack lives and how it is sized; shared by every server of one `stack` call."""

    settings: StackSettings
    repo_root: Path

    @property
    def root(self) -> Path:
        return self.settings.dir.resolve()

    def data_dir(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def log_file(self, name: str) -> Path:
        return self.data_dir(name) / "server.log"

    def pid_file(self, name: str) -> Path:
        return self.data_dir(name) / "server.pid"

    def java(self, major: int = 17) -> str:
        """Path of a `java` binary of the given major version (Java 17 is the machine default)."""
        if major == 17:
            found = shutil.which("java")
            if found:
                return found
        for candidate in sorted(Path("/usr/lib/jvm").glob(f"*{major}*/bin/java")):
            return str(candidate)
        raise StackError(f"no Java {major} found (looked on PATH and under /usr/lib/jvm)")

    def maven_classpath(self, name: str) -> str:
        """Resolve `stack/<name>/pom.xml` with Maven and return its runtime classpath.

        Jars stay in Maven's local repository (~/.m2), which is the download cache between runs;
        the resolved classpath is cached next to the server's data and redone when the pom changes.
        """
        pom = self.repo_root / "stack" / name / "pom.xml"
        out = self.data_dir(name) / "classpath.txt"
        stamp = self.data_dir(name) / "classpath.pom"
        pom_text = pom.read_text()
        if out.exists() and stamp.exists() and stamp.read_text() == pom_text:
            return out.read_text().strip()
        mvn = shutil.which("mvn")
        if mvn is None:
            raise StackError("Maven (`mvn`) is not installed; `apt-get install -y maven` brings it")
        cmd = [
            mvn,
            "-q",
            "-B",
            "-f",
            str(pom),
            "dependency:build-classpath",
            f"-Dmdep.outputFile={out}",
            "-Dmdep.includeScope=runtime",
        ]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            tail = "\n".join((result.stdout + result.stderr).splitlines()[-30:])
            raise StackError(f"Maven could not resolve {pom}:\n{tail}")
        stamp.write_text(pom_text)
        return out.read_text().strip()


class Server(ABC):
    """One server of the local stack."""

    name: ClassVar[str]
    #: Seconds to wait for the probe to answer after spawning (JVMs on 2 cores are slow).
    start_timeout: ClassVar[float] = 180.0

    def __init__(self, ctx: StackContext) -> None:
        self.ctx = ctx

    @property
    def data(self) -> Path:
        return self.ctx.data_dir(self.name)

    @property
    @abstractmethod
    def port(self) -> int:
        """The client port users connect to."""

    def install(self) -> None:
        """Fetch whatever is missing (idempotent; downloads are cached between runs)."""

    def prepare(self) -> None:
        """Write config files and initialise storage (idempotent)."""

    @abstractmethod
    def argv(self) -> list[str]:
        """Command that runs the server in the foreground."""

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    @abstractmethod
    def probe(self) -> str:
        """Make a real protocol request; return the server's version, raise if it does not answer."""

    def after_ready(self) -> None:
        """One-time set-up that needs the running server (idempotent)."""


_apt_updated = False


def apt_install(binary: str, package: str) -> None:
    """Install a Debian package when `binary` is missing (the machine is root; CI is fresh)."""
    global _apt_updated
    if Path(binary).exists() or shutil.which(binary):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if not _apt_updated:
        subprocess.run(["apt-get", "update", "-qq"], check=False, env=env)
        _apt_updated = True
    result = subprocess.run(
        ["apt-get", "install", "-y", "-qq", package], capture_output=True, text=True, env=env
    )
    if result.returncode != 0:
        raise StackError(f"apt-get install {package} failed:\n{result.stderr[-2000:]}")
