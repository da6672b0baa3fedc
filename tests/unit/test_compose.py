"""docker-compose.yml must describe the same system as the settings (no engine runs it here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from sealstream.settings import Settings, StackSettings

REPO = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
PROJECT_SERVICES = ("ingest", "encryptor", "indexer", "reader")


def published_host_ports(service: str) -> set[int]:
    return {int(str(p).split(":")[0]) for p in SERVICES[service].get("ports", [])}


def test_every_server_and_service_is_there() -> None:
    assert {"kafka", "cassandra", "opensearch", "postgres", "redis", "openbao"} <= set(SERVICES)
    for name in PROJECT_SERVICES:
        assert SERVICES[name]["command"] == ["run", name]
        assert SERVICES[name]["build"] == "."
    assert SERVICES["migrate"]["command"] == ["migrate"]


def test_infrastructure_publishes_the_local_stack_ports() -> None:
    stack = StackSettings()
    expected = {
        "kafka": stack.kafka_port,
        "cassandra": stack.cassandra_port,
        "opensearch": stack.opensearch_port,
        "postgres": stack.postgres_port,
        "redis": stack.redis_port,
        "openbao": stack.openbao_port,
    }
    for service, port in expected.items():
        assert port in published_host_ports(service), f"{service} should publish {port}"
    settings = Settings()
    for service, http in (
        ("ingest", settings.ingest),
        ("reader", settings.reader),
        ("encryptor", settings.encryptor_http),
        ("indexer", settings.indexer_http),
    ):
        assert http.port in published_host_ports(service)


def _field_path_exists(model: type[BaseModel], parts: list[str]) -> bool:
    field = model.model_fields.get(parts[0].lower())
    if field is None:
        return False
    if len(parts) == 1:
        return True
    nested = field.annotation
    return (
        isinstance(nested, type)
        and issubclass(nested, BaseModel)
        and _field_path_exists(nested, parts[1:])
    )


@pytest.mark.parametrize("service", ["migrate", *PROJECT_SERVICES])
def test_every_variable_is_a_real_setting(service: str) -> None:
    env: dict[str, str] = SERVICES[service]["environment"]
    assert env, f"{service} has no environment"
    for name in env:
        assert name.startswith("SEALSTREAM_"), name
        parts = name.removeprefix("SEALSTREAM_").split("__")
        assert _field_path_exists(Settings, parts), f"{name} is not a field of Settings"


@pytest.mark.parametrize("service", PROJECT_SERVICES)
def test_settings_load_from_the_compose_environment(
    service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in SERVICES[service]["environment"].items():
        monkeypatch.setenv(name, str(value))
    settings = Settings()
    assert settings.kafka.bootstrap == "kafka:9092"
    assert settings.cassandra.hosts == ("cassandra",)
    assert settings.postgres.host == "postgres"
    assert settings.vault.resolved_token().get_secret_value() == "sealstream-dev-root"
    assert settings.opensearch.url == "http://opensearch:9200"
