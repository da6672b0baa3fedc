"""Unit tests of the core library pieces that need no server."""

from __future__ import annotations

import json
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import jwt
import pytest
from pydantic import SecretStr, ValidationError

from schemas.changes import ChangeEvent
from schemas.events import MAX_TEXT_BYTES, MessageRecord, decode_record, export_json_schema
from schemas.ids import BUCKET_MS, EPOCH_MS, SnowflakeIds, bucket_at, bucket_of, id_millis
from sealstream.auth import AuthError, Principal, mint_token, verify_principal, verify_token
from sealstream.keys.cache import TtlCache
from sealstream.settings import (
    AdminHttp,
    AuthSettings,
    DeliveryHttp,
    IngestHttp,
    PostgresSettings,
    ReaderHttp,
    Settings,
)

REPO = Path(__file__).resolve().parents[2]


def record(**overrides: object) -> MessageRecord:
    fields: dict[str, object] = {
        "message_id": SnowflakeIds(1).next_id(),
        "chat_id": uuid.uuid4(),
        "sender_id": "alice",
        "text": "hello",
        "sent_at": datetime.now(UTC),
    }
    fields.update(overrides)
    return MessageRecord.model_validate(fields)


# --- contracts -------------------------------------------------------------------------------


def test_exported_json_schema_is_in_step_with_the_model() -> None:
    on_disk = json.loads((REPO / "schemas" / "message_record.v1.json").read_text())
    assert on_disk == json.loads(json.dumps(export_json_schema())), (
        "schemas/message_record.v1.json is stale: regenerate it (see README, 'Contracts')"
    )


def test_record_round_trips_and_is_keyed_by_chat() -> None:
    original = record(text="héllo 世界 🚀")
    decoded = decode_record(original.value(), original.key())
    assert decoded == original
    assert original.key() == str(original.chat_id).encode()


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"text": ""}, "text"),
        ({"text": "   \n"}, "text"),
        ({"text": "x" * (MAX_TEXT_BYTES + 1)}, "text"),
        ({"message_id": 0}, "message_id"),
        ({"sender_id": ""}, "sender_id"),
    ],
)
def test_invalid_records_are_rejected_with_the_field_and_never_the_text(
    change: dict[str, object], field: str
) -> None:
    good = json.loads(record(text="secret words").value())
    good.update(change)
    reason = decode_record(json.dumps(good).encode(), None)
    assert isinstance(reason, str) and field in reason
    assert "secret words" not in reason and "xxxxxxxx" not in reason


def test_size_limit_counts_utf8_bytes() -> None:
    emoji = "🚀" * (MAX_TEXT_BYTES // 4)  # exactly at the limit in bytes
    assert record(text=emoji).text == emoji
    reason = decode_record(json.loads(json.dumps({"x": 1})) and b"{}", None)
    assert isinstance(reason, str)
    with pytest.raises(ValidationError, match=str(MAX_TEXT_BYTES)):
        record(text=emoji + "🚀")


def test_key_mismatch_and_garbage_go_to_dead_letters() -> None:
    good = record()
    assert "key does not match" in str(decode_record(good.value(), b"other"))
    assert "no key" in str(decode_record(good.value(), None))
    assert "invalid record" in str(decode_record(b"\xff\xfe not json", None))


# --- message ids -------------------------------------------------------------------------------


def test_edits_and_deletes_carry_their_own_later_event_id_and_only_an_edit_has_text() -> None:
    ids = SnowflakeIds(1)
    message_id, event_id = ids.next_id(), ids.next_id()
    edit = record(kind="edit", message_id=message_id, event_id=event_id, text="new")
    assert edit.change_id == event_id and record(message_id=message_id).change_id == message_id
    delete = record(kind="delete", message_id=message_id, event_id=event_id, text=None)
    assert MessageRecord.model_validate_json(delete.value()) == delete
    refused = {
        "text: required when kind is post": {"text": None},
        "text: required when kind is edit": {"kind": "edit", "event_id": event_id, "text": None},
        "text: a delete carries no text": {"kind": "delete", "event_id": event_id},
        "event_id: required when kind is delete": {"kind": "delete", "text": None},
        "event_id: must be greater than message_id": {"kind": "edit", "event_id": message_id},
        "event_id: a post's event id is its message id": {"event_id": event_id},
        "kind": {"kind": "undo"},
    }
    for reason, fields in refused.items():
        result = decode_record(
            json.dumps({**json.loads(record(message_id=message_id).value()), **fields}).encode(),
            record(message_id=message_id).key(),
        )
        assert isinstance(result, str) and reason in result, (reason, result)
        assert "hello" not in result


def test_change_events_round_trip_with_the_envelope_as_base64() -> None:
    event = ChangeEvent(
        kind="post",
        event_id=7,
        chat_id=uuid.uuid4(),
        tenant_id="acme",
        message_id=7,
        sender_id="alice",
        revision=1,
        dek_version=3,
        envelope=bytes(range(256)),
        created_at=datetime.now(UTC),
    )
    assert ChangeEvent.model_validate_json(event.value()) == event
    assert event.key() == str(event.chat_id).encode()
    assert isinstance(json.loads(event.value())["envelope"], str)


def test_snowflake_ids_increase_and_encode_time_and_bucket() -> None:
    start = EPOCH_MS + 5 * BUCKET_MS + 123
    calls = [0]

    def clock() -> int:  # a slow clock: one millisecond per 5,000 readings
        calls[0] += 1
        return start + calls[0] // 5000

    ids = SnowflakeIds(7, clock_ms=clock)
    produced = [ids.next_id() for _ in range(10_000)]  # > 4096 in one ms: must wait for the next
    assert produced == sorted(produced) and len(set(produced)) == len(produced)
    assert id_millis(produced[0]) == start and id_millis(produced[-1]) > start
    assert bucket_of(produced[0]) == 5 == bucket_at(start)


def test_snowflake_ids_survive_a_clock_going_backwards() -> None:
    clock = [EPOCH_MS + 10_000]
    ids = SnowflakeIds(1, clock_ms=lambda: clock[0])
    first = ids.next_id()
    clock[0] -= 5_000
    assert ids.next_id() > first


def test_snowflake_ids_unique_across_threads() -> None:
    ids = SnowflakeIds(3)
    out: list[int] = []
    lock = threading.Lock()

    def work() -> None:
        mine = [ids.next_id() for _ in range(2000)]
        with lock:
            out.extend(mine)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(out)) == 8000


# --- in-process DEK cache --------------------------------------------------------------------


def test_cache_expires_entries_and_bounds_its_size() -> None:
    now = [0.0]
    cache: TtlCache[str, int] = TtlCache(max_entries=2, ttl_seconds=10, clock=lambda: now[0])
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # a is now most recently used
    cache.put("c", 3)  # evicts b, the least recently used
    assert cache.get("b") is None and cache.get("a") == 1 and cache.get("c") == 3
    now[0] = 10.0
    assert cache.get("a") is None and len(cache) == 1


def test_concurrent_misses_of_one_key_load_once() -> None:
    cache: TtlCache[str, int] = TtlCache(max_entries=10, ttl_seconds=60)
    calls = []
    barrier = threading.Barrier(16)

    def loader() -> int:
        calls.append(1)
        time.sleep(0.05)
        return 42

    results: list[int] = []

    def worker() -> None:
        barrier.wait()
        results.append(cache.get_or_load("chat", loader)[0])

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [42] * 16 and len(calls) == 1


def test_a_failed_load_is_not_cached() -> None:
    cache: TtlCache[str, int] = TtlCache(max_entries=10, ttl_seconds=60)

    def failing() -> int:
        raise RuntimeError("kms down")

    with pytest.raises(RuntimeError):
        cache.get_or_load("k", failing)
    assert cache.get("k") is None
    assert cache.get_or_load("k", lambda: 5) == (5, True)


# --- auth -----------------------------------------------------------------------------------


def test_tokens_verify_and_reject_tampering_expiry_and_alg_none() -> None:
    settings = AuthSettings()
    token = mint_token(settings, "alice")
    assert verify_token(settings, token) == "alice"
    other = AuthSettings(secret=SecretStr("another-secret-that-is-long-enough-000"))
    with pytest.raises(AuthError):
        verify_token(other, token)
    with pytest.raises(AuthError, match="expired"):
        verify_token(settings, mint_token(settings, "alice", ttl_seconds=-10))
    unsigned = jwt.encode(
        {"sub": "alice", "iss": "sealstream", "exp": 2**40}, key=None, algorithm="none"
    )
    with pytest.raises(AuthError):
        verify_token(settings, unsigned)


def test_tokens_carry_roles_and_tenant_and_reject_malformed_claims() -> None:
    settings = AuthSettings()
    plain = verify_principal(settings, mint_token(settings, "alice"))
    assert plain == Principal("alice", frozenset(), None)
    ops = verify_principal(settings, mint_token(settings, "ops", roles=("admin",), tenant="acme"))
    assert ops.roles == {"admin"} and ops.tenant == "acme"
    secret = settings.secret.get_secret_value()
    for bad in ({"roles": "admin"}, {"roles": [1]}, {"tenant": 7}, {"tenant": ""}):
        claims = {"sub": "x", "iss": "sealstream", "exp": 2**40, **bad}
        with pytest.raises(AuthError, match="bad"):
            verify_principal(settings, jwt.encode(claims, secret, algorithm="HS256"))


# --- settings -------------------------------------------------------------------------------


def test_secrets_print_masked() -> None:
    text = repr(Settings()) + str(Settings().model_dump())
    assert "sealstream-local" not in text
    assert AuthSettings().secret.get_secret_value() not in text


def test_production_refuses_local_defaults() -> None:
    with pytest.raises(ValidationError, match=r"auth\.secret"):
        Settings(environment="production")
    tls = {"tls_cert": Path("c.pem"), "tls_key": Path("k.pem")}
    with pytest.raises(ValidationError, match=r"delivery tls_cert"):
        Settings(
            environment="production",
            auth=AuthSettings(secret=SecretStr("p" * 40)),
            ingest=IngestHttp(**tls),
            reader=ReaderHttp(**tls),
        )
    with pytest.raises(ValidationError, match=r"postgres\.password"):
        Settings(
            environment="production",
            auth=AuthSettings(secret=SecretStr("p" * 40)),
            ingest=IngestHttp(**tls),
            reader=ReaderHttp(**tls),
            admin=AdminHttp(**tls),
            delivery=DeliveryHttp(**tls),
        )
    # Kafka credentials and records never cross the network in clear in production.
    with pytest.raises(ValidationError, match=r"kafka\.security_protocol must be SASL_SSL"):
        Settings(
            environment="production",
            auth=AuthSettings(secret=SecretStr("p" * 40)),
            ingest=IngestHttp(**tls),
            reader=ReaderHttp(**tls),
            admin=AdminHttp(**tls),
            delivery=DeliveryHttp(**tls),
            postgres=PostgresSettings(password=SecretStr("a-real-one")),
        )
    # Live delivery serves message text too: without its TLS, production refuses to start.
    with pytest.raises(ValidationError, match=r"delivery tls_cert"):
        Settings(
            environment="production",
            auth=AuthSettings(secret=SecretStr("p" * 40)),
            ingest=IngestHttp(**tls),
            reader=ReaderHttp(**tls),
            admin=AdminHttp(**tls),
        )


def test_settings_come_from_prefixed_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEALSTREAM_KAFKA__BOOTSTRAP", "broker:9092")
    monkeypatch.setenv("SEALSTREAM_CASSANDRA__HOSTS", '["c1","c2"]')
    monkeypatch.setenv("SEALSTREAM_POSTGRES__PASSWORD", "pw")
    settings = Settings()
    assert settings.kafka.bootstrap == "broker:9092"
    assert settings.cassandra.hosts == ("c1", "c2")
    assert settings.postgres.password.get_secret_value() == "pw"
