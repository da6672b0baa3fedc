"""KMS clusters per region in the settings, and the router's refusal of an unknown region."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from sealstream.errors import KmsError
from sealstream.keys.router import KmsRouter
from sealstream.services import settings_env
from sealstream.settings import KmsCluster, Settings, VaultSettings

TOKEN = "s.cluster-token-not-to-be-printed"


def _clear_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("SEALSTREAM_"):
            monkeypatch.delenv(name)


def test_clusters_come_from_json_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    _clear_env(monkeypatch)
    monkeypatch.setenv(
        "SEALSTREAM_VAULT__CLUSTERS",
        json.dumps({"eu": {"address": "http://127.0.0.1:18210", "token": TOKEN}}),
    )
    vault = Settings().vault
    assert vault.clusters["eu"].address == "http://127.0.0.1:18210"
    assert TOKEN not in repr(vault) and TOKEN not in str(vault)
    eu = vault.for_region("eu")
    assert (
        eu.address == "http://127.0.0.1:18210" and eu.resolved_token().get_secret_value() == TOKEN
    )
    assert eu.transit_mount == vault.transit_mount and eu.clusters == {}


def test_settings_env_reproduces_clusters_in_a_child(monkeypatch: pytest.MonkeyPatch) -> None:
    clusters = {
        "eu": KmsCluster(address="http://127.0.0.1:18210", token=SecretStr(TOKEN)),
        "us": KmsCluster(address="https://kms.us:8200", token_file=Path("/run/secrets/kms-us")),
    }
    parent = Settings(vault=VaultSettings(clusters=clusters))
    env = settings_env(parent)
    assert json.loads(env["SEALSTREAM_VAULT__CLUSTERS"])["us"] == {
        "address": "https://kms.us:8200",
        "token_file": "/run/secrets/kms-us",
    }
    _clear_env(monkeypatch)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    child = Settings()
    assert child == parent
    assert child.vault.clusters["eu"].token == SecretStr(TOKEN)


def test_a_cluster_without_a_token_is_refused() -> None:
    # Otherwise the default cluster's token file would be sent to another server.
    with pytest.raises(ValidationError, match="token"):
        KmsCluster(address="http://127.0.0.1:18210")


def test_router_names_the_region_it_has_no_cluster_for() -> None:
    vault = VaultSettings(
        token=SecretStr(TOKEN),
        clusters={"eu": KmsCluster(address="http://127.0.0.1:1", token=SecretStr(TOKEN))},
    )
    router = KmsRouter(vault, placements=lambda _key: [])
    with pytest.raises(KmsError, match="tenant 'acme' is in region 'mars'") as err:
        router.at("mars", "acme")
    assert "['eu']" in str(err.value) and TOKEN not in str(err.value)
