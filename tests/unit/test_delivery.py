"""Live delivery's logic with in-memory fakes of its ports and the real envelope crypto: resume
from a cursor (posts, edits, deletions), the per-subscriber buffer and deduplication, membership
re-checks."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from typing import Literal

import pytest

from delivery.hub import Delivered, Hub, Outbox, Subscription
from delivery.service import FRESH_POST_MS, CursorExpired, DeliveryService, parse_cursor
from reader.service import EnvelopeOpener
from schemas.changes import ChangeEvent
from schemas.ids import EPOCH_MS, first_id_at, id_time
from sealstream.adapters.cassandra import StoredMessage
from sealstream.adapters.postgres import ChatRow
from sealstream.crypto import ChatKey
from sealstream.errors import KeyDestroyed, KeyNotFound, StoreUnavailable
from sealstream.http import ApiError
from tests.sealed_rows import sealed_row

NOW_MS = EPOCH_MS + 40 * 24 * 3600 * 1000
WINDOW_S = 48 * 3600
CHAT = uuid.uuid4()
KEY = ChatKey(version=1, material=os.urandom(32))


def at(ms_before_now: int, seq: int = 0) -> int:
    """An id made `ms_before_now` ms before NOW (sequence `seq`)."""
    return first_id_at(NOW_MS - ms_before_now) + seq


class Keys:
    def key(self, chat_id: uuid.UUID, version: int) -> ChatKey:
        if chat_id != CHAT or version != KEY.version:
            raise KeyNotFound("no such key")
        return KEY


class Rows:
    def __init__(self, rows: list[StoredMessage]) -> None:
        self.rows = rows

    def get(self, chat_id: uuid.UUID, message_id: int) -> StoredMessage | None:
        return next(
            (r for r in self.rows if (r.chat_id, r.message_id) == (chat_id, message_id)), None
        )

    def rows_after(
        self, chat_id: uuid.UUID, after_id: int, until_ms: int, page_size: int = 500
    ) -> Iterator[StoredMessage]:
        yield from sorted(
            (r for r in self.rows if r.chat_id == chat_id and r.message_id > after_id),
            key=lambda r: r.message_id,
        )


def chat_row(participants: tuple[str, ...] = ("alice", "bob"), state: str = "active") -> ChatRow:
    now = datetime.now(UTC)
    return ChatRow(CHAT, "default", participants, state, now, now)


def service(rows: list[StoredMessage], max_resume: int = 100) -> DeliveryService:
    return DeliveryService(
        hub=Hub(),
        chat=lambda chat_id: chat_row() if chat_id == CHAT else None,
        rows=Rows(rows),
        opener=EnvelopeOpener(Keys()),
        window_seconds=WINDOW_S,
        max_resume_events=max_resume,
        clock_ms=lambda: NOW_MS,
    )


def post(message_id: int, text: str) -> StoredMessage:
    return sealed_row(CHAT, message_id, "alice", KEY, text)


def edited(row: StoredMessage, event_id: int, text: str) -> StoredMessage:
    newer = sealed_row(CHAT, row.message_id, row.sender_id, KEY, text, revision=row.revision + 1)
    return replace(newer, last_event_id=event_id, edited_at=id_time(event_id))


def deleted(row: StoredMessage, when_id: int) -> StoredMessage:
    return replace(row, envelope=b"", deleted_at=id_time(when_id))


def test_resume_sends_posts_edits_and_deletions_after_the_cursor_in_event_order() -> None:
    old = post(at(3_600_000), "old, edited while away")  # an hour before the cursor
    gone = post(at(3_000_000), "old, deleted while away")
    quiet = post(at(2_000_000), "old, untouched")
    cursor = at(1_000_000)
    new = post(at(500_000), "new")
    new_then_deleted = post(at(400_000), "made and deleted while away")
    edit_id = at(300_000, seq=7)
    rows = [
        edited(old, edit_id, "old, new text"),
        deleted(gone, at(200_000)),
        quiet,
        post(cursor, "the last one seen"),
        new,
        deleted(new_then_deleted, at(100_000)),
    ]
    frames = [item.frame for item in service(rows).resume(CHAT, cursor)]
    assert [(f["type"], f["message_id"], f.get("text")) for f in frames] == [
        ("message", str(new.message_id), "new"),
        ("edit", str(old.message_id), "old, new text"),
        ("delete", str(gone.message_id), None),
    ]
    assert [f["event_id"] for f in frames] == [
        str(new.message_id),
        str(edit_id),
        str(first_id_at(NOW_MS - 200_000)),
    ]
    assert frames[1]["revision"] == 2 and frames[1]["edited_at"]
    assert "text" not in frames[2] and frames[2]["deleted_at"]


def test_edits_and_deletions_seen_before_the_cursor_are_not_sent_again() -> None:
    old = post(at(3_600_000), "old")
    edit_id = at(2_000_000)
    rows = [edited(old, edit_id, "edited before"), deleted(post(at(3_000_000), "x"), at(1_500_000))]
    assert service(rows).resume(CHAT, at(1_000_000)) == []


def test_a_cursor_older_than_the_window_or_too_far_behind_is_expired() -> None:
    with pytest.raises(CursorExpired) as expired:
        service([]).resume(CHAT, at(WINDOW_S * 1000 + 1_000))
    assert (expired.value.status, expired.value.code) == (409, "cursor_expired")
    rows = [post(at(10_000, seq=i), f"m{i}") for i in range(5)]
    with pytest.raises(CursorExpired):
        service(rows, max_resume=4).resume(CHAT, at(20_000))
    assert len(service(rows, max_resume=5).resume(CHAT, at(20_000))) == 5


def test_cursors_are_decimal_event_ids() -> None:
    assert parse_cursor(None, "cursor") is None
    assert parse_cursor("42", "cursor") == 42
    for bad in ("0", "-1", "01", "x", "9" * 19, "١٢"):
        with pytest.raises(ApiError) as refused:
            parse_cursor(bad, "cursor")
        assert (refused.value.status, refused.value.field) == (422, "cursor")


def change_of(
    row: StoredMessage, kind: Literal["post", "edit"] = "post", event_id: int | None = None
) -> ChangeEvent:
    """The change event a worker publishes for `row` (a post's event id is its message id)."""
    return ChangeEvent(
        kind=kind,
        event_id=row.message_id if event_id is None else event_id,
        chat_id=row.chat_id,
        tenant_id="default",
        message_id=row.message_id,
        sender_id=row.sender_id,
        revision=row.revision,
        dek_version=row.dek_version,
        envelope=row.envelope,
        created_at=row.created_at,
        edited_at=row.edited_at,
    )


def test_a_live_change_event_is_opened_with_the_row_context() -> None:
    row = post(at(1_000), "live text")
    event = change_of(row)
    item = service([]).delivered(event)
    assert item is not None and item.frame["text"] == "live text"
    # A change whose envelope does not match its columns (here: another sender) is not sent.
    assert service([]).delivered(event.model_copy(update={"sender_id": "mallory"})) is None


def test_a_live_post_frame_names_its_attachments_and_the_event_round_trips() -> None:
    row = post(at(1_000), "see attached")
    event = _post_event(row).model_copy(update={"attachment_ids": (2**62 + 1, 7)})
    again = ChangeEvent.model_validate_json(event.value())
    assert again.attachment_ids == (2**62 + 1, 7)
    item = service([]).delivered(again)
    assert item is not None and item.frame["attachments"] == ["4611686018427387905", "7"]
    # An event without attachments is written as before the field existed.
    plain = _post_event(row)
    assert b"attachment_ids" not in plain.value()
    item = service([]).delivered(plain)
    assert item is not None and item.frame["attachments"] == []


def _post_event(row: StoredMessage) -> ChangeEvent:
    return ChangeEvent(
        kind="post",
        event_id=row.message_id,
        chat_id=CHAT,
        tenant_id="default",
        message_id=row.message_id,
        sender_id=row.sender_id,
        revision=1,
        dek_version=1,
        envelope=row.envelope,
        created_at=row.created_at,
    )


def test_a_replayed_post_of_an_edited_or_deleted_message_is_not_pushed() -> None:
    fresh = post(at(1_000), "as first posted")
    now_edited = edited(fresh, at(500), "as edited")
    delivery = service([now_edited])
    # Fresh and never seen changed: pushed without a read of the row (live traffic).
    assert delivery.genuine(_post_event(fresh))
    # This process saw an edit of the message (in any chat): the post is checked against the row.
    edit = _post_event(now_edited).model_copy(
        update={"kind": "edit", "event_id": at(500), "revision": 2}
    )
    delivery.hub.has = lambda chat_id: False  # type: ignore[method-assign]  # not followed here
    delivery.on_records([edit.value()])
    assert not delivery.genuine(_post_event(fresh))
    # Older than FRESH_POST_MS (this process may have started after the change): checked too.
    old = post(at(FRESH_POST_MS + 1_000), "old")
    assert service([old]).genuine(_post_event(old))
    assert not service([deleted(old, at(10))]).genuine(_post_event(old))
    assert not service([]).genuine(_post_event(old))  # marker-only or gone


def _item(event_id: int) -> Delivered:
    return Delivered(CHAT, event_id, {"type": "message", "event_id": str(event_id)})


def test_a_subscription_buffers_while_resuming_then_sends_each_event_once() -> None:
    async def scenario() -> list[str]:
        hub, outbox = Hub(), Outbox(limit=100)
        sub = Subscription(CHAT, "bob", outbox)
        hub.add(sub)
        hub.dispatch(_item(5))  # live while the resume is being read: buffered
        hub.dispatch(_item(6))
        sub.replay([_item(4), _item(5)])  # the resume found 4 and 5 in the store
        hub.dispatch(_item(6))  # redelivered (at-least-once): dropped
        hub.dispatch(_item(7))
        outbox.close()
        frames = []
        while (frame := outbox.queue.get_nowait()) is not None:
            frames.append(frame["event_id"])
        return frames

    assert asyncio.run(scenario()) == ["4", "5", "6", "7"]


def test_a_full_outbox_marks_the_client_too_slow() -> None:
    async def scenario() -> bool:
        outbox = Outbox(limit=10)
        sub = Subscription(CHAT, "bob", outbox)
        sub.replay([_item(i) for i in range(1, 20)])
        return outbox.overflowed and outbox.closed

    assert asyncio.run(scenario())


def test_a_membership_change_ends_the_subscriptions_of_removed_users_only() -> None:
    async def scenario() -> tuple[list[object], list[object]]:
        svc = service([])
        bob, carol = Outbox(10), Outbox(10)
        for user, box in (("bob", bob), ("carol", carol)):
            sub = Subscription(CHAT, user, box)
            svc.hub.add(sub)
            sub.replay([])
        svc.apply_membership(CHAT, chat_row(("alice", "carol")))
        svc.hub.dispatch(_item(9))
        return [bob.queue.get_nowait() for _ in range(bob.queue.qsize())], [
            carol.queue.get_nowait() for _ in range(carol.queue.qsize())
        ]

    bob, carol = asyncio.run(scenario())
    assert bob == [{"type": "removed", "chat_id": str(CHAT), "reason": "removed"}]
    assert carol == [{"type": "message", "event_id": "9"}]


def test_after_the_listener_reconnects_every_followed_chat_is_checked_again() -> None:
    """`membership_changed(None)` (notifications may have been lost while Postgres was away)
    re-reads every chat followed here, from the listener's thread."""
    members = {"now": ("alice",)}

    async def scenario() -> list[object]:
        svc = service([])
        svc.chat = lambda chat_id: chat_row(members["now"])
        box = Outbox(10)
        sub = Subscription(CHAT, "bob", box)
        svc.hub.add(sub)
        sub.replay([])
        await asyncio.to_thread(svc.membership_changed, None)
        await asyncio.sleep(0)  # the re-check's result is applied on the loop
        return [box.queue.get_nowait() for _ in range(box.queue.qsize())]

    assert asyncio.run(scenario()) == [
        {"type": "removed", "chat_id": str(CHAT), "reason": "removed"}
    ]


def test_a_membership_re_check_that_fails_ends_the_chats_subscriptions() -> None:
    """A re-check that cannot read the chat (Postgres away for a moment) must not leave a
    possibly removed participant subscribed: the subscriptions end with `unavailable`, and
    their clients subscribe again (checked afresh)."""

    def unreachable(chat_id: uuid.UUID) -> ChatRow | None:
        raise StoreUnavailable("postgres: connection refused")

    async def scenario() -> tuple[list[object], bool]:
        svc = service([])
        svc.chat = unreachable
        box = Outbox(10)
        sub = Subscription(CHAT, "bob", box)
        svc.hub.add(sub)
        sub.replay([])
        await asyncio.to_thread(svc.membership_changed, CHAT)
        await asyncio.sleep(0)
        return [box.queue.get_nowait() for _ in range(box.queue.qsize())], svc.hub.has(CHAT)

    frames, still_followed = asyncio.run(scenario())
    assert not still_followed
    assert [f["error"]["code"] for f in frames if isinstance(f, dict)] == ["unavailable"]
    assert frames[0] == {
        "type": "error",
        "chat_id": str(CHAT),
        "error": {
            "code": "unavailable",
            "message": "membership could not be re-checked; subscribe again",
        },
    }


# --- a chat re-encrypted: version 1 destroyed, version 2 active -----------------------------------

OLD_KEY = ChatKey(version=1, material=os.urandom(32))
NEW_KEY = ChatKey(version=2, material=os.urandom(32))


class ReencryptedKeys:
    def key(self, chat_id: uuid.UUID, version: int) -> ChatKey:
        if chat_id == CHAT and version == OLD_KEY.version:
            raise KeyDestroyed("destroyed")
        if chat_id == CHAT and version == NEW_KEY.version:
            return NEW_KEY
        raise KeyNotFound("no such key")


def reencrypted_service(rows: list[StoredMessage]) -> DeliveryService:
    store = Rows(rows)
    return DeliveryService(
        hub=Hub(),
        chat=lambda chat_id: chat_row() if chat_id == CHAT else None,
        rows=store,
        opener=EnvelopeOpener(ReencryptedKeys(), store.get),  # as delivery/wiring.py builds it
        window_seconds=WINDOW_S,
        max_resume_events=100,
        clock_ms=lambda: NOW_MS,
    )


def test_a_forged_post_event_cannot_borrow_a_real_messages_text() -> None:
    """A writer of the change topic names a real message's id, its own sender and attachments,
    and an envelope under a destroyed version: the opener's re-read (for rows re-sealed by
    re-encryption) must not hand it the real message's text under the forged fields."""
    real = sealed_row(CHAT, at(1_000), "alice", NEW_KEY, "wire the money to ACME")
    forged = ChangeEvent(
        kind="post",
        event_id=real.message_id,
        chat_id=CHAT,
        tenant_id="default",
        message_id=real.message_id,
        sender_id="mallory",
        revision=1,
        dek_version=1,
        envelope=sealed_row(CHAT, real.message_id, "mallory", OLD_KEY, "x").envelope,
        created_at=real.created_at,
        attachment_ids=(12345,),
    )
    service_ = reencrypted_service([real])
    assert service_.genuine(forged)  # a fresh post: nothing to compare it with
    assert service_.delivered(forged) is None


def test_a_post_frame_never_pairs_revision_1_with_a_later_revisions_text() -> None:
    """Delivery lagging: the message was edited and its first version destroyed meanwhile. The
    post event (revision 1) is not delivered with revision 2's text."""
    first = sealed_row(CHAT, at(1_000), "alice", OLD_KEY, "first text")
    now = replace(
        sealed_row(CHAT, first.message_id, "alice", NEW_KEY, "edited text", revision=2),
        last_event_id=at(500),
        edited_at=first.created_at,
    )
    event = change_of(first)
    item = reencrypted_service([now]).delivered(event)
    assert item is None or (item.frame["revision"], item.frame["text"]) != (1, "edited text")


def test_a_live_edit_reencrypted_before_delivery_is_still_delivered() -> None:
    """The edit (revision 2) was sealed under version 1; re-encryption re-sealed the row under
    version 2 and destroyed version 1 before live delivery opened the event: the edit's frame
    is delivered with its text (the re-read row is the same edit, re-sealed)."""
    message_id, edit_id = at(1_000), at(500)
    sealed_then = replace(
        sealed_row(CHAT, message_id, "alice", OLD_KEY, "edited", revision=2),
        edited_at=id_time(edit_id),
        last_event_id=edit_id,
    )
    now = replace(
        sealed_row(CHAT, message_id, "alice", NEW_KEY, "edited", revision=2),
        edited_at=id_time(edit_id),
        last_event_id=edit_id,
    )
    event = change_of(sealed_then, "edit", edit_id)
    service_ = reencrypted_service([now])
    assert service_.genuine(event)
    item = service_.delivered(event)
    assert item is not None and (item.frame["revision"], item.frame["text"]) == (2, "edited")
