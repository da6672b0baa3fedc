"""Live delivery's logic: who may follow a chat, turning change events into client frames, and
resume from a cursor.

Plain functions and one class over the ports (delivery.ports); the threads and sockets live in
delivery.api and delivery.wiring. Envelopes are opened by the reader's own code path
(`reader.service.EnvelopeOpener`, the row's context incl. revision); plaintext only ever sits in
a frame on its way to a client: never logged, never raised.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from delivery.hub import Delivered, Hub
from delivery.ports import ChangeRows, ChatLookup, RowOpener
from schemas.changes import ChangeEvent
from schemas.ids import first_id_at, id_millis
from sealstream.adapters.cassandra import StoredMessage
from sealstream.adapters.postgres import ChatRow
from sealstream.errors import DecryptionError, KeyDestroyed, KeyNotFound, SealstreamError
from sealstream.http import ApiError, error_body

log = logging.getLogger(__name__)

MAX_EVENT_ID = 2**63 - 1
# Rows stamped up to this far in the future (a gateway clock ahead) are still read by resume.
_CLOCK_SKEW_MS = 10 * 60 * 1000
_FRAME_TYPE = {"post": "message", "edit": "edit", "delete": "delete"}


class CursorExpired(ApiError):
    """The cursor is older than the edit window, or more changes were missed than a resume
    replays: the client refetches history from the reader, then subscribes without a cursor."""

    def __init__(self, why: str, field: str = "cursor") -> None:
        super().__init__(
            409, "cursor_expired", f"{field}: {why}; refetch history from the reader", field
        )


def parse_cursor(raw: str | None, field: str) -> int | None:
    """A resume cursor: the decimal event id of the last change the client got (None: live
    only). 422 naming `field` for anything else."""
    if raw is None or raw == "":
        return None
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 19) or raw.startswith("0"):
        raise ApiError(422, "invalid_request", f"{field}: not an event id", field)
    value = int(raw)
    if not 1 <= value <= MAX_EVENT_ID:
        raise ApiError(422, "invalid_request", f"{field}: not an event id", field)
    return value


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat().replace("+00:00", "Z")


def change_frame(
    kind: str,
    event_id: int,
    row: StoredMessage,
    text: str | None,
) -> Delivered:
    """The client frame of one change (docs: README "Live delivery")."""
    frame: dict[str, Any] = {
        "type": _FRAME_TYPE[kind],
        "chat_id": str(row.chat_id),
        "event_id": str(event_id),
        "message_id": str(row.message_id),
        "sender_id": row.sender_id,
        "revision": row.revision,
        "created_at": _iso(row.created_at),
        "edited_at": _iso(row.edited_at),
    }
    if kind == "delete":
        frame["deleted_at"] = _iso(row.deleted_at)
    else:
        frame["text"] = text
        frame["attachments"] = [str(a) for a in row.attachment_ids]
    return Delivered(row.chat_id, event_id, frame)


FRESH_POST_MS = 10_000
"""A post event whose id is younger than this (ms) is pushed without a read of its row, unless
this process saw a change of the message (a replayed post after an edit: `genuine`). Older ones
(a lagging pipeline, a replay) cost one Cassandra read each, for followed chats only."""
_CHANGED_KEPT = 100_000  # messages remembered as edited or deleted (~100 bytes each)


class DeliveryService:
    """`chat` reads a chat afresh from Postgres; `rows` the message store; `opener` opens
    envelopes; `window_seconds` is the edit window (Settings.edits) and `max_resume_events` the
    most changes one resume replays."""

    def __init__(
        self,
        hub: Hub,
        chat: ChatLookup,
        rows: ChangeRows,
        opener: RowOpener,
        window_seconds: int,
        max_resume_events: int,
        clock_ms: Callable[[], int] | None = None,
    ) -> None:
        self.hub = hub
        self.chat = chat
        self.rows = rows
        self.opener = opener
        self.window_ms = window_seconds * 1000
        self.max_resume_events = max_resume_events
        self._clock_ms = clock_ms or (lambda: time.time_ns() // 1_000_000)
        # Messages this process has seen an edit or deletion of (any chat, followed or not),
        # oldest dropped first: a post event of one of them is a replay and is checked (below).
        self._changed: OrderedDict[tuple[uuid.UUID, int], None] = OrderedDict()

    # --- access ----------------------------------------------------------------------------

    def authorize(self, user: str, chat_id: uuid.UUID) -> ChatRow:
        """The chat if `user` may follow it now: 404 unknown, 410 deleted, 403 not a member."""
        chat = self.chat(chat_id)
        if chat is None:
            raise ApiError(404, "not_found", "no such chat")
        if chat.state == "deleted":
            raise ApiError(410, "gone", "this chat was deleted")
        if user not in chat.participants:
            raise ApiError(403, "forbidden", "you are not a participant of this chat")
        return chat

    # --- live changes ----------------------------------------------------------------------

    def on_records(self, values: list[bytes]) -> None:
        """The change topic's records (follower thread): those of followed chats are opened
        once here and handed to the hub on the loop."""
        items: list[Delivered] = []
        for value in values:
            try:
                event = ChangeEvent.model_validate_json(value)
            except ValidationError:
                log.error("change event refused by its schema; skipped")
                continue
            if event.kind != "post":
                self._remember_change(event.chat_id, event.message_id)
            if not self.hub.has(event.chat_id):
                continue
            if not self.genuine(event):
                continue
            item = self.delivered(event)
            if item is not None:
                items.append(item)
        self.hub.post(items)

    def genuine(self, event: ChangeEvent) -> bool:
        """Whether the event agrees with the message store. A post must carry its message id as
        event id. An edit or a deletion is checked against its row (one read; they are rare): a
        deletion carries no envelope, and an older revision's envelope still opens with that
        revision, so a writer of the change topic could otherwise hide any message on every
        client or roll its text back. An edit is pushed only while it is the row's last applied
        one (a later edit's event follows); a deletion only if the row is marked deleted (or
        gone). Refusals are logged by ids."""
        if event.kind == "post":
            ok = event.event_id == event.message_id and event.revision == 1
            if ok and self._maybe_replayed(event):
                # A post record replayed after an edit or deletion (an offset reset, a producer
                # sending again): its INSERT was shadowed in Cassandra, but the encryptor still
                # published the revision-1 envelope. Pushed only if the row is still that post.
                try:
                    row = self.rows.get(event.chat_id, event.message_id)
                except SealstreamError as exc:
                    log.warning(
                        "change not delivered: message store unavailable",
                        extra={"chat_id": str(event.chat_id), "error": type(exc).__name__},
                    )
                    return False
                ok = row is not None and row.deleted_at is None and row.revision == 1
        else:
            try:
                row = self.rows.get(event.chat_id, event.message_id)
            except SealstreamError as exc:
                log.warning(
                    "change not delivered: message store unavailable",
                    extra={"chat_id": str(event.chat_id), "error": type(exc).__name__},
                )
                return False
            if event.kind == "delete":
                ok = row is None or row.deleted_at is not None
            else:
                ok = (
                    row is not None
                    and row.deleted_at is None
                    and row.last_event_id == event.event_id
                    and row.revision == event.revision
                )
        if not ok:
            log.warning(
                "change event disagrees with the message store; not delivered",
                extra={
                    "chat_id": str(event.chat_id),
                    "message_id": event.message_id,
                    "event_id": event.event_id,
                    "kind": event.kind,
                },
            )
        return ok

    def _remember_change(self, chat_id: uuid.UUID, message_id: int) -> None:
        self._changed[(chat_id, message_id)] = None
        self._changed.move_to_end((chat_id, message_id))
        while len(self._changed) > _CHANGED_KEPT:
            self._changed.popitem(last=False)

    def _maybe_replayed(self, event: ChangeEvent) -> bool:
        """Whether a post event may be a replay of a message changed since: this process saw
        an edit or deletion of it, or the post is older than `FRESH_POST_MS` (this process may
        have started after its change). Live traffic is fresh and never edited yet: no read."""
        if (event.chat_id, event.message_id) in self._changed:
            return True
        return self._clock_ms() - id_millis(event.message_id) > FRESH_POST_MS

    def delivered(self, event: ChangeEvent) -> Delivered | None:
        """The frame of a change event, its envelope opened; None when it cannot be (a shredded
        chat, a failed integrity check: logged by ids)."""
        row = StoredMessage(
            chat_id=event.chat_id,
            message_id=event.message_id,
            sender_id=event.sender_id,
            dek_version=event.dek_version or 0,
            envelope=event.envelope or b"",
            created_at=event.created_at,
            edited_at=event.edited_at,
            deleted_at=event.deleted_at,
            revision=event.revision,
            # The row an edit leaves names that edit (`genuine` checks the stored row does):
            # the opener's re-read after a re-encryption compares the whole row.
            last_event_id=event.event_id if event.kind == "edit" else None,
            attachment_ids=event.attachment_ids,
        )
        if event.kind == "delete":
            return change_frame("delete", event.event_id, row, None)
        return self._opened(event.kind, event.event_id, row)

    def _opened(self, kind: str, event_id: int, row: StoredMessage) -> Delivered | None:
        try:
            text = self.opener.open(row).text
        except (KeyDestroyed, KeyNotFound):
            return None  # the chat was deleted meanwhile: nothing to deliver
        except DecryptionError:
            return None  # counted and logged (ids only) by the opener
        except SealstreamError as exc:
            log.warning(
                "change not delivered: key unavailable",
                extra={"chat_id": str(row.chat_id), "error": type(exc).__name__},
            )
            return None
        return change_frame(kind, event_id, row, text)

    # --- resume ----------------------------------------------------------------------------

    def resume(self, chat_id: uuid.UUID, cursor: int, field: str = "cursor") -> list[Delivered]:
        """The changes of the chat after `cursor` (the last event id the client got), in event
        order: posts with a larger message id (with their current text and revision), edits
        (`last_event_id` above the cursor) and deletions (after the cursor's time) of messages
        made within the edit window before the cursor. `CursorExpired` when the cursor is older
        than the window or more than `max_resume_events` changes were missed; 422 for a cursor
        from the future. Both name `field`, where the client sent the cursor.

        A deletion's event id is the row's `last_event_id` when the worker recorded one above
        the cursor, else the first id of its `deleted_at` millisecond (so a client may see a
        deletion twice, live and on resume, under two ids; applying it twice is harmless).
        """
        now_ms = self._clock_ms()
        cursor_ms = id_millis(cursor)
        if cursor_ms < now_ms - self.window_ms:
            raise CursorExpired("older than the edit window", field)
        if cursor_ms > now_ms + _CLOCK_SKEW_MS:
            raise ApiError(422, "invalid_request", f"{field}: in the future", field)
        low = max(0, first_id_at(cursor_ms - self.window_ms) - 1)
        items: list[Delivered] = []
        for row in self.rows.rows_after(chat_id, low, now_ms + _CLOCK_SKEW_MS):
            items.extend(self._missed(row, cursor, cursor_ms))
            if len(items) > self.max_resume_events:
                raise CursorExpired(f"more than {self.max_resume_events} changes missed", field)
        items.sort(key=lambda item: item.event_id)
        return items

    def _missed(self, row: StoredMessage, cursor: int, cursor_ms: int) -> list[Delivered]:
        if row.deleted_at is not None:
            if row.message_id > cursor:
                return []  # made and deleted while away: never seen, nothing to delete
            deleted_ms = int(row.deleted_at.timestamp() * 1000)
            if row.last_event_id is not None and row.last_event_id > cursor:
                return [change_frame("delete", row.last_event_id, row, None)]
            if deleted_ms > cursor_ms:
                return [change_frame("delete", first_id_at(deleted_ms), row, None)]
            return []
        found: list[Delivered] = []
        if row.message_id > cursor:
            post = self._opened("post", row.message_id, row)
            if post is not None:
                found.append(post)
        if row.last_event_id is not None and row.last_event_id > cursor:
            edit = self._opened("edit", row.last_event_id, row)
            if edit is not None:
                found.append(edit)
        return found

    # --- membership --------------------------------------------------------------------------

    def membership_changed(self, chat_id: uuid.UUID | None) -> None:
        """From the membership listener's thread: read the chat (every followed chat for None)
        and end, on the loop, the subscriptions of users no longer in it."""
        loop = self.hub.loop
        if loop is None:
            return
        for chat in [chat_id] if chat_id is not None else self.hub.chats():
            if not self.hub.has(chat):
                continue
            try:
                row = self.chat(chat)
            except SealstreamError as exc:
                # Fail closed: a participant removed by this very change must not stay
                # subscribed because Postgres blinked; the clients subscribe again.
                log.warning("membership re-check failed", extra={"error": type(exc).__name__})
                loop.call_soon_threadsafe(self.end_unchecked, chat)
                continue
            loop.call_soon_threadsafe(self.apply_membership, chat, row)

    def end_unchecked(self, chat_id: uuid.UUID) -> None:
        """On the loop: end every subscription of `chat_id` after a re-check that could not read
        the chat, with an `error` frame `unavailable` (subscribe again: checked afresh)."""
        frame = {
            "type": "error",
            "chat_id": str(chat_id),
            **error_body("unavailable", "membership could not be re-checked; subscribe again"),
        }
        for sub in self.hub.subscriptions(chat_id):
            sub.end(frame)
            self.hub.remove(sub)

    def apply_membership(self, chat_id: uuid.UUID, chat: ChatRow | None) -> None:
        """On the loop: end every subscription of `chat_id` whose user may no longer follow it,
        sending `removed` (reason `removed`, or `chat_deleted`)."""
        gone = chat is None or chat.state == "deleted"
        for sub in self.hub.subscriptions(chat_id):
            if gone or sub.user_id not in chat.participants:  # type: ignore[union-attr]
                reason = "chat_deleted" if gone else "removed"
                sub.end({"type": "removed", "chat_id": str(chat_id), "reason": reason})
                self.hub.remove(sub)
