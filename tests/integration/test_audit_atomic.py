"""Every key state change and its audit record commit together, or neither does (real Postgres,
OpenBao and Redis). The reasons here are text Postgres cannot hold (NUL), passed below the HTTP
edge on purpose: the audit insert fails, and the change it records must not have happened."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from sealstream.keys.service import KeyService
from tests.integration.test_keys import make_service

UNSTORABLE = "reason with a NUL \x00 inside"


@pytest.fixture
def keys(settings, database, kms):
    service = make_service(settings, database, kms)
    yield service
    service.close()


def _audit_actions(keys: KeyService, chat: uuid.UUID) -> list[str]:
    return [e.action for e in keys.repo.audit_entries(chat)]


def test_rotation_that_cannot_be_audited_does_not_happen(keys: KeyService) -> None:
    chat = uuid.uuid4()
    keys.create_chat(chat, ("alice", "bob"))
    with pytest.raises(Exception):  # whatever the adapter raises: the state is what counts
        keys.rotate(chat, UNSTORABLE)
    assert [(d.dek_version, d.state) for d in keys.repo.deks(chat)] == [(1, "active")]
    assert keys.current_version(chat) == 1
    assert "dek_rotated" not in _audit_actions(keys, chat)
    # The same rotation with a storable reason happens and is audited.
    assert keys.rotate(chat, "fine") == 2
    assert _audit_actions(keys, chat)[0] == "dek_rotated"


def test_shred_that_cannot_be_audited_does_not_happen(keys: KeyService) -> None:
    chat = uuid.uuid4()
    keys.create_chat(chat, ("alice",))
    with pytest.raises(Exception):  # whatever the adapter raises: the state is what counts
        keys.delete_chat(chat, UNSTORABLE)
    chat_row = keys.chat(chat)
    assert chat_row is not None and chat_row.state == "active"
    [dek] = keys.repo.deks(chat)
    assert dek.state == "active" and dek.encrypted_dek is not None
    assert keys.current_key(chat).version == 1
    assert keys.delete_chat(chat, "fine") == [1]
    assert _audit_actions(keys, chat)[0] == "chat_shredded"


def test_destroying_retired_versions_that_cannot_be_audited_does_not_happen(
    keys: KeyService,
) -> None:
    chat = uuid.uuid4()
    keys.create_chat(chat, ("alice",))
    keys.rotate(chat, "to retire version 1")
    future = datetime.now(UTC) + timedelta(days=1)
    with pytest.raises(Exception):  # whatever the adapter raises: the state is what counts
        keys.destroy_retired(chat, future, "retention", UNSTORABLE)
    assert [d.state for d in keys.repo.deks(chat)] == ["retired", "active"]
    assert keys.destroy_retired(chat, future, "retention", "fine") == [1]
    assert [d.state for d in keys.repo.deks(chat)] == ["destroyed", "active"]
    assert _audit_actions(keys, chat)[0] == "retention"
