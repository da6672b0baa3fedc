"""Blind-index tokens (docs/format.md, "Blind index tokens") and the blind index's logic with
small fakes of our own ports. The real-stack tests are in tests/integration/test_blind_index.py.

The vectors in tests/vectors/index_term_v1.json are checked twice: through `keyed_term`, and
through an independent computation here written from the format's text (stdlib hmac).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import struct
import subprocess
import sys
import uuid
from collections.abc import Collection
from datetime import UTC, datetime
from pathlib import Path

import pytest

from indexer.logic import index_batch
from schemas.events import MessageRecord
from schemas.ids import SnowflakeIds
from sealstream.adapters.opensearch import IndexedMessage, RefusedDocument
from sealstream.adapters.postgres import IndexKeyRow
from sealstream.crypto import IndexKey, keyed_term
from sealstream.deletion_state import ChatState
from sealstream.errors import KmsKeyUnusable, KmsUnavailable
from sealstream.keys.index_keys import IndexKeys, index_key_context
from sealstream.keys.ports import DataKey
from sealstream.streaming import RawRecord

VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "index_term_v1.json"


def spec_token(key: bytes, tenant: str, version: int, term: str) -> str:
    """The token as docs/format.md defines it, without sealstream.crypto."""
    t = tenant.encode()
    message = (
        b"sealstream/index-term/v1"
        + struct.pack(">H", len(t))
        + t
        + struct.pack(">I", version)
        + term.encode()
    )
    mac = hmac.new(key, message, hashlib.sha256).digest()[:16]
    return base64.urlsafe_b64encode(mac).decode().rstrip("=")


def test_vectors_match_the_module_and_the_written_format() -> None:
    vectors = json.loads(VECTORS.read_text(encoding="utf-8"))["vectors"]
    assert len(vectors) >= 10
    for v in vectors:
        key = IndexKey(v["tenant_id"], v["key_version"], bytes.fromhex(v["key_hex"]))
        assert keyed_term(key, v["term"]) == v["token"], v["name"]
        assert (
            spec_token(bytes.fromhex(v["key_hex"]), v["tenant_id"], v["key_version"], v["term"])
            == v["token"]
        ), v["name"]
        assert len(v["token"]) == 22 and "=" not in v["token"]
    # Every vector's token differs: version, tenant, key and term each change it.
    assert len({v["token"] for v in vectors}) == len(vectors)


def test_vector_file_is_what_the_generator_writes() -> None:
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "tests/vectors/generate_index_terms.py", "--check"], cwd=root
    )
    assert result.returncode == 0


def test_a_flipped_key_bit_or_another_binding_changes_the_token() -> None:
    material = bytes(range(32))
    key = IndexKey("acme", 1, material)
    token = keyed_term(key, "quokka")
    flipped = bytes([material[0] ^ 1]) + material[1:]
    assert keyed_term(IndexKey("acme", 1, flipped), "quokka") != token
    assert keyed_term(IndexKey("acme", 2, material), "quokka") != token
    assert keyed_term(IndexKey("acme2", 1, material), "quokka") != token
    # The tenant is length-prefixed: moving bytes between tenant and term changes the token.
    assert keyed_term(IndexKey("acm", 1, material), "equokka") != keyed_term(
        IndexKey("acme", 1, material), "quokka"
    )


def test_index_key_checks_its_inputs_and_never_shows_its_bytes() -> None:
    material = b"\x11" * 32
    key = IndexKey("acme", 3, bytearray(material))
    assert isinstance(key.material, bytes)
    for shown in (repr(key), str(key), f"{key}"):
        assert "<redacted>" in shown and material.hex() not in shown and "\\x11" not in shown
    with pytest.raises(ValueError, match="exactly 32 bytes"):
        IndexKey("acme", 1, b"short")
    with pytest.raises(ValueError, match="between 1 and"):
        IndexKey("acme", 0, material)
    with pytest.raises(TypeError):
        IndexKey("acme", True, material)
    with pytest.raises(ValueError, match="tenant_id"):
        IndexKey("", 1, material)
    with pytest.raises(TypeError):
        keyed_term(key, b"bytes")  # type: ignore[arg-type]


# --- IndexKeys over fakes of its ports ---------------------------------------------------------


class FakeKms:
    def __init__(self) -> None:
        self.down = False
        self.refuse = False  # as Transit answers for a deleted master key
        self.unwraps = 0

    def generate_data_key(self, key_name: str, context: bytes) -> DataKey:
        material = hashlib.sha256(context).digest()
        return DataKey(plaintext=material, wrapped=f"wrapped:{context.hex()}")

    def unwrap(self, key_name: str, wrapped: str, context: bytes) -> bytes:
        if self.down:
            raise KmsUnavailable("KMS down")
        if self.refuse:
            raise KmsKeyUnusable("KMS rejected decrypt: encryption key not found")
        assert wrapped == f"wrapped:{context.hex()}"  # the context binds tenant and version
        self.unwraps += 1
        return hashlib.sha256(context).digest()


class FakeRepo:
    def __init__(self) -> None:
        self.modes: dict[str, str] = {}
        self.rows: dict[str, list[IndexKeyRow]] = {}
        self.tenants: dict[uuid.UUID, str] = {}

    def mode(self, tenant_id: str) -> str | None:
        return self.modes.get(tenant_id)

    def keys(self, tenant_id: str) -> list[IndexKeyRow]:
        return sorted(self.rows.get(tenant_id, []), key=lambda r: -r.key_version)

    def chat_tenants(self, chat_ids: list[uuid.UUID]) -> dict[uuid.UUID, str]:
        return {c: self.tenants[c] for c in chat_ids if c in self.tenants}

    def add_key(
        self, tenant_id: str, wrapped: str, name: str, version: int, enable: bool, audit: object
    ) -> None:
        rows = [
            IndexKeyRow(r.tenant_id, r.key_version, r.wrapped_key, name, "retiring", r.created_at)
            if r.state == "active"
            else r
            for r in self.rows.get(tenant_id, [])
        ]
        rows.append(IndexKeyRow(tenant_id, version, wrapped, name, "active", datetime.now(UTC)))
        self.rows[tenant_id] = rows
        if enable:
            self.modes[tenant_id] = "enabling"


class FakeChats:
    def __init__(self) -> None:
        self.audited: list[tuple[str, int | None]] = []

    def tenant_key_name(self, tenant_id: str) -> str | None:
        return f"cmk-{tenant_id}"

    def audit(self, actor: str, action: str, chat: object, version: int | None, r: str) -> None:
        self.audited.append((action, version))


def index_keys() -> tuple[IndexKeys, FakeRepo, FakeKms, FakeChats]:
    repo, kms, chats = FakeRepo(), FakeKms(), FakeChats()
    keys = IndexKeys(repo, chats, kms, ttl_seconds=60)  # type: ignore[arg-type]
    return keys, repo, kms, chats


def test_plain_tenant_keeps_its_terms_and_has_no_keyed_query() -> None:
    keys, _, _, _ = index_keys()
    assert keys.current("plain") is None and keys.live("plain") == []
    assert keys.document_tokens("plain", ["a", "b"]) == (["a", "b"], None)
    assert keys.query_word("plain", "café", "cafe") is None


def test_blind_tenant_terms_are_keyed_under_current_and_queried_under_every_live_version() -> None:
    keys, repo, kms, chats = index_keys()
    assert keys.enable("acme", "test") == 1
    v1 = keys.current("acme")
    assert v1 is not None and v1.version == 1
    tokens, version = keys.document_tokens("acme", ["cafe", "café"])
    assert version == 1 and tokens == sorted({keyed_term(v1, "cafe"), keyed_term(v1, "café")})
    # While turning on, plain documents still exist: queries match plain words too.
    word = keys.query_word("acme", "café", "cafe")
    forms = ("cafe", "~cafe", "café")  # folded as written, folded marked, the word itself
    assert word is not None and set(word.any_of) == {keyed_term(v1, f) for f in forms} | set(forms)
    assert set(word.exact) == {keyed_term(v1, "café"), "café"}
    repo.modes["acme"] = "on"
    keys.forget("acme")
    assert keys.rotate("acme", "test") == 2
    v2 = keys.current("acme")
    assert v2 is not None and v2.version == 2
    assert [k.version for k in keys.live("acme")] == [2, 1]
    word = keys.query_word("acme", "café", "cafe")
    assert word is not None
    assert set(word.any_of) == {keyed_term(v, f) for v in (v1, v2) for f in forms}
    assert keys.document_tokens("acme", ["x"]) == ([keyed_term(v2, "x")], 2)
    # v1 came back from the KMS after `forget`: unwrapped once, audited.
    assert kms.unwraps == 1 and chats.audited == [("index_key_unwrapped", 1)]
    assert index_key_context("acme", 2) != index_key_context("acme", 1)
    assert index_key_context("acme", 1) != index_key_context("acme1", 1)


# --- the indexer ----------------------------------------------------------------------------


class Sink:
    def __init__(self) -> None:
        self.indexed: list[IndexedMessage] = []

    def analyze_terms(self, texts: list[str]) -> list[list[str]]:
        return [sorted(set(t.lower().split())) for t in texts]

    def index_many(self, messages: list[IndexedMessage]) -> list[RefusedDocument]:
        self.indexed += messages
        return []


def record(chat: uuid.UUID, text: str, tenant: str = "default") -> RawRecord:
    value = MessageRecord(
        message_id=SnowflakeIds(5).next_id(),
        chat_id=chat,
        tenant_id=tenant,
        sender_id="alice",
        text=text,
        sent_at=datetime.now(UTC),
    )
    return RawRecord("t", 0, 0, value.key(), value.value())


class ChatTenants:
    """The chats' state as Postgres holds it (`ChatStates`): all active, of the given tenant."""

    def __init__(self, tenants: dict[uuid.UUID, str]) -> None:
        self.tenants = tenants

    def chat_states(self, chat_ids: Collection[uuid.UUID]) -> dict[uuid.UUID, ChatState]:
        return {
            c: ChatState("active", None, self.tenants[c]) for c in chat_ids if c in self.tenants
        }


def test_indexer_keys_a_blind_tenants_terms_and_refuses_a_record_claiming_another_tenant() -> None:
    keys, _, _, _ = index_keys()
    keys.enable("acme", "test")
    chat, other = uuid.uuid4(), uuid.uuid4()
    states = ChatTenants({chat: "acme", other: "acme"})
    sink = Sink()
    # The first record claims the plain default tenant for acme's chat: indexed as it came,
    # acme's words would be stored in plain. It is dead-lettered; the honest one is keyed.
    forged, honest = record(chat, "Secret Word"), record(other, "Secret Word", tenant="acme")
    rejected = index_batch([forged, honest], sink, states, keys)
    assert [(r.record, r.reason) for r in rejected] == [
        (forged, "tenant_id: not the tenant of this chat")
    ]
    [doc] = sink.indexed
    key = keys.current("acme")
    assert key is not None
    assert doc.tenant_id == "acme" and doc.index_key_version == 1
    assert doc.tokens == sorted({keyed_term(key, "secret"), keyed_term(key, "word")})


def test_indexer_dead_letters_a_tenant_whose_index_key_the_kms_refuses() -> None:
    keys, _, kms, _ = index_keys()
    keys.enable("acme", "test")
    keys.forget("acme")  # a process that must unwrap the key
    kms.refuse = True
    sink = Sink()
    acme, plain = record(uuid.uuid4(), "held", tenant="acme"), record(uuid.uuid4(), "fine")
    rejected = index_batch([acme, plain], sink, None, keys)
    assert [r.record for r in rejected] == [acme]
    assert [d.tenant_id for d in sink.indexed] == ["default"]


def test_indexer_batch_fails_retriably_while_the_kms_is_down() -> None:
    keys, _, kms, _ = index_keys()
    keys.enable("acme", "test")
    keys.forget("acme")  # a process that must unwrap the key
    chat = uuid.uuid4()
    kms.down = True
    sink = Sink()
    with pytest.raises(KmsUnavailable) as raised:
        index_batch([record(chat, "held", tenant="acme")], sink, None, keys)
    assert raised.value.retriable and sink.indexed == []
    kms.down = False
    assert index_batch([record(chat, "held", tenant="acme")], sink, None, keys) == []
    assert len(sink.indexed) == 1 and sink.indexed[0].index_key_version == 1
