"""A key the KMS refuses for good stops only the records that need it.

One tenant's Transit master key is deleted (an operator's mistake, or a tenant's key destroyed on
purpose): the encryptor must still seal and store every other chat's records of the same batch,
and dead-letter the records of that tenant's chats with the reason, not hold the whole stage
retrying forever (which stopped every tenant). Real OpenBao, Postgres, Redis and Cassandra.
"""

from __future__ import annotations

import secrets
import uuid
from datetime import UTC, datetime

import pytest

from encryptor.logic import encrypt_and_store
from schemas.events import MessageRecord
from schemas.ids import SnowflakeIds
from sealstream.adapters.cassandra import MessageStore
from sealstream.adapters.postgres import Database
from sealstream.adapters.vault import TransitKms
from sealstream.errors import KmsError, KmsKeyUnusable
from sealstream.settings import Settings
from sealstream.streaming import RawRecord
from sealstream.wiring import key_service


def _record(chat: uuid.UUID, message_id: int, offset: int, tenant: str) -> RawRecord:
    record = MessageRecord(
        message_id=message_id,
        chat_id=chat,
        tenant_id=tenant,
        sender_id="alice",
        text=f"kms refusal {offset}",
        sent_at=datetime.now(UTC),
    )
    return RawRecord("t", 0, offset, record.key(), record.value())


def test_a_tenant_whose_master_key_is_gone_is_dead_lettered_not_holding_the_batch(
    settings: Settings, database: Database, message_store: MessageStore
) -> None:
    tenant, key_name = f"gone-{secrets.token_hex(3)}", f"gone-{secrets.token_hex(3)}"
    lost, fine = uuid.uuid4(), uuid.uuid4()
    with key_service(settings, db=database) as keys:
        keys.register_tenant(tenant, key_name)
        keys.create_chat(lost, ("alice",), tenant)
        keys.create_chat(fine, ("alice",))
    TransitKms(settings.vault).delete_key(key_name)

    ids = SnowflakeIds(34)
    batch = [
        _record(lost, ids.next_id(), 0, tenant),
        _record(fine, ids.next_id(), 1, "default"),
        _record(lost, ids.next_id(), 2, tenant),
        _record(fine, ids.next_id(), 3, "default"),
    ]
    # A fresh process: no plaintext DEK in memory (Redis never holds one).
    with key_service(settings, db=database) as keys:
        with pytest.raises(KmsKeyUnusable):
            keys.current_key(lost)
        rejected = encrypt_and_store(batch, keys, message_store, keys.repo)

    assert [r.record.offset for r in rejected] == [0, 2]
    assert {r.reason for r in rejected} == {
        "the KMS refused this chat's key (master key missing or wrapped DEK invalid)"
    }
    for raw in batch:
        message = MessageRecord.model_validate_json(raw.value)
        stored = message_store.get(message.chat_id, message.message_id)
        assert (stored is not None) == (message.chat_id == fine)


def test_a_kms_refusing_everything_still_holds_the_stage(
    settings: Settings, database: Database
) -> None:
    """The other side of the split: a missing Transit mount (like a revoked token) refuses every
    key alike; that stays a plain KmsError, which the runtime retries (holds), because
    dead-lettering would empty the whole topic onto the dead-letter topic."""
    broken = settings.vault.model_copy(update={"transit_mount": "no-such-mount"})
    with pytest.raises(KmsError) as refused:
        TransitKms(broken).unwrap("any", "vault:v1:AAAA", b"context")
    assert not isinstance(refused.value, KmsKeyUnusable)
