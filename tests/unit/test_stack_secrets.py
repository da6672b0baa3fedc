"""The local stack's secret files: Kafka's `credentials.json` and `server.properties` (every
principal's password, the super users' among them) and S3Proxy's key pair.

A secret file is replaced, never rewritten in place: a reader holding the old file (made 0644 by
an older release, or just opened by a starting service) must never see the new secrets, nor an
empty file half-way; the new one is 0600 from its first byte. Reads files in a temporary stack
folder; starts no server.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from sealstream.kafka_principals import ADMIN, LOCAL_PRINCIPALS
from sealstream.settings import StackSettings
from sealstream.stack.base import StackContext, write_private
from sealstream.stack.kafka import KafkaServer

REPO = Path(__file__).resolve().parents[2]


def kafka_in(folder: Path) -> KafkaServer:
    return KafkaServer(StackContext(StackSettings(dir=folder), REPO))


def test_new_kafka_passwords_never_reach_a_reader_of_the_old_world_readable_file(
    tmp_path: Path,
) -> None:
    server = kafka_in(tmp_path)
    old = server.credentials_file
    old.write_text(json.dumps({ADMIN: "old-admin-password"}))
    old.chmod(0o644)  # as an older release left it
    with old.open() as reader:  # someone who opened it while it was world-readable
        passwords = server.credentials()
        reader.seek(0)
        seen = reader.read()
    assert json.loads(seen) == {ADMIN: "old-admin-password"}
    assert not any(passwords[p] in seen for p in LOCAL_PRINCIPALS if p != ADMIN)
    assert stat.S_IMODE(server.credentials_file.stat().st_mode) == 0o600
    assert json.loads(server.credentials_file.read_text()) == passwords
    assert set(passwords) == set(LOCAL_PRINCIPALS) and passwords[ADMIN] == "old-admin-password"


def test_a_rewritten_secret_file_is_replaced_whole_and_private(tmp_path: Path) -> None:
    path = tmp_path / "server.properties"
    path.write_text("old=1\n")
    path.chmod(0o644)
    with path.open() as reader:
        write_private(path, "sasl.password=new-secret\n")
        assert reader.read() == "old=1\n"
    assert path.read_text() == "sasl.password=new-secret\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == ["server.properties"]  # no temporary file left behind


def test_the_kafka_data_folder_is_private_to_its_owner(tmp_path: Path) -> None:
    server = kafka_in(tmp_path)
    (tmp_path / "kafka").mkdir(mode=0o755)
    (tmp_path / "kafka").chmod(0o755)  # as an older release made it
    server.credentials()
    assert stat.S_IMODE(server.data.stat().st_mode) == 0o700
