"""The Kafka record of a chat message (topic `sealstream.messages.v1`), schema version 1.

Producers who post straight to Kafka and downstream ML consumers rely on this contract; its JSON
Schema is exported to `schemas/message_record.v1.json` (a test keeps the file in step). The record
key is the chat id (UTF-8 of its canonical text form), so one chat's messages stay in order on one
partition. The message id is assigned before publishing, so every later step is idempotent by id.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from schemas.ids import id_millis

SCHEMA_VERSION: Literal[1] = 1
MAX_TEXT_BYTES = 16 * 1024
"""Largest message text, in UTF-8 bytes (well under the 64 KiB envelope limit)."""

MAX_ID_LEN = 128

MAX_ATTACHMENTS = 100
"""Most attachment ids one record may carry (the gateway's own limit,
`AttachmentSettings.max_per_message`, is at most this)."""

MAX_UTC_OFFSET = timedelta(hours=18)
"""Largest UTC offset of `sent_at`: Java's time API, hence OpenSearch, refuses anything beyond."""


CHANGE_CLOCK_SKEW_MS = 5 * 60 * 1000
"""How far ahead of a worker's clock an edit's or deletion's id may be (ids come from leased
generators on synchronised clocks)."""

MessageKind = Literal["post", "edit", "delete"]
"""What a record asks for: a new message, a new revision of one (its sender's), or its deletion by
its sender. All three are keyed by chat id, so one chat's changes keep their order."""


class MessageRecord(BaseModel):
    """One change to a chat's messages as published to the message topic: a post, an edit or a
    sender's deletion (plaintext: keep the topic short-lived).

    `message_id` is always the message's own id. An edit or deletion also carries `event_id`, a
    Snowflake id of the change itself from the same leased generator (so later changes have higher
    ids); a post's event id is its message id. An edit carries the new text; a deletion none.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1] = SCHEMA_VERSION
    kind: MessageKind = "post"
    message_id: int = Field(ge=1, lt=2**63, description="Time-ordered 64-bit id (Snowflake)")
    event_id: int | None = Field(
        default=None,
        ge=1,
        lt=2**63,
        description="Edit/delete only: Snowflake id of the change, greater than message_id",
    )
    chat_id: uuid.UUID
    tenant_id: str = Field(default="default", min_length=1, max_length=MAX_ID_LEN)
    sender_id: str = Field(min_length=1, max_length=MAX_ID_LEN)
    text: str | None = Field(
        default=None,
        min_length=1,
        description=f"Post and edit: at most {MAX_TEXT_BYTES} bytes of UTF-8; delete: absent",
    )
    client_message_id: str | None = Field(default=None, max_length=MAX_ID_LEN)
    sent_at: datetime = Field(
        description="RFC 3339 date-time with a UTC offset of at most +/-18:00; held in UTC"
    )
    attachment_ids: tuple[Annotated[int, Field(ge=1, lt=2**63)], ...] = Field(
        default=(),
        max_length=MAX_ATTACHMENTS,
        description="Post only: ids of the chat's attachment files the message references "
        "(uploaded by its sender, checked by the gateway), in the sender's order; absent when "
        "none (records without it are read as referencing none)",
    )

    @field_validator("text")
    @classmethod
    def _text_size(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if not value.strip():
            raise ValueError("text must contain a non-blank character")
        size = len(value.encode("utf-8", errors="strict"))
        if size > MAX_TEXT_BYTES:
            raise ValueError(f"text is {size} bytes of UTF-8; the limit is {MAX_TEXT_BYTES}")
        return value

    @field_validator("sent_at")
    @classmethod
    def _sent_at_in_utc(cls, value: datetime) -> datetime:
        # Normalised here, before any sink: every store gets the same instant in UTC, and what
        # one of them could not store (an offset Java refuses, a year that leaves 1..9999 once
        # in UTC) is refused for all, with the reason, instead of failing in one sink only.
        offset = value.utcoffset()
        if offset is None:
            raise ValueError("must carry a UTC offset (e.g. 'Z' or '+02:00')")
        if abs(offset) > MAX_UTC_OFFSET:
            raise ValueError("UTC offset must be within +/-18:00")
        try:
            return value.astimezone(UTC)
        except OverflowError:
            raise ValueError("is outside years 1 to 9999 once converted to UTC") from None

    @model_serializer(mode="wrap")
    def _without_empty_attachments(self, handler: SerializerFunctionWrapHandler) -> Any:
        # A record without attachments is written exactly as before the field existed, so
        # workers of the previous version (extra="forbid") still read every such record.
        data = handler(self)
        if isinstance(data, dict) and not data.get("attachment_ids"):
            data.pop("attachment_ids", None)
        return data

    @model_validator(mode="after")
    def _fields_of_kind(self) -> MessageRecord:
        if self.attachment_ids and self.kind != "post":
            raise ValueError("attachment_ids: only a post references attachments")
        if len(set(self.attachment_ids)) != len(self.attachment_ids):
            raise ValueError("attachment_ids: must be distinct")
        if self.kind == "delete":
            if self.text is not None:
                raise ValueError("text: a delete carries no text")
        elif self.text is None:
            raise ValueError(f"text: required when kind is {self.kind}")
        if self.kind == "post":
            if self.event_id not in (None, self.message_id):
                raise ValueError("event_id: a post's event id is its message id (leave it out)")
        elif self.event_id is None:
            raise ValueError(f"event_id: required when kind is {self.kind}")
        elif self.event_id <= self.message_id:
            raise ValueError("event_id: must be greater than message_id (made after the message)")
        return self

    @property
    def change_id(self) -> int:
        """The id of this change: `event_id` for an edit or delete, the message id for a post."""
        return self.event_id if self.event_id is not None else self.message_id

    def change_timing_problem(self, window_seconds: int, now_ms: int) -> str | None:
        """Why an edit or deletion cannot be applied for its timing (a dead-letter reason naming
        the field), or None; always None for a post. Both workers apply the same rule:

        - made more than `window_seconds` after its message, on the ids' clock (event id's time
          minus message id's time): a change the gateway accepted in time is not refused for the
          time it spent in Kafka, and every worker and replay decides alike;
        - made more than `CHANGE_CLOCK_SKEW_MS` after `now_ms` (Unix ms, the worker's clock): an
          id far ahead would make every later edit of the message look stale.
        """
        if self.event_id is None:
            return None
        made = id_millis(self.event_id)
        if made - id_millis(self.message_id) > window_seconds * 1000:
            return f"event_id: made more than {window_seconds} s after the message (edit window)"
        if made > now_ms + CHANGE_CLOCK_SKEW_MS:
            return "event_id: made in the future (more than the allowed clock skew ahead)"
        return None

    def key(self) -> bytes:
        return str(self.chat_id).encode()

    def value(self) -> bytes:
        return self.model_dump_json().encode()


def export_json_schema() -> dict[str, object]:
    schema = MessageRecord.model_json_schema()
    schema["$id"] = "https://sealstream.dev/schemas/message_record.v1.json"
    schema["title"] = "Sealstream MessageRecord v1"
    return schema


_QUOTED = re.compile(r"`[^`]*`")


def describe(error: ValidationError) -> str:
    """Field and rule of each problem, never the input value (it may be message text).

    Only our own field names are repeated: an unexpected field is "(unexpected field)", since a
    producer's field names are input too (text where a name goes). Parts of the input a parser
    quotes in its message (pydantic quotes a character of a bad UUID in backticks) are elided.
    """
    parts = []
    for e in error.errors():
        loc = ".".join(
            str(p) if p in MessageRecord.model_fields else "(unexpected field)" for p in e["loc"]
        )
        parts.append(f"{loc or 'record'}: {_QUOTED.sub('`…`', e['msg'])}")
    return "; ".join(parts)[:500]


def decode_record(
    value: bytes, key: bytes | None, sealed_event_id: int | None = None
) -> MessageRecord | str:
    """Parse a record from the message topic; on failure return the reason (for the DLQ).

    The key is part of the contract: a record without one is refused like one whose key does not
    match, since the workers read each batch's deletion state by key (sealstream.deletion_state)
    and a keyless record would slip past it into a deleted or expired chat. `sealed_event_id`:
    the event id a sealed record's `sealstream.event_id` header named (and its seal bound); the
    decoded record must carry the same (`change_id`), so the id consumers deduplicate by is the
    one the producer sealed (docs/format.md "Sealed Kafka records").
    """
    try:
        message = MessageRecord.model_validate_json(value)
    except ValidationError as exc:
        return f"invalid record: {describe(exc)}"
    if key is None:
        return "record has no key; the key must be chat_id (per-chat ordering, deletion checks)"
    if key != message.key():
        return "record key does not match chat_id (breaks per-chat ordering)"
    if sealed_event_id is not None and sealed_event_id != message.change_id:
        return "header sealstream.event_id does not match the record's event id"
    return message
