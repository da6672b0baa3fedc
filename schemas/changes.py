"""The change topic (`sealstream.changes.v1`): what the encryptor stored, for live delivery.

After the encryptor wrote a batch to Cassandra, and before it commits the batch's offsets, it
publishes one `ChangeEvent` per change it applied (a post, an edit, a sender's or admin's deletion)
with acks=all. So a change event exists only for a stored change, and a crash between the two
writes redelivers the batch and publishes the event again: consumers deduplicate by `event_id`.

The event carries the sealed envelope exactly as stored (base64 in JSON), never plaintext: the
topic is as safe to back up as the Cassandra table (docs/security.md). Key: the chat id (UTF-8 of
its canonical text form), so one chat's events keep their order on one partition.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

from schemas.events import MessageKind

CHANGE_SCHEMA_VERSION: Literal[1] = 1


class ChangeEvent(BaseModel):
    """One stored change of a chat's messages.

    `event_id` orders a chat's changes: a post's is its message id, an edit's or deletion's is the
    change's own Snowflake id (a deletion made through the admin API gets one from the admin
    process's leased generator). `revision`, `dek_version` and `envelope` are the row's after the
    change; a deletion has no envelope.
    """

    # bytes travel as base64 in JSON (pydantic: RFC 4648 URL-safe alphabet, padded), both ways.
    model_config = ConfigDict(
        frozen=True, extra="forbid", ser_json_bytes="base64", val_json_bytes="base64"
    )

    schema_version: Literal[1] = CHANGE_SCHEMA_VERSION
    kind: MessageKind
    event_id: int = Field(ge=1, lt=2**63)
    chat_id: uuid.UUID
    tenant_id: str
    message_id: int = Field(ge=1, lt=2**63)
    sender_id: str
    revision: int = Field(ge=1)
    dek_version: int | None = None
    envelope: bytes | None = None
    created_at: datetime
    edited_at: datetime | None = None
    deleted_at: datetime | None = None
    # The attachment ids the message references (its row's `attachment_ids`), in order; absent
    # from the JSON when none, so consumers of the previous version read every other event.
    attachment_ids: tuple[Annotated[int, Field(ge=1, lt=2**63)], ...] = ()

    @model_serializer(mode="wrap")
    def _without_empty_attachments(self, handler: SerializerFunctionWrapHandler) -> Any:
        data = handler(self)
        if isinstance(data, dict) and not data.get("attachment_ids"):
            data.pop("attachment_ids", None)
        return data

    def key(self) -> bytes:
        return str(self.chat_id).encode()

    def value(self) -> bytes:
        return self.model_dump_json().encode()
