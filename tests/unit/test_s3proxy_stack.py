"""The local stack's S3Proxy: its generated key pair stays private and is what clients use.

Reads the files `prepare()` writes in a temporary stack folder; starts no server.
"""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from sealstream.settings import ObjectStoreSettings, StackSettings
from sealstream.stack.base import StackContext
from sealstream.stack.s3proxy import S3ProxyServer

REPO = Path(__file__).resolve().parents[2]


def server_in(folder: Path) -> S3ProxyServer:
    return S3ProxyServer(StackContext(StackSettings(dir=folder, s3proxy_port=29999), REPO))


def test_prepare_writes_a_private_key_pair_once_and_a_loopback_config(tmp_path: Path) -> None:
    server = server_in(tmp_path)
    server.prepare()
    creds = server.credentials()
    conf = (server.data / "s3proxy.conf").read_text()
    for private in (server.credentials_file, server.data / "s3proxy.conf"):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600, private
    assert "s3proxy.endpoint=http://127.0.0.1:29999" in conf
    assert "s3proxy.authorization=aws-v2-or-v4" in conf
    assert f"s3proxy.credential={creds['secret_key']}" in conf
    assert len(creds["secret_key"]) >= 40
    server.prepare()  # a second `stack up` keeps the key pair clients already hold
    assert server.credentials() == creds
    assert server_in(tmp_path / "other").credentials() != creds


def test_settings_read_the_stack_key_pair_unless_given_one(tmp_path: Path) -> None:
    server = server_in(tmp_path)
    server.prepare()
    creds = server.credentials()
    local = ObjectStoreSettings(credentials_file=server.credentials_file)
    access, secret = local.resolved_credentials()
    assert (access, secret.get_secret_value()) == (creds["access_key"], creds["secret_key"])
    assert creds["secret_key"] not in repr(local.model_copy(update={"secret_key": secret}))
    given = ObjectStoreSettings(access_key="AK", secret_key="SK", credentials_file=tmp_path / "x")
    assert given.resolved_credentials()[0] == "AK"
    with pytest.raises(ValueError, match="SEALSTREAM_OBJECT_STORE__ACCESS_KEY"):
        ObjectStoreSettings(credentials_file=tmp_path / "none").resolved_credentials()
    with pytest.raises(ValueError, match="both access_key and secret_key"):
        ObjectStoreSettings(access_key="AK")
