"""docker-compose.yml and the Dockerfile must describe the same system as the settings.

No Docker engine runs here, so this reads the files: the servers publish the local stack's ports,
the in-network addresses the services are given are ones the servers listen on, every
`SEALSTREAM_*` variable is a real setting (a renamed field breaks this test), and a service's
environment builds a valid `Settings`. Needs no server.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from pydantic import BaseModel

from sealstream import settings as settings_module
from sealstream.kafka_principals import ADMIN, BROKER, BY_SERVICE
from sealstream.settings import Settings, StackSettings

REPO = Path(__file__).resolve().parents[2]
COMPOSE: dict[str, Any] = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
INFRASTRUCTURE = ("kafka", "cassandra", "opensearch", "postgres", "redis", "openbao", "s3proxy")
PROJECT_SERVICES = ("ingest", "encryptor", "indexer", "reader", "admin", "delivery")
PREFIX = "SEALSTREAM_"


def environment(service: str) -> dict[str, str]:
    """A service's environment, from either the mapping or the `KEY=value` list form."""
    env = SERVICES[service].get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def port_mappings(service: str) -> dict[int, int]:
    """Published host port -> container port, from short (`[ip:]host:container[/proto]`) and
    long (`{published, target}`) port syntax."""
    mappings: dict[int, int] = {}
    for entry in SERVICES[service].get("ports", []):
        if isinstance(entry, dict):
            mappings[int(entry["published"])] = int(entry["target"])
            continue
        parts = str(entry).split("/", 1)[0].split(":")
        assert len(parts) >= 2, f"{service}: port {entry!r} publishes no fixed host port"
        mappings[int(parts[-2])] = int(parts[-1])
    return mappings


def entrypoint_of_image() -> list[str]:
    for line in (REPO / "Dockerfile").read_text().splitlines():
        if line.startswith("ENTRYPOINT"):
            entrypoint: list[str] = json.loads(line.removeprefix("ENTRYPOINT"))
            return entrypoint
    raise AssertionError("the Dockerfile has no ENTRYPOINT")


def argv(service: str) -> list[str]:
    """What the container really runs: its entrypoint (the compose file's, else the image's)
    followed by its command."""
    spec = SERVICES[service]
    entrypoint = spec.get("entrypoint", entrypoint_of_image())
    return [*entrypoint, *spec.get("command", [])]


@pytest.fixture(autouse=True)
def no_sealstream_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Defaults and compose values only: nothing from the shell that runs the tests."""
    for name in [n for n in os.environ if n.upper().startswith(PREFIX)]:
        monkeypatch.delenv(name)


def compose_settings(service: str, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """`Settings()` as the service's container would build it."""
    for name, value in environment(service).items():
        monkeypatch.setenv(name, value)
    return Settings()


# --- what is there ------------------------------------------------------------------------------


def test_every_server_and_service_is_there() -> None:
    assert set(INFRASTRUCTURE) <= set(SERVICES)
    assert set(PROJECT_SERVICES) <= set(SERVICES)
    assert "migrate" in SERVICES


@pytest.mark.parametrize("service", PROJECT_SERVICES)
def test_project_services_run_their_subcommand_from_the_image(service: str) -> None:
    assert SERVICES[service]["build"] == "."
    assert argv(service) == ["sealstream", "run", service]
    assert SERVICES[service]["depends_on"]["migrate"]["condition"] == (
        "service_completed_successfully"
    )


def test_migrate_runs_once_after_every_server_is_ready() -> None:
    migrate = SERVICES["migrate"]
    assert migrate["build"] == "."
    assert argv("migrate") == ["sealstream", "migrate"]
    assert migrate.get("restart", "no") == "no"
    for server in INFRASTRUCTURE:
        if server == "openbao":  # reached through openbao-init, which needs it healthy
            assert migrate["depends_on"]["openbao-init"]["condition"] == (
                "service_completed_successfully"
            )
            assert SERVICES["openbao-init"]["depends_on"]["openbao"]["condition"] == (
                "service_healthy"
            )
        else:
            assert migrate["depends_on"][server]["condition"] == "service_healthy"
        assert "healthcheck" in SERVICES[server], f"{server} has no healthcheck to wait for"


def test_kafka_authenticates_every_client_and_denies_what_no_acl_allows() -> None:
    kafka = environment("kafka")
    protocols = dict(
        item.split(":") for item in kafka["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(",")
    )
    assert set(protocols.values()) == {"SASL_PLAINTEXT"}  # no listener takes anonymous clients
    assert kafka["KAFKA_AUTHORIZER_CLASS_NAME"].endswith("StandardAuthorizer")
    assert kafka["KAFKA_ALLOW_EVERYONE_IF_NO_ACL_FOUND"] == "false"
    assert kafka["KAFKA_SUPER_USERS"] == f"User:{BROKER};User:{ADMIN}"


@pytest.mark.parametrize("service", ["migrate", *PROJECT_SERVICES])
def test_each_service_runs_as_its_own_kafka_principal_with_a_password_kafka_init_sets(
    service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    kafka = compose_settings(service, monkeypatch).kafka
    expected = ADMIN if service == "migrate" else BY_SERVICE[service]
    if service == "reader":  # no Kafka client, hence no credentials at all
        assert kafka.username is None and kafka.password is None
        return
    assert kafka.username == expected
    assert kafka.password is not None
    script = " ".join(SERVICES["kafka-init"]["command"])
    short = expected.removeprefix("sealstream-")
    assert f" {short} " in script.split("; do")[0] + " "
    assert kafka.password.get_secret_value() == f"sealstream-local-{short}"
    assert "sealstream-local-$$principal" in script


def test_openbao_init_makes_the_default_derived_key() -> None:
    script = " ".join(SERVICES["openbao-init"]["command"])
    default_key = Settings().vault.default_key
    assert "secrets enable transit" in script
    assert f"transit/keys/{default_key}" in script and "derived=true" in script
    assert (
        SERVICES["openbao-init"]["environment"]["BAO_TOKEN"]
        == (SERVICES["openbao"]["environment"]["BAO_DEV_ROOT_TOKEN_ID"])
    )


# --- ports --------------------------------------------------------------------------------------


def test_servers_publish_the_local_stack_ports() -> None:
    stack = StackSettings()
    expected = {
        "kafka": (settings_module.KAFKA_PORT, stack.kafka_port),
        "cassandra": (settings_module.CASSANDRA_PORT, stack.cassandra_port),
        "opensearch": (settings_module.OPENSEARCH_PORT, stack.opensearch_port),
        "postgres": (settings_module.POSTGRES_PORT, stack.postgres_port),
        "redis": (settings_module.REDIS_PORT, stack.redis_port),
        "openbao": (settings_module.OPENBAO_PORT, stack.openbao_port),
        "s3proxy": (settings_module.S3PROXY_PORT, stack.s3proxy_port),
    }
    for service, (constant, stack_default) in expected.items():
        assert constant == stack_default, f"{service}: settings constant and StackSettings differ"
        assert constant in port_mappings(service), f"{service} should publish {constant}"


def test_every_published_port_binds_loopback_only() -> None:
    """The compose passwords are public (a Kafka super user's, OpenBao's root token): a port
    published on every interface would hand them to the whole network. Only `127.0.0.1:` will do,
    in the short (`ip:host:container`) and the long (`host_ip`) syntax alike."""
    published = 0
    for service, spec in SERVICES.items():
        for entry in spec.get("ports", []):
            published += 1
            if isinstance(entry, dict):
                host_ip = entry.get("host_ip")
            else:
                parts = str(entry).split("/", 1)[0].split(":")
                host_ip = parts[0] if len(parts) == 3 else None
            assert host_ip == "127.0.0.1", (
                f"{service}: port {entry!r} is published on every interface, not 127.0.0.1 only"
            )
    assert published >= len(INFRASTRUCTURE) + len(PROJECT_SERVICES)


def test_default_settings_reach_the_published_ports() -> None:
    """A host process with default settings talks to the compose servers unchanged."""
    defaults = Settings()
    reached = {
        "kafka": int(defaults.kafka.bootstrap.rsplit(":", 1)[1]),
        "cassandra": defaults.cassandra.port,
        "opensearch": urlsplit(defaults.opensearch.url).port,
        "postgres": defaults.postgres.port,
        "redis": urlsplit(defaults.redis.url).port,
        "openbao": urlsplit(defaults.vault.address).port,
        "s3proxy": urlsplit(defaults.object_store.endpoint).port,
    }
    for service, port in reached.items():
        assert port in port_mappings(service), f"default settings miss {service}'s port"


def test_kafka_advertises_a_reachable_address_on_each_side() -> None:
    """Kafka redirects a client to the advertised address of the listener it connected to, so
    the host side must advertise loopback and the in-network side the service name."""
    kafka = environment("kafka")
    advertised = dict(
        item.split("://", 1)[::-1] for item in kafka["KAFKA_ADVERTISED_LISTENERS"].split(",")
    )
    listeners = {
        name: address.rsplit(":", 1)[1]
        for name, address in (item.split("://", 1) for item in kafka["KAFKA_LISTENERS"].split(","))
    }
    host_port = settings_module.KAFKA_PORT
    assert f"127.0.0.1:{host_port}" in advertised
    host_listener = advertised[f"127.0.0.1:{host_port}"]
    assert int(listeners[host_listener]) == port_mappings("kafka")[host_port]
    for service in PROJECT_SERVICES:
        bootstrap = environment(service)["SEALSTREAM_KAFKA__BOOTSTRAP"]
        assert bootstrap in advertised, f"{service} bootstraps from an unadvertised {bootstrap}"


@pytest.mark.parametrize("service", ["migrate", *PROJECT_SERVICES])
def test_services_use_ports_the_servers_listen_on(
    service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In-network addresses name the server's service and a container port it publishes."""
    cfg = compose_settings(service, monkeypatch)
    targets = {
        "cassandra": (cfg.cassandra.hosts[0], cfg.cassandra.port),
        "opensearch": (urlsplit(cfg.opensearch.url).hostname, urlsplit(cfg.opensearch.url).port),
        "postgres": (cfg.postgres.host, cfg.postgres.port),
        "redis": (urlsplit(cfg.redis.url).hostname, urlsplit(cfg.redis.url).port),
        "openbao": (urlsplit(cfg.vault.address).hostname, urlsplit(cfg.vault.address).port),
        "s3proxy": (
            urlsplit(cfg.object_store.endpoint).hostname,
            urlsplit(cfg.object_store.endpoint).port,
        ),
    }
    for server, (host, port) in targets.items():
        assert host == server
        assert port in port_mappings(server).values(), f"{server} does not listen on {port}"


@pytest.mark.parametrize(
    ("service", "field"),
    [
        ("ingest", "ingest"),
        ("reader", "reader"),
        ("encryptor", "encryptor_http"),
        ("indexer", "indexer_http"),
        ("admin", "admin"),
        ("delivery", "delivery"),
    ],
)
def test_http_services_listen_on_all_interfaces_and_publish_their_port(
    service: str, field: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    http = getattr(compose_settings(service, monkeypatch), field)
    default_port = getattr(Settings(), field).port
    assert http.host == "0.0.0.0"  # noqa: S104 - inside a container, to be reachable at all
    assert port_mappings(service).get(default_port) == http.port == default_port


# --- every variable is a real setting -----------------------------------------------------------


def _model_of(annotation: Any) -> type[BaseModel] | None:
    return (
        annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    )


def setting_path_error(model: type[BaseModel], parts: list[str]) -> str | None:
    """None if `parts` (from `A__B__C`) walks the nested models down to a field, else why not.

    pydantic-settings matches names case-insensitively, hence the lower-casing.
    """
    head, rest = parts[0].lower(), parts[1:]
    field = model.model_fields.get(head)
    if field is None:
        return f"{model.__name__} has no field {head!r}"
    if not rest:
        return None
    nested = _model_of(field.annotation)
    if nested is None:
        return f"{model.__name__}.{head} is not a nested settings model"
    return setting_path_error(nested, rest)


def sealstream_variables() -> list[tuple[str, str]]:
    """(service, name) of every SEALSTREAM_* variable anywhere in the compose file."""
    return [
        (service, name)
        for service in SERVICES
        for name in environment(service)
        if name.startswith(PREFIX)
    ]


def test_the_walk_rejects_renamed_settings() -> None:
    """The check below must catch a stale name, or it proves nothing."""
    assert setting_path_error(Settings, ["KAFKA", "BOOTSTRAP"]) is None
    assert setting_path_error(Settings, ["KAFKA", "BOOTSTRAP_SERVERS"]) is not None
    assert setting_path_error(Settings, ["POSTGRES", "PASSWORD", "X"]) is not None
    assert setting_path_error(Settings, ["VAULT_ADDRESS"]) is not None


def test_every_variable_is_a_real_setting() -> None:
    variables = sealstream_variables()
    assert {service for service, _ in variables} >= {"migrate", *PROJECT_SERVICES}
    for service, name in variables:
        parts = name.removeprefix(PREFIX).split("__")
        error = setting_path_error(Settings, parts)
        assert error is None, f"{service}: {name} is not a setting ({error})"


@pytest.mark.parametrize("service", ["migrate", *PROJECT_SERVICES])
def test_settings_load_from_the_compose_environment(
    service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = compose_settings(service, monkeypatch)
    assert cfg.kafka.bootstrap == "kafka:9092"
    assert cfg.cassandra.hosts == ("cassandra",)
    assert cfg.cassandra.port == 9042
    assert (cfg.postgres.host, cfg.postgres.port) == ("postgres", 5432)
    assert cfg.postgres.password.get_secret_value() == environment("postgres")["POSTGRES_PASSWORD"]
    assert (cfg.postgres.user, cfg.postgres.database) == (
        environment("postgres")["POSTGRES_USER"],
        environment("postgres")["POSTGRES_DB"],
    )
    assert cfg.redis.url == "redis://redis:6379/0"
    assert cfg.vault.address == "http://openbao:8200"
    assert (
        cfg.vault.resolved_token().get_secret_value()
        == (environment("openbao")["BAO_DEV_ROOT_TOKEN_ID"])
    )
    assert cfg.opensearch.url == "http://opensearch:9200"
    assert cfg.environment == "local"


# --- images -------------------------------------------------------------------------------------


def _pom_version(server: str) -> str:
    pom = (REPO / "stack" / server / "pom.xml").read_text()
    found = re.search(rf"<{server}\.version>\s*([^<\s]+)\s*</{server}\.version>", pom)
    assert found, f"stack/{server}/pom.xml names no {server}.version"
    return found.group(1)


@pytest.mark.parametrize(
    ("service", "image"),
    [
        ("kafka", "apache/kafka"),
        ("opensearch", "opensearchproject/opensearch"),
        ("cassandra", "cassandra"),
    ],
)
def test_images_are_the_releases_the_local_stack_runs(service: str, image: str) -> None:
    """Same major.minor as the local stack's Maven-resolved server (exact where pinned)."""
    name, _, tag = SERVICES[service]["image"].partition(":")
    assert name == image
    version = _pom_version(service)
    assert tag == version or version.startswith(f"{tag}."), f"{service}: {tag} vs {version}"


def test_opensearch_has_the_analysis_icu_plugin_like_the_local_stack() -> None:
    """The index's analyzers name icu_tokenizer/icu_normalizer/icu_folding: the container
    installs the official plugin before the image's own entrypoint starts the node."""
    script = " ".join(SERVICES["opensearch"]["entrypoint"])
    install = script.index("opensearch-plugin install --batch analysis-icu")
    assert script.index("exec ./opensearch-docker-entrypoint.sh opensearch") > install
    analysis = json.loads((REPO / "schemas/opensearch/messages.json").read_text())
    assert "icu_tokenizer" in json.dumps(analysis["settings"]["analysis"])
    plugin = (REPO / "stack/opensearch/SealstreamIcuPlugin.java").read_text()
    for name in ("icu_tokenizer", "icu_normalizer", "icu_folding"):
        assert f'"{name}"' in plugin


# --- durability ---------------------------------------------------------------------------------


def test_cassandra_acknowledges_only_synced_writes_like_the_local_stack() -> None:
    """The image's default (periodic, 10 s) loses acknowledged writes in a crash."""
    script = " ".join(SERVICES["cassandra"]["command"])
    mode = StackSettings().cassandra_commitlog_sync
    assert f"s/^commitlog_sync:.*/commitlog_sync: {mode}/" in script
    # Cassandra refuses a sync period outside periodic mode.
    assert "/^commitlog_sync_period:/d" in script


def test_postgres_keeps_its_durable_defaults() -> None:
    """The image syncs every commit by default; nothing here may turn that off."""
    spec = json.dumps(SERVICES["postgres"])
    for unsafe in ("fsync=off", "synchronous_commit=off", "full_page_writes=off"):
        assert unsafe not in spec.replace(" ", "")


def test_the_image_and_the_package_hold_every_service_module() -> None:
    """Each service's top-level package is copied into the image and installed by pip (the
    admin API's was once missing from the image: `run admin` failed only in the container)."""
    from sealstream.services import _ENTRYPOINTS

    dockerfile = (REPO / "Dockerfile").read_text()
    pyproject = (REPO / "pyproject.toml").read_text()
    for name, entrypoint in _ENTRYPOINTS.items():
        package = entrypoint.split(".", 1)[0]
        assert f"COPY {package} ./{package}" in dockerfile, name
        assert f'"{package}*"' in pyproject, name
