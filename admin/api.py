"""The admin HTTP API: the `sealstream keys ...` and `sealstream dlq ...` operations for
operators (tokens with the `admin` role). Quick operations answer at once; long ones start a background job (202) whose
progress and result are read from `/v1/jobs/{job_id}`.

Every change to a chat's keys is recorded in the key audit trail with the operator's user id as
the actor, in the same transaction as the change; so are a tenant's master-key name
(`tenant_key_set`) and retention settings (`retention_set`), which decide when keys are destroyed.
No response carries key material: DEK versions are described by number, state and master key.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Path, Query
from pydantic import BaseModel, ConfigDict, Field

from admin.jobs import Job, JobRunner
from schemas.changes import ChangeEvent
from schemas.events import MAX_ID_LEN
from sealstream.adapters.cassandra import MessageStore, StoredMessage
from sealstream.adapters.object_store import ObjectStore
from sealstream.adapters.opensearch import SearchIndex
from sealstream.adapters.postgres import ChatRow, IndexKeyConflict, TopicKeyRepository
from sealstream.dead_letters import (
    MAX_LIST,
    MAX_REASON_FILTER,
    TOPIC_PATTERN,
    DeadLetterInfo,
    LetterFilter,
    LetterSource,
    RecordSink,
    ReplayLedger,
    list_letters,
    replay,
    select,
    show,
)
from sealstream.errors import KmsError, MembershipRefused
from sealstream.http import ApiError, CurrentAdmin, MessageIdPath, install
from sealstream.http import message_id as parse_message_id
from sealstream.keys.index_keys import IndexKeys
from sealstream.keys.service import KeyService
from sealstream.keys.topic_keys import destroy_topic_keys
from sealstream.lifecycle import (
    WorkerProgress,
    apply_retention,
    delete_chat,
    delete_message,
    policy_cutoff,
    reencrypt_chat,
    rotate_due,
    rotate_master_key,
)
from sealstream.search_reindex import reindex_tenant
from sealstream.settings import Settings
from sealstream.text_rules import ID_PATTERN, MAX_REASON, TEXT_PATTERN, Reason, Utf8

TAG_KEYS = "keys"
TAG_DATA = "deletion and retention"
TAG_JOBS = "jobs"
TAG_DLQ = "dead letters"
# Tenant, master-key and region names. They become KMS URL paths: a name must start with a
# letter or digit, so "." and ".." cannot step out of the key's path.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


@dataclass(frozen=True)
class DeadLetterAccess:
    """The dead-letter topic (a reader per request: a Kafka consumer is not shared between
    threads), the acks=all publisher and the replay ledger (built by admin.wiring)."""

    open_reader: Callable[[], AbstractContextManager[LetterSource]]
    sink: RecordSink
    ledger: ReplayLedger
    messages_topic: str


@dataclass(frozen=True)
class AdminContext:
    """What the admin operations act on (built by admin.wiring)."""

    keys: KeyService
    store: MessageStore
    index: SearchIndex
    workers: WorkerProgress | None = None  # for chat deletion's sweep (None: no sweep)
    index_keys: IndexKeys | None = None  # the blind index's keys (None: its routes answer 404)
    # Publishes a message deletion's change event for live delivery (None: not published).
    changes: Callable[[ChangeEvent], None] | None = None
    ids: Callable[[], int] | None = None  # event ids (the process's leased Snowflake generator)
    dead_letters: DeadLetterAccess | None = None  # None: the dead-letter routes answer 404
    # Attachment objects (None: deletion and retention remove attachment rows only).
    objects: ObjectStore | None = None


# --- request and response bodies -------------------------------------------------------------


class _Request(BaseModel):
    """Request bodies refuse unknown fields: a typo must not silently fall back to a default."""

    model_config = ConfigDict(extra="forbid")


class TenantIn(_Request):
    tenant_id: str = Field(min_length=1, max_length=128, pattern=NAME_PATTERN)
    kms_key_name: str = Field(
        min_length=1, max_length=128, pattern=NAME_PATTERN, description="Its Transit CMK"
    )
    region: str | None = Field(
        default=None,
        min_length=1,
        max_length=64,
        pattern=NAME_PATTERN,
        description="KMS region (a key of SEALSTREAM_VAULT__CLUSTERS); null: the default KMS",
    )


class RotateIn(_Request):
    reason: Reason = "on demand"


class RotateOut(BaseModel):
    chat_id: uuid.UUID
    dek_version: int = Field(description="The chat's active DEK version after the rotation")


class DekVersionOut(BaseModel):
    dek_version: int
    state: str = Field(description="active | retired | destroyed")
    kms_key_name: str
    valid_from: datetime
    valid_to: datetime | None


class ChatKeysOut(BaseModel):
    chat_id: uuid.UUID
    tenant_id: str
    state: str
    versions: list[DekVersionOut]


class RotationsIn(_Request):
    max_age_days: float | None = Field(
        default=None,
        gt=0,
        le=36_500,
        description="Rotate chats whose active DEK is older than this (at most 100 years)",
    )
    max_messages: int | None = Field(
        default=None,
        ge=1,
        le=2**62,
        description="Rotate DEK versions that sealed at least this many",
    )
    all_chats: bool = Field(default=False, description="Rotate every active chat")
    tenant_id: str | None = Field(default=None, min_length=1, max_length=128, pattern=NAME_PATTERN)
    rate_per_second: float = Field(default=50.0, gt=0, le=10_000)


class MasterKeyIn(_Request):
    retire_old: bool = Field(
        default=False, description="After the rewrap, old master-key versions stop decrypting"
    )


class ReencryptIn(_Request):
    retire: bool = Field(
        default=True, description="Destroy the old DEK versions once no message uses them"
    )


class RetentionIn(_Request):
    days: int | None = Field(ge=1, le=36_500, description="Retention in days; null: forever")


class BlindIndexIn(_Request):
    reason: Reason = Field(default="on demand", description="Recorded in the audit trail")


class IndexKeyVersionOut(BaseModel):
    key_version: int
    state: str = Field(description="active | retiring | destroyed")
    created_at: datetime


class ReindexOut(BaseModel):
    target_version: int
    state: str = Field(description="pending | running | done")
    chats_done: int
    messages_done: int
    swept: int = Field(description="Documents re-keyed by the final sweep")
    requested_at: datetime
    updated_at: datetime
    finished_at: datetime | None


class BlindIndexOut(BaseModel):
    tenant_id: str
    mode: str = Field(description="off | enabling (re-index of plain documents running) | on")
    versions: list[IndexKeyVersionOut] = Field(description="Index-key versions, newest first")
    reindex: ReindexOut | None


class ShredReceiptOut(BaseModel):
    chat_id: uuid.UUID
    dek_versions_destroyed: list[int]
    index_documents_deleted: int
    rows_deleted: int
    seconds: float
    sweep_completed: bool = Field(
        description="Both workers were seen past the deletion point and the index swept after "
        "that; false: run the deletion again once they caught up (idempotent)"
    )
    attachment_rows_deleted: int = Field(
        0, description="Attachment metadata rows deleted (deletion markers included)"
    )
    attachment_objects_deleted: int = Field(
        0, description="Encrypted attachment objects deleted under the chat's prefix"
    )
    incomplete_uploads_aborted: int = Field(
        0, description="Unfinished multipart uploads under the chat's prefix aborted"
    )


class MessageDeletedOut(BaseModel):
    chat_id: uuid.UUID
    message_id: str
    deleted: bool
    attachments_deleted: int = Field(
        0,
        description="Attachments the message referenced and no other message does, marked "
        "deleted (downloads: 404)",
    )
    attachment_objects_deleted: int = Field(
        0, description="Their encrypted objects deleted from the object store"
    )


class AuditOut(BaseModel):
    at: datetime
    actor: str
    action: str
    chat_id: uuid.UUID | None
    dek_version: int | None
    reason: str


class JobOut(BaseModel):
    job_id: str
    kind: str
    requested_by: str
    state: str = Field(description="queued | running | succeeded | failed")
    progress: dict[str, Any]
    result: dict[str, Any] | None
    error: str | None
    created_at: datetime
    finished_at: datetime | None


def _job(job: Job) -> JobOut:
    return JobOut(**asdict(job))


def _report(report: object) -> dict[str, Any]:
    """A lifecycle report as JSON (datetimes and UUIDs as strings)."""
    return {
        k: (v.isoformat() if isinstance(v, datetime) else str(v) if isinstance(v, uuid.UUID) else v)
        for k, v in asdict(report).items()  # type: ignore[call-overload]
    }


# --- dead letters ----------------------------------------------------------------------------

Stage = Literal["encryptor", "indexer"]  # dead_letters.STAGES


class ReplayedOut(BaseModel):
    times: int = Field(description="How many times the letter was replayed")
    last_at: datetime
    last_by: str
    to_partition: int = Field(description="Where the last replay landed in the message topic")
    to_offset: int


class DeadLetterOut(BaseModel):
    """A dead letter's metadata. Never its value, nor the values of its other headers."""

    partition: int = Field(description="Its partition in the dead-letter topic")
    offset: int = Field(description="Its offset there (with `partition`: its coordinates)")
    at: datetime = Field(description="When it was dead-lettered")
    stage: str = Field(description="encryptor | indexer: the stage that refused the record")
    reason: str = Field(description="Why: names the field and the rule, never the text")
    origin_topic: str = Field(description="The topic the record was read from (`dlq.topic`)")
    origin_partition: int | None
    origin_offset: int | None
    chat_id: uuid.UUID | None = Field(description="The record key, when it is a chat id")
    key_bytes: int = Field(description="Size of the record key (0: none)")
    value_bytes: int | None = Field(description="Size of the value; null: the letter has none")
    value_omitted: str | None = Field(
        description="Why the letter carries no value (the dead-letter topic refused it)"
    )
    headers: list[str] = Field(
        description="Names of the record's own headers (not `dlq.*`), the first 32 distinct"
    )
    header_count: int = Field(description="How many own headers the record has")
    replayable: bool
    not_replayable_because: str | None
    replayed: ReplayedOut | None = Field(description="Its replays so far; null: never replayed")


class DeadLettersOut(BaseModel):
    dead_letters: list[DeadLetterOut] = Field(description="Oldest first")
    truncated: bool = Field(description="More letters matched than `limit`: narrow the filter")


class LetterRef(_Request):
    partition: int = Field(ge=0, le=2**31 - 1)
    offset: int = Field(ge=0, le=2**63 - 1)


class ReplayIn(_Request):
    letters: list[LetterRef] | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_LIST,
        description="The letters to replay by coordinates; or leave out and give a filter",
    )
    reason: str | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_REASON_FILTER,
        description="Reason contains (any case)",
    )
    stage: Stage | None = None
    since: datetime | None = Field(default=None, description="Dead-lettered at or after")
    until: datetime | None = Field(default=None, description="Dead-lettered before")
    topic: str | None = Field(default=None, pattern=TOPIC_PATTERN, description="Origin topic")
    chat_id: uuid.UUID | None = None
    all: bool = Field(default=False, description="Every letter (no coordinates, no filter)")
    dry_run: bool = Field(default=False, description="Check and report, publish nothing")
    force: bool = Field(default=False, description="Replay letters replayed before too")


class ReplayResultOut(BaseModel):
    partition: int
    offset: int
    outcome: str = Field(
        description="replayed | would_replay (dry run) | already_replayed (skipped; force to "
        "replay again) | being_replayed (skipped: another replay holds it now) | refused (no "
        "value, not from the message topic, key not a chat id, or too large for it) | not_found"
    )
    detail: str
    replayed_to_partition: int | None
    replayed_to_offset: int | None


class ReplayOut(BaseModel):
    results: list[ReplayResultOut]
    counts: dict[str, int] = Field(description="Letters per outcome")


def _utc(when: datetime | None) -> datetime | None:
    """A time without a zone is UTC."""
    return when if when is None or when.tzinfo is not None else when.replace(tzinfo=UTC)


ChatId = Annotated[uuid.UUID, Path(description="The chat's UUID")]
UserId = Annotated[
    str,
    Path(min_length=1, max_length=MAX_ID_LEN, pattern=ID_PATTERN, description="A user id"),
    Utf8,
]


class ParticipantsOut(BaseModel):
    chat_id: uuid.UUID
    participants: list[str]
    changed: bool = Field(description="False when the user already was (or was not) a member")


TenantId = Annotated[str, Path(min_length=1, max_length=128, pattern=NAME_PATTERN)]


def create_app(
    ctx: AdminContext,
    jobs: JobRunner,
    settings: Settings,
    ready: Callable[[], Awaitable[bool]],
) -> FastAPI:
    app = FastAPI(
        title="Sealstream key-lifecycle admin",
        version="1",
        description=(
            "DEK rotation, master-key rotation and rewrap, history re-encryption, message and "
            "chat deletion (crypto-shredding), retention and the key audit trail. Needs a bearer "
            "token with the `admin` role. Errors are "
            '{"error": {"code", "message", "field"?}}.'
        ),
        openapi_tags=[
            {"name": TAG_KEYS, "description": "Data keys and master keys"},
            {"name": TAG_DATA, "description": "Deleting messages and chats, retention"},
            {"name": TAG_JOBS, "description": "Background jobs and the audit trail"},
            {
                "name": TAG_DLQ,
                "description": "Records the workers refused: their metadata (never a value) "
                "and their replay into the message topic",
            },
        ],
    )
    install(app, "admin", settings.auth, ready)

    def keys_for(admin: str) -> KeyService:
        return ctx.keys.as_actor(f"admin:{admin}")

    def existing_chat(chat_id: uuid.UUID) -> ChatRow:
        chat = ctx.keys.chat(chat_id)
        if chat is None:
            raise ApiError(404, "not_found", f"no chat {chat_id}", "path.chat_id")
        return chat

    # --- tenants -------------------------------------------------------------------------------

    @app.post(
        "/v1/tenants",
        response_model=TenantIn,
        status_code=201,
        tags=[TAG_KEYS],
        summary="Register a tenant and create its master key on its own KMS (idempotent)",
    )
    def add_tenant(admin: CurrentAdmin, body: TenantIn) -> TenantIn:
        try:
            ctx.keys.register_tenant(body.tenant_id, body.kms_key_name, body.region)
        except KmsError as exc:
            if exc.retriable:
                raise
            raise ApiError(422, "invalid_tenant", str(exc), "body.region") from None
        return body

    # --- data keys -----------------------------------------------------------------------------

    @app.get(
        "/v1/chats/{chat_id}/keys",
        response_model=ChatKeysOut,
        tags=[TAG_KEYS],
        summary="A chat's DEK versions (numbers and states, never key material)",
    )
    def chat_keys(admin: CurrentAdmin, chat_id: ChatId) -> ChatKeysOut:
        chat = existing_chat(chat_id)
        return ChatKeysOut(
            chat_id=chat_id,
            tenant_id=chat.tenant_id,
            state=chat.state,
            versions=[
                DekVersionOut(
                    dek_version=d.dek_version,
                    state=d.state,
                    kms_key_name=d.kms_key_name,
                    valid_from=d.valid_from,
                    valid_to=d.valid_to,
                )
                for d in ctx.keys.repo.deks(chat_id)
            ],
        )

    @app.post(
        "/v1/chats/{chat_id}/keys/rotate",
        response_model=RotateOut,
        tags=[TAG_KEYS],
        summary="Rotate one chat's DEK now (every worker uses the new version within a second)",
    )
    def rotate_chat(
        admin: CurrentAdmin, chat_id: ChatId, body: RotateIn | None = None
    ) -> RotateOut:
        existing_chat(chat_id)
        reason = (body or RotateIn()).reason
        return RotateOut(chat_id=chat_id, dek_version=keys_for(admin).rotate(chat_id, reason))

    @app.post(
        "/v1/rotations",
        response_model=JobOut,
        status_code=202,
        tags=[TAG_KEYS],
        summary="Batch rotation by policy (age, messages per version) or of every chat",
    )
    def rotations(admin: CurrentAdmin, body: RotationsIn) -> JobOut:
        if not (body.all_chats or body.max_age_days or body.max_messages):
            raise ApiError(
                422,
                "invalid_request",
                "body: give max_age_days, max_messages or all_chats=true",
                "body",
            )
        cutoff = policy_cutoff(0 if body.all_chats else body.max_age_days)
        keys = keys_for(admin)

        def run(progress: Callable[..., None]) -> dict[str, Any]:
            report = rotate_due(
                keys,
                cutoff,
                body.rate_per_second,
                reason=f"batch rotation (cutoff {cutoff.isoformat(timespec='seconds')})",
                progress=lambda n: progress(rotated=n),
                tenant_id=body.tenant_id,
                max_messages=body.max_messages,
            )
            return _report(report)

        return _job(jobs.submit("rotate-due", admin, run))

    @app.post(
        "/v1/tenants/{tenant_id}/master-key/rotate",
        response_model=JobOut,
        status_code=202,
        tags=[TAG_KEYS],
        summary="Rotate a tenant's master key and rewrap every stored DEK to the new version",
    )
    def master_key(
        admin: CurrentAdmin, tenant_id: TenantId, body: MasterKeyIn | None = None
    ) -> JobOut:
        if ctx.keys.repo.tenant_key_name(tenant_id) is None:
            raise ApiError(404, "not_found", f"no tenant {tenant_id!r}", "path.tenant_id")
        retire_old = (body or MasterKeyIn()).retire_old
        keys = keys_for(admin)

        def run(progress: Callable[..., None]) -> dict[str, Any]:
            report = rotate_master_key(
                keys,
                tenant_id,
                retire_old,
                progress=lambda examined, done: progress(examined=examined, rewrapped=done),
            )
            return _report(report)

        return _job(jobs.submit("rotate-master", admin, run))

    @app.post(
        "/v1/chats/{chat_id}/keys/reencrypt",
        response_model=JobOut,
        status_code=202,
        tags=[TAG_KEYS],
        summary="Re-encrypt a chat's history to its newest DEK version (then retire old ones)",
    )
    def reencrypt(admin: CurrentAdmin, chat_id: ChatId, body: ReencryptIn | None = None) -> JobOut:
        existing_chat(chat_id)
        retire = (body or ReencryptIn()).retire
        keys = keys_for(admin)

        def run(progress: Callable[..., None]) -> dict[str, Any]:
            report = reencrypt_chat(
                keys,
                ctx.store,
                chat_id,
                retire=retire,
                progress=lambda examined, done: progress(examined=examined, reencrypted=done),
            )
            return _report(report)

        return _job(jobs.submit("reencrypt", admin, run))

    # --- blind index ---------------------------------------------------------------------------

    _KEY_CHANGE_CONFLICT: dict[int | str, dict[str, Any]] = {
        409: {
            "description": "The tenant's blind index is already in the asked state (on, or off "
            "for a rotation), its last re-index is unfinished, or its key changed meanwhile"
        }
    }

    def blind_keys(admin: str, tenant_id: str) -> IndexKeys:
        if ctx.index_keys is None:
            raise ApiError(404, "not_found", "the blind index is not configured here")
        if ctx.keys.repo.tenant_key_name(tenant_id) is None:
            raise ApiError(404, "not_found", f"no tenant {tenant_id!r}", "path.tenant_id")
        return ctx.index_keys.as_actor(f"admin:{admin}")

    def reindex_job(admin: str, index_keys: IndexKeys, tenant_id: str) -> JobOut:
        keys = keys_for(admin)

        def run(progress: Callable[..., None]) -> dict[str, Any]:
            return _report(
                reindex_tenant(index_keys, keys, ctx.store, ctx.index, tenant_id, progress=progress)
            )

        return _job(jobs.submit("search-reindex", admin, run))

    def key_change(admin: str, tenant_id: str, reason: str, enable: bool) -> JobOut:
        index_keys = blind_keys(admin, tenant_id)
        try:
            if enable:
                index_keys.enable(tenant_id, reason)
            else:
                index_keys.rotate(tenant_id, reason)
        except IndexKeyConflict as exc:
            raise ApiError(409, "conflict", str(exc), "path.tenant_id") from None
        return reindex_job(admin, index_keys, tenant_id)

    @app.post(
        "/v1/tenants/{tenant_id}/blind-index",
        response_model=JobOut,
        responses=_KEY_CHANGE_CONFLICT,
        status_code=202,
        tags=[TAG_KEYS],
        summary="Turn the blind index on for a tenant: index key v1, then re-index its messages",
    )
    def blind_index_on(
        admin: CurrentAdmin, tenant_id: TenantId, body: BlindIndexIn | None = None
    ) -> JobOut:
        return key_change(admin, tenant_id, (body or BlindIndexIn()).reason, enable=True)

    @app.post(
        "/v1/tenants/{tenant_id}/index-key/rotate",
        response_model=JobOut,
        responses=_KEY_CHANGE_CONFLICT,
        status_code=202,
        tags=[TAG_KEYS],
        summary="Rotate a blind-index tenant's index key and re-index it (old key destroyed after)",
    )
    def index_key_rotate(
        admin: CurrentAdmin, tenant_id: TenantId, body: BlindIndexIn | None = None
    ) -> JobOut:
        return key_change(admin, tenant_id, (body or BlindIndexIn()).reason, enable=False)

    @app.post(
        "/v1/tenants/{tenant_id}/blind-index/reindex",
        response_model=JobOut,
        status_code=202,
        tags=[TAG_KEYS],
        summary="Resume a tenant's unfinished re-index (after a restart or a failure)",
    )
    def blind_index_reindex(admin: CurrentAdmin, tenant_id: TenantId) -> JobOut:
        return reindex_job(admin, blind_keys(admin, tenant_id), tenant_id)

    @app.get(
        "/v1/tenants/{tenant_id}/blind-index",
        response_model=BlindIndexOut,
        tags=[TAG_KEYS],
        summary="A tenant's blind-index mode, index-key versions and re-index progress",
    )
    def blind_index_state(admin: CurrentAdmin, tenant_id: TenantId) -> BlindIndexOut:
        index_keys = blind_keys(admin, tenant_id)
        job = index_keys.repo.reindex_job(tenant_id)
        return BlindIndexOut(
            tenant_id=tenant_id,
            mode=index_keys.repo.mode(tenant_id) or "off",
            versions=[
                IndexKeyVersionOut(
                    key_version=r.key_version, state=r.state, created_at=r.created_at
                )
                for r in index_keys.repo.keys(tenant_id)
            ],
            reindex=None
            if job is None
            else ReindexOut(
                **{k: v for k, v in asdict(job).items() if k in ReindexOut.model_fields}
            ),
        )

    # --- deletion and retention ----------------------------------------------------------------

    @app.delete(
        "/v1/chats/{chat_id}",
        response_model=ShredReceiptOut,
        tags=[TAG_DATA],
        summary="Delete a chat: crypto-shred its DEKs, then its index documents, rows and "
        "attachments (rows, objects, unfinished uploads)",
    )
    def remove_chat(
        admin: CurrentAdmin,
        chat_id: ChatId,
        reason: Annotated[
            str, Query(min_length=1, max_length=MAX_REASON, pattern=TEXT_PATTERN), Utf8
        ] = "admin request",
    ) -> ShredReceiptOut:
        existing_chat(chat_id)
        receipt = delete_chat(
            keys_for(admin),
            ctx.index,
            ctx.store,
            chat_id,
            reason,
            ctx.workers,
            settings.deletion.sweep_seconds,
            ctx.objects,
        )
        return ShredReceiptOut(**asdict(receipt))

    @app.delete(
        "/v1/chats/{chat_id}/messages/{message_id}",
        response_model=MessageDeletedOut,
        tags=[TAG_DATA],
        summary="Delete one message: hidden at once, ciphertext, index document and its "
        "attachments (marked deleted, objects removed)",
    )
    def remove_message(
        admin: CurrentAdmin, chat_id: ChatId, message_id: MessageIdPath
    ) -> MessageDeletedOut:
        chat = existing_chat(chat_id)

        def announce(row: StoredMessage, deleted_at: datetime) -> None:
            if ctx.changes is None or ctx.ids is None:
                return
            ctx.changes(
                ChangeEvent(
                    kind="delete",
                    event_id=ctx.ids(),
                    chat_id=chat_id,
                    tenant_id=chat.tenant_id,
                    message_id=row.message_id,
                    sender_id=row.sender_id,
                    revision=row.revision,
                    created_at=row.created_at,
                    edited_at=row.edited_at,
                    deleted_at=deleted_at,
                )
            )

        done = delete_message(
            ctx.store, ctx.index, chat_id, parse_message_id(message_id), announce, ctx.objects
        )
        if not done.found:
            raise ApiError(404, "not_found", f"no message {message_id} in chat {chat_id}")
        return MessageDeletedOut(
            chat_id=chat_id,
            message_id=message_id,
            deleted=True,
            attachments_deleted=done.attachments_deleted,
            attachment_objects_deleted=done.attachment_objects_deleted,
        )

    @app.put(
        "/v1/chats/{chat_id}/participants/{user_id}",
        response_model=ParticipantsOut,
        tags=[TAG_DATA],
        summary="Add a participant to a chat (audited; live delivery is told at once)",
        responses={409: {"description": "The chat has 1,000 participants already"}},
    )
    def add_participant(admin: CurrentAdmin, chat_id: ChatId, user_id: UserId) -> ParticipantsOut:
        return _participant(admin, chat_id, user_id, present=True)

    @app.delete(
        "/v1/chats/{chat_id}/participants/{user_id}",
        response_model=ParticipantsOut,
        tags=[TAG_DATA],
        summary="Remove a participant from a chat (audited; their live streams end at once)",
        responses={409: {"description": "The chat's last participant (delete the chat instead)"}},
    )
    def remove_participant(
        admin: CurrentAdmin, chat_id: ChatId, user_id: UserId
    ) -> ParticipantsOut:
        return _participant(admin, chat_id, user_id, present=False)

    def _participant(
        admin: str, chat_id: uuid.UUID, user_id: str, present: bool
    ) -> ParticipantsOut:
        try:
            result = keys_for(admin).set_participant(chat_id, user_id, present)
        except MembershipRefused as exc:
            raise ApiError(409, "conflict", str(exc), "path.user_id") from None
        if result is None:
            raise ApiError(404, "not_found", f"no chat {chat_id}", "path.chat_id")
        chat, changed = result
        if chat.state == "deleted":
            raise ApiError(410, "gone", "this chat was deleted", "path.chat_id")
        return ParticipantsOut(
            chat_id=chat_id, participants=list(chat.participants), changed=changed
        )

    @app.put(
        "/v1/tenants/{tenant_id}/retention",
        tags=[TAG_DATA],
        summary="Set (or clear with null) a tenant's retention period",
    )
    def tenant_retention(
        admin: CurrentAdmin, tenant_id: TenantId, body: RetentionIn
    ) -> dict[str, Any]:
        if ctx.keys.repo.tenant_key_name(tenant_id) is None:
            raise ApiError(404, "not_found", f"no tenant {tenant_id!r}", "path.tenant_id")
        ctx.keys.set_retention(body.days, tenant_id=tenant_id)
        return {"tenant_id": tenant_id, "retention_days": body.days}

    @app.put(
        "/v1/chats/{chat_id}/retention",
        tags=[TAG_DATA],
        summary="Set (or clear with null) one chat's retention period (overrides the tenant's)",
    )
    def chat_retention(admin: CurrentAdmin, chat_id: ChatId, body: RetentionIn) -> dict[str, Any]:
        existing_chat(chat_id)
        ctx.keys.set_retention(body.days, chat_id=chat_id)
        return {"chat_id": str(chat_id), "retention_days": body.days}

    @app.post(
        "/v1/retention/runs",
        response_model=JobOut,
        status_code=202,
        tags=[TAG_DATA],
        summary="Apply retention: remove expired messages, destroy DEK versions none uses "
        "and topic keys past the message topic's retention",
    )
    def retention_run(admin: CurrentAdmin) -> JobOut:
        keys = keys_for(admin)

        def run(progress: Callable[..., None]) -> dict[str, Any]:
            report = apply_retention(
                keys,
                ctx.index,
                ctx.store,
                progress=lambda n: progress(chats=n),
                objects=ctx.objects,
            )
            # Sealed Kafka records past the topic's retention: crypto-shred them (their keys).
            # The message topic's keys only: the one topic this process's Kafka principal may
            # describe (the operator's `sealstream keys destroy-topic-keys` covers every topic).
            topic_keys = destroy_topic_keys(
                TopicKeyRepository(keys.repo.db),
                settings.kafka,
                actor=f"admin:{admin}",
                topics=[settings.kafka.messages_topic],
            )
            return {**_report(report), "topic_keys_destroyed": len(topic_keys)}

        return _job(jobs.submit("retention", admin, run))

    # --- dead letters --------------------------------------------------------------------------

    _NO_DLQ: dict[int | str, dict[str, Any]] = {
        404: {"description": "No such dead letter, or dead letters are not configured here"}
    }
    replaying = threading.Lock()  # one replay at a time: two would both publish a letter

    def dead_letters() -> DeadLetterAccess:
        if ctx.dead_letters is None:
            raise ApiError(404, "not_found", "dead letters are not configured here")
        return ctx.dead_letters

    def letters_out(
        access: DeadLetterAccess, topic: str, infos: list[DeadLetterInfo]
    ) -> list[DeadLetterOut]:
        replayed = access.ledger.replayed(topic, [i.coordinates for i in infos])
        out = []
        for info in infos:
            why = info.unreplayable(access.messages_topic)
            again = replayed.get(info.coordinates)
            fields = {k: v for k, v in asdict(info).items() if k != "headers"}
            out.append(
                DeadLetterOut(
                    **fields,
                    headers=list(info.headers),
                    replayable=why is None,
                    not_replayable_because=why,
                    replayed=None
                    if again is None
                    else ReplayedOut(
                        times=again.replays,
                        last_at=again.last_replayed_at,
                        last_by=again.last_replayed_by,
                        to_partition=again.replayed_partition,
                        to_offset=again.replayed_offset,
                    ),
                )
            )
        return out

    @app.get(
        "/v1/dead-letters",
        response_model=DeadLettersOut,
        responses=_NO_DLQ,
        tags=[TAG_DLQ],
        summary="Dead letters with stage, reason and origin, oldest first (never a value)",
    )
    def list_dead_letters(
        admin: CurrentAdmin,
        reason: Annotated[
            str | None,
            Query(
                min_length=1, max_length=MAX_REASON_FILTER, description="Reason contains (any case)"
            ),
        ] = None,
        stage: Annotated[Stage | None, Query()] = None,
        since: Annotated[datetime | None, Query(description="Dead-lettered at or after")] = None,
        until: Annotated[datetime | None, Query(description="Dead-lettered before")] = None,
        topic: Annotated[
            str | None, Query(pattern=TOPIC_PATTERN, description="Origin topic (`dlq.topic`)")
        ] = None,
        chat_id: Annotated[uuid.UUID | None, Query(description="The record key")] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_LIST)] = 100,
    ) -> DeadLettersOut:
        access = dead_letters()
        where = LetterFilter(
            reason=reason,
            stage=stage,
            since=_utc(since),
            until=_utc(until),
            origin_topic=topic,
            chat_id=None if chat_id is None else str(chat_id),
        )
        with access.open_reader() as reader:
            page = list_letters(reader, where, limit)
            return DeadLettersOut(
                dead_letters=letters_out(access, reader.topic, page.letters),
                truncated=page.truncated,
            )

    @app.get(
        "/v1/dead-letters/{partition}/{offset}",
        response_model=DeadLetterOut,
        responses=_NO_DLQ,
        tags=[TAG_DLQ],
        summary="One dead letter's metadata by its coordinates (never its value)",
    )
    def show_dead_letter(
        admin: CurrentAdmin,
        partition: Annotated[int, Path(ge=0, le=2**31 - 1)],
        offset: Annotated[int, Path(ge=0, le=2**63 - 1)],
    ) -> DeadLetterOut:
        access = dead_letters()
        with access.open_reader() as reader:
            info = show(reader, partition, offset)
            if info is None:
                raise ApiError(
                    404, "not_found", f"no dead letter at {partition}:{offset}", "path.offset"
                )
            [out] = letters_out(access, reader.topic, [info])
            return out

    @app.post(
        "/v1/dead-letters/replay",
        response_model=ReplayOut,
        responses={
            **_NO_DLQ,
            422: {
                "description": "Coordinates and a filter both given, or neither (nor `all`), "
                f"or more than {MAX_LIST} letters match"
            },
        },
        tags=[TAG_DLQ],
        summary="Replay dead letters into the message topic after a fix (once each unless forced)",
    )
    def replay_dead_letters(admin: CurrentAdmin, body: ReplayIn) -> ReplayOut:
        access = dead_letters()
        filtered = any(
            v is not None
            for v in (body.reason, body.stage, body.since, body.until, body.topic, body.chat_id)
        )
        if body.letters is not None and (filtered or body.all):
            raise ApiError(
                422, "invalid_request", "body: give letters or a filter, not both", "body.letters"
            )
        if body.letters is None and not (filtered or body.all):
            raise ApiError(
                422, "invalid_request", "body: give letters, a filter, or all=true", "body"
            )
        with access.open_reader() as reader, replaying:
            if body.letters is not None:
                chosen = [(ref.partition, ref.offset) for ref in body.letters]
            else:
                where = LetterFilter(
                    reason=body.reason,
                    stage=body.stage,
                    since=_utc(body.since),
                    until=_utc(body.until),
                    origin_topic=body.topic,
                    chat_id=None if body.chat_id is None else str(body.chat_id),
                )
                try:
                    chosen = select(reader, where)
                except ValueError as exc:
                    raise ApiError(422, "invalid_request", str(exc), "body") from None
            report = replay(
                reader,
                access.sink,
                access.ledger,
                chosen,
                messages_topic=access.messages_topic,
                actor=f"admin:{admin}",
                force=body.force,
                dry_run=body.dry_run,
            )
        return ReplayOut(
            results=[
                ReplayResultOut(
                    partition=r.partition,
                    offset=r.offset,
                    outcome=r.outcome,
                    detail=r.detail,
                    replayed_to_partition=r.replayed_to[0] if r.replayed_to else None,
                    replayed_to_offset=r.replayed_to[1] if r.replayed_to else None,
                )
                for r in report.results
            ],
            counts=report.counts(),
        )

    # --- jobs and audit ------------------------------------------------------------------------

    @app.get("/v1/jobs", response_model=list[JobOut], tags=[TAG_JOBS], summary="Recent jobs")
    def list_jobs(admin: CurrentAdmin) -> list[JobOut]:
        return [_job(j) for j in jobs.all()]

    @app.get(
        "/v1/jobs/{job_id}", response_model=JobOut, tags=[TAG_JOBS], summary="One job's progress"
    )
    def get_job(
        admin: CurrentAdmin, job_id: Annotated[str, Path(pattern=r"^[0-9a-f]{32}$")]
    ) -> JobOut:
        job = jobs.get(job_id)
        if job is None:
            raise ApiError(404, "not_found", f"no job {job_id} (jobs live in the admin process)")
        return _job(job)

    @app.get(
        "/v1/audit",
        response_model=list[AuditOut],
        tags=[TAG_JOBS],
        summary="The append-only key audit trail, newest first",
    )
    def audit(
        admin: CurrentAdmin,
        chat_id: Annotated[uuid.UUID | None, Query()] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> list[AuditOut]:
        return [AuditOut(**asdict(e)) for e in ctx.keys.repo.audit_entries(chat_id, limit)]

    return app
