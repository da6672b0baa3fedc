"""Broker credentials and rights, without a broker: what each client config holds, where a
password comes from, who runs as whom, and the rights table's promises (the broker's answers
are in tests/integration/test_kafka_acls.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from sealstream import services
from sealstream.adapters.kafka import kafka_client_config
from sealstream.consumer import MessageConsumer, consumer_config
from sealstream.kafka_principals import (
    ADMIN,
    ADMIN_API,
    BROKER,
    BY_SERVICE,
    DIRECT_PRODUCER,
    ENCRYPTOR,
    GATEWAY,
    INDEXER,
    LOCAL_PRINCIPALS,
    ML_CONSUMER,
    READER,
    TAIL_GROUP_PREFIX,
    Right,
    rights,
)
from sealstream.producer import MessageProducer
from sealstream.services import child_env
from sealstream.settings import KafkaSettings, Settings


def allows(right: Right, resource: str, name: str) -> bool:
    """Whether `right` covers the resource `name`: a prefixed right covers every name starting
    with its own."""
    if right.resource != resource:
        return False
    return name.startswith(right.name) if right.prefixed else name == right.name


def credentials(tmp_path: Path, **passwords: str) -> Path:
    path = tmp_path / "credentials.json"
    path.write_text(json.dumps(passwords))
    return path


def test_a_client_config_carries_the_principal_and_its_password(tmp_path: Path) -> None:
    file = credentials(tmp_path, **{GATEWAY: "gw-secret", ADMIN: "admin-secret"})
    kafka = KafkaSettings(bootstrap="b:1", credentials_file=file).acting_as(GATEWAY)
    config = kafka_client_config(kafka, {"client.id": "x"})
    assert config == {
        "bootstrap.servers": "b:1",
        "security.protocol": "sasl_plaintext",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": GATEWAY,
        "sasl.password": "gw-secret",
        "client.id": "x",
    }


def test_without_a_username_a_process_acts_as_the_operator(tmp_path: Path) -> None:
    file = credentials(tmp_path, **{ADMIN: "admin-secret"})
    config = kafka_client_config(KafkaSettings(credentials_file=file))
    assert (config["sasl.username"], config["sasl.password"]) == (ADMIN, "admin-secret")


def test_a_configured_principal_wins_over_the_service_default() -> None:
    kafka = KafkaSettings(username="prod-gateway", password=SecretStr("p"))
    assert kafka.acting_as(GATEWAY).principal == "prod-gateway"
    assert kafka_client_config(kafka.acting_as(GATEWAY))["sasl.password"] == "p"


@pytest.mark.parametrize("principal", [GATEWAY, ENCRYPTOR, ML_CONSUMER, DIRECT_PRODUCER])
def test_a_password_without_a_username_names_the_username_to_set(principal: str) -> None:
    """A production process given only its password must not lose it (and then be told to set
    the very variable it set): it is told which username goes with it, never the password."""
    kafka = KafkaSettings(password=SecretStr("prod-secret-7f3a"))
    with pytest.raises(ValueError, match="SEALSTREAM_KAFKA__USERNAME") as err:
        kafka.acting_as(principal)
    assert principal in str(err.value)
    assert "prod-secret-7f3a" not in str(err.value)


def test_an_unknown_password_names_the_setting_and_never_a_password(tmp_path: Path) -> None:
    file = credentials(tmp_path, **{ADMIN: "admin-secret"})
    kafka = KafkaSettings(credentials_file=file).acting_as(ML_CONSUMER)
    with pytest.raises(ValueError, match="SEALSTREAM_KAFKA__PASSWORD") as err:
        kafka_client_config(kafka)
    assert "admin-secret" not in str(err.value) and ML_CONSUMER in str(err.value)
    missing = KafkaSettings(credentials_file=tmp_path / "nowhere.json")
    with pytest.raises(ValueError, match="sealstream stack up"):
        kafka_client_config(missing)


def test_a_broker_without_authentication_gets_no_credentials() -> None:
    config = kafka_client_config(KafkaSettings(security_protocol="PLAINTEXT"))
    assert not any(key.startswith("sasl.") for key in config)


def test_passwords_print_masked() -> None:
    kafka = KafkaSettings(username=GATEWAY, password=SecretStr("hunter2-long-secret"))
    assert "hunter2-long-secret" not in repr(kafka) + str(kafka.model_dump())


def test_a_child_service_runs_as_its_own_principal_never_its_parents() -> None:
    parent = {
        "SEALSTREAM_KAFKA__USERNAME": ADMIN,
        "SEALSTREAM_KAFKA__PASSWORD": "admin-secret",
        "PATH": "/bin",
    }
    env = child_env("encryptor", parent)
    assert env["SEALSTREAM_KAFKA__USERNAME"] == ENCRYPTOR
    assert "SEALSTREAM_KAFKA__PASSWORD" not in env
    assert env["PATH"] == "/bin"


STARTED: list[Settings] = []


def record_start(settings: Settings) -> None:
    """Stands in for a service's `run` entrypoint: records the settings it was started with."""
    STARTED.append(settings)


@pytest.mark.parametrize("service", ["ingest", "encryptor", "admin", "delivery"])
@pytest.mark.parametrize("super_user", [ADMIN, BROKER])
def test_a_service_refuses_to_run_as_a_super_user(
    service: str, super_user: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`SEALSTREAM_KAFKA__USERNAME=sealstream-admin` left in a shell (compose's migrate sets it)
    must not start a service with every right on the broker."""
    monkeypatch.setitem(services._ENTRYPOINTS, service, f"{__name__}:record_start")
    STARTED.clear()
    kafka = KafkaSettings(username=super_user, password=SecretStr("super-secret-9c1d"))
    with pytest.raises(ValueError, match="SEALSTREAM_KAFKA__USERNAME") as err:
        services.run_service(service, Settings(kafka=kafka))
    assert super_user in str(err.value) and "super-secret-9c1d" not in str(err.value)
    assert STARTED == []


def test_a_service_starts_as_its_own_or_a_configured_principal(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(services._ENTRYPOINTS, "ingest", f"{__name__}:record_start")
    STARTED.clear()
    file = credentials(tmp_path, **{GATEWAY: "gw-secret"})
    services.run_service("ingest", Settings(kafka=KafkaSettings(credentials_file=file)))
    own = KafkaSettings(username="prod-gateway", password=SecretStr("p"))
    services.run_service("ingest", Settings(kafka=own))
    assert [s.kafka.principal for s in STARTED] == [GATEWAY, "prod-gateway"]


def test_every_service_but_the_reader_has_a_local_principal() -> None:
    for service, principal in BY_SERVICE.items():
        assert (principal in LOCAL_PRINCIPALS) == (service != "reader"), service
    assert READER not in {right.principal for right in rights(KafkaSettings())}


def test_only_producers_write_the_message_topic_and_the_ml_consumer_only_reads_it() -> None:
    kafka = KafkaSettings()
    table = rights(kafka)
    writers = {
        r.principal for r in table if r.name == kafka.messages_topic and r.operation == "write"
    }
    # The admin API writes only to replay dead letters (`/v1/dead-letters/replay`).
    assert writers == {GATEWAY, DIRECT_PRODUCER, ADMIN_API}
    ml = [r for r in table if r.principal == ML_CONSUMER]
    assert {(r.operation, r.resource, r.name, r.prefixed) for r in ml} == {
        ("read", "topic", kafka.messages_topic, False),
        ("read", "group", kafka.ml_group_prefix, True),
    }
    # No service may join a worker group but that worker (a prefixed right counts too).
    for group, worker in ((kafka.encryptor_group, ENCRYPTOR), (kafka.indexer_group, INDEXER)):
        joiners = {
            r.principal for r in table if allows(r, "group", group) and r.operation == "read"
        }
        assert joiners == {worker}, group


@pytest.mark.parametrize(
    ("prefix", "workers"),
    [
        ("", {}),
        ("sealstream-", {}),
        ("sealstream-encryptor", {}),
        ("sealstream-indexer-ml-", {}),
        ("sealstream-t", {}),
        ("sealstream-tail-ml-", {}),
        ("ml-", {"encryptor_group": "ml-encryptor"}),
        ("ml-team-a-", {"indexer_group": "ml-"}),
    ],
)
def test_an_ml_group_prefix_reaching_a_worker_or_tail_group_is_refused(
    prefix: str, workers: dict[str, str]
) -> None:
    """A prefix that matches a worker group would let a leaked ML credential join it and commit
    past records the worker never stored; one overlapping the tail prefix would share groups with
    the services' throwaway ones."""
    with pytest.raises(ValidationError, match="ml_group_prefix"):
        KafkaSettings(ml_group_prefix=prefix, **workers)


def test_a_separate_ml_group_prefix_is_accepted_and_reaches_no_other_group() -> None:
    kafka = KafkaSettings(ml_group_prefix="acme-ml-")
    ml_groups = {r.name for r in rights(kafka) if r.principal == ML_CONSUMER and r.prefixed}
    assert ml_groups == {"acme-ml-"}
    for group in (kafka.encryptor_group, kafka.indexer_group, f"{TAIL_GROUP_PREFIX}x"):
        assert not any(
            allows(r, "group", group) for r in rights(kafka) if r.principal == ML_CONSUMER
        )


def test_the_admin_api_reads_dead_letters_but_never_the_message_topic() -> None:
    kafka = KafkaSettings()
    api = {
        (r.operation, r.resource, r.name, r.prefixed)
        for r in rights(kafka)
        if r.principal == ADMIN_API
    }
    # DeadLetterReader: assign() on the dead-letter topic, a throwaway group id of the tail
    # prefix (looked up, never joined); replays write the message topic.
    assert ("read", "topic", kafka.dead_letter_topic, False) in api
    assert ("describe", "group", TAIL_GROUP_PREFIX, True) in api
    assert ("write", "topic", kafka.messages_topic, False) in api
    assert ("read", "topic", kafka.messages_topic, False) not in api


def test_the_libraries_run_as_their_principals_unless_one_is_configured(tmp_path: Path) -> None:
    file = credentials(tmp_path, **{ML_CONSUMER: "ml-secret", DIRECT_PRODUCER: "dp-secret"})
    settings = Settings(kafka=KafkaSettings(credentials_file=file))
    assert MessageProducer(settings).kafka.principal == DIRECT_PRODUCER
    group = f"{settings.kafka.ml_group_prefix}features"
    consumer = MessageConsumer(settings, group)
    config = consumer_config(consumer.kafka, group, "c")
    assert (config["sasl.username"], config["sasl.password"]) == (ML_CONSUMER, "ml-secret")
    own = Settings(kafka=KafkaSettings(username="acme-ml", password=SecretStr("p")))
    assert MessageProducer(own).kafka.principal == "acme-ml"
    # A configured principal has ACLs of its operator's making: any group of its own.
    assert MessageConsumer(own, "acme-features").kafka.principal == "acme-ml"


def test_the_ml_consumer_principal_is_refused_a_group_outside_its_prefix() -> None:
    settings = Settings()
    with pytest.raises(ValueError, match="ml_group_prefix") as refused:
        MessageConsumer(settings, "acme-features")
    assert settings.kafka.ml_group_prefix in str(refused.value)


def test_no_documented_command_puts_a_kafka_password_on_its_command_line() -> None:
    """argv is readable by every local user (`ps`, /proc/<pid>/cmdline) and lands in shell
    history: the docs' recipes pass SCRAM passwords through a 0600 file or the Python API."""
    repo = Path(__file__).resolve().parents[2]
    for doc in [repo / "README.md", *sorted((repo / "docs").glob("*.md"))]:
        text = doc.read_text()
        inline = re.findall(r"--add-config\s+['\"]?SCRAM-SHA-\d+=\[?password=", text)
        assert not inline, f"{doc.name}: a SCRAM password on a kafka-configs command line"
    operations = (repo / "docs" / "operations.md").read_text()
    assert "--add-config-file" in operations and "upsert_scram_credentials" in operations
