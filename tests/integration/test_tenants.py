"""Tenants and regions: each tenant's DEKs are wrapped by its own master key on its own KMS.

Tenant A lives on the stack's OpenBao, tenant B in region `eu`, served by a second, real OpenBao
(`bao server -dev`) that this module starts on a free port and stops at the end.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import hvac
import hvac.exceptions
import pytest
import requests
from pydantic import SecretStr

from sealstream.adapters.postgres import Database
from sealstream.adapters.vault import TransitKms
from sealstream.crypto import MessageContext, open_envelope, seal
from sealstream.errors import KmsError
from sealstream.keys.service import kms_context
from sealstream.services import settings_env
from sealstream.settings import KmsCluster, Settings
from sealstream.stack.openbao import _bao_binary

REGION = "eu"


def _free_port_pair() -> int:
    """A port p with p and p + 1 free (the dev server's cluster listener takes p + 1)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no two adjacent free ports")


@pytest.fixture(scope="module")
def second_kms(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KmsCluster]:
    """A second OpenBao server (dev mode: in memory, unsealed) with Transit enabled."""
    home = tmp_path_factory.mktemp("bao")
    port, token = _free_port_pair(), secrets.token_hex(16)
    address = f"http://127.0.0.1:{port}"
    with (home / "bao.log").open("wb") as log:
        proc = subprocess.Popen(
            [
                _bao_binary(),
                "server",
                "-dev",
                f"-dev-root-token-id={token}",
                f"-dev-listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={"PATH": os.environ.get("PATH", ""), "HOME": str(home)},  # its token helper file
            start_new_session=True,
        )
    try:
        client = hvac.Client(url=address, token=token, timeout=2)

        def ready() -> bool:
            try:
                return bool(client.sys.is_initialized() and not client.sys.is_sealed())
            except (requests.exceptions.ConnectionError, hvac.exceptions.VaultError):
                return False  # not listening yet

        deadline = time.monotonic() + 30
        while not ready():
            assert proc.poll() is None, (home / "bao.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "second OpenBao did not start within 30 s"
            time.sleep(0.2)
        client.sys.enable_secrets_engine("transit", path="transit")
        yield KmsCluster(address=address, token=SecretStr(token))
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture(scope="module")
def region_settings(settings: Settings, second_kms: KmsCluster) -> Settings:
    vault = settings.vault.model_copy(update={"clusters": {REGION: second_kms}})
    return settings.model_copy(update={"vault": vault})


@pytest.fixture(scope="module")
def tenants(run_id: str, region_settings: Settings, kms: TransitKms) -> Iterator[dict[str, str]]:
    """Tenant ids and key names; the default cluster's keys are deleted at the end."""
    names = {
        "a": f"tenant-a-{run_id}",
        "b": f"tenant-b-{run_id}",
        "key_a": f"test-{run_id}-tenant-a",
        "key_b": f"test-{run_id}-tenant-b",
    }
    kms.ensure_key(region_settings.vault.default_key)  # tracked: the session deletes it
    yield names
    kms.delete_key(names["key_a"])  # the second server's keys vanish with it


def test_each_tenant_uses_its_own_master_key_on_its_own_kms(
    region_settings: Settings, database: Database, tenants: dict[str, str]
) -> None:
    from sealstream.wiring import key_service

    default = TransitKms(region_settings.vault)
    second = TransitKms(region_settings.vault.for_region(REGION))
    key_a, key_b = tenants["key_a"], tenants["key_b"]
    chat_a, chat_b = uuid.uuid4(), uuid.uuid4()
    envelopes: dict[uuid.UUID, bytes] = {}

    with key_service(region_settings, db=database) as keys:
        keys.register_tenant(tenants["a"], key_a)
        keys.register_tenant(tenants["b"], key_b, REGION)
        assert keys.repo.tenant(tenants["b"]).region == REGION  # type: ignore[union-attr]
        assert keys.repo.tenant(tenants["a"]).region is None  # type: ignore[union-attr]
        keys.create_chat(chat_a, ("alice",), tenants["a"])
        keys.create_chat(chat_b, ("bob",), tenants["b"])

        # Each master key exists on its own KMS only.
        assert second.latest_version(key_b) == 1 and default.latest_version(key_a) == 1
        for kms, key in ((default, key_b), (second, key_a)):
            with pytest.raises(KmsError, match="no such key"):
                kms.latest_version(key)

        # The wrapped DEK in Postgres unwraps at its tenant's KMS, and nowhere else.
        for chat, key, home, other in (
            (chat_a, key_a, default, second),
            (chat_b, key_b, second, default),
        ):
            row = keys.repo.active_dek(chat)
            assert row is not None and row.kms_key_name == key
            assert row.encrypted_dek is not None and row.encrypted_dek.startswith("vault:v1:")
            context = kms_context(chat, 1)
            assert home.unwrap(key, row.encrypted_dek, context) == keys.key(chat, 1).material
            with pytest.raises(KmsError):
                other.unwrap(key, row.encrypted_dek, context)

        for chat in (chat_a, chat_b):
            envelopes[chat] = seal(b"hello " + chat.bytes, keys.current_key(chat), _ctx(chat))
            assert open_envelope(envelopes[chat], keys.key(chat, 1), _ctx(chat)) == (
                b"hello " + chat.bytes
            )

        # Rotation of a B chat generates the new DEK at B's KMS.
        assert keys.rotate(chat_b) == 2
        row = keys.repo.dek(chat_b, 2)
        assert row is not None and row.encrypted_dek is not None
        assert second.unwrap(key_b, row.encrypted_dek, kms_context(chat_b, 2)) == (
            keys.key(chat_b, 2).material
        )
        with pytest.raises(KmsError):
            default.unwrap(key_b, row.encrypted_dek, kms_context(chat_b, 2))
        envelopes[chat_b] = seal(b"after rotation", keys.current_key(chat_b), _ctx(chat_b))

        # A tenant cannot move to another KMS (its DEKs would no longer unwrap).
        with pytest.raises(KmsError, match="not supported"):
            keys.register_tenant(tenants["b"], key_b)

    # A fresh service (another process: nothing in memory) unwraps each DEK at the right KMS.
    with key_service(region_settings, db=database, actor="fresh") as fresh:
        assert open_envelope(envelopes[chat_a], fresh.key(chat_a, 1), _ctx(chat_a)) == (
            b"hello " + chat_a.bytes
        )
        assert open_envelope(envelopes[chat_b], fresh.key(chat_b, 2), _ctx(chat_b)) == (
            b"after rotation"
        )
        assert fresh.key(chat_b, 1).material == second.unwrap(
            key_b,
            fresh.repo.dek(chat_b, 1).encrypted_dek,  # type: ignore[union-attr,arg-type]
            kms_context(chat_b, 1),
        )
        assert fresh.stats.kms_unwraps == 3


def test_cli_rotates_a_regional_master_key_at_its_own_kms(
    region_settings: Settings, database: Database, tenants: dict[str, str], run_id: str
) -> None:
    """`keys add-tenant` and `keys rotate-master` in a child process configured by settings_env."""
    from sealstream.wiring import key_service

    tenant, key = f"tenant-c-{run_id}", f"test-{run_id}-tenant-c"
    env = {**os.environ, **settings_env(region_settings)}

    def cli(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "sealstream.cli", "keys", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            cwd=Path(__file__).resolve().parents[2],
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    cli("add-tenant", tenant, "--kms-key", key, "--region", REGION)
    second = TransitKms(region_settings.vault.for_region(REGION))
    assert second.latest_version(key) == 1
    chat = uuid.uuid4()
    with key_service(region_settings, db=database) as keys:
        assert keys.repo.tenant(tenant).region == REGION  # type: ignore[union-attr]
        keys.create_chat(chat, ("carol",), tenant)
        material = keys.key(chat, 1).material

    out = cli("rotate-master", "--tenant", tenant)
    assert "now version 2" in out and "rewrapped 1" in out
    with key_service(region_settings, db=database) as fresh:
        row = fresh.repo.dek(chat, 1)
        assert row is not None and row.encrypted_dek is not None
        assert row.encrypted_dek.startswith("vault:v2:")
        assert fresh.key(chat, 1).material == material


def test_a_region_without_a_configured_cluster_fails_clearly(
    region_settings: Settings, database: Database, tenants: dict[str, str], run_id: str
) -> None:
    from sealstream.wiring import key_service

    lost, elsewhere = f"tenant-mars-{run_id}", f"tenant-moon-{run_id}"
    with key_service(region_settings, db=database) as keys:
        with pytest.raises(KmsError, match=f"tenant '{lost}' is in region 'mars'") as err:
            keys.register_tenant(lost, f"test-{run_id}-mars", "mars")
        assert "SEALSTREAM_VAULT__CLUSTERS" in str(err.value)
        assert keys.repo.tenant(lost) is None  # nothing stored

        # Registered by a process whose configuration knew region `moon`: this one does not.
        keys.repo.upsert_tenant(elsewhere, f"test-{run_id}-moon", "moon")
        with pytest.raises(KmsError, match=f"tenant '{elsewhere}' is in region 'moon'") as err:
            keys.create_chat(uuid.uuid4(), ("dave",), elsewhere)
        token = region_settings.vault.clusters[REGION].token
        assert token is not None and token.get_secret_value() not in str(err.value)


def _ctx(chat: uuid.UUID) -> MessageContext:
    return MessageContext(chat, 42, "alice", 1, 0)
