"""What a drill checks after the fault: when the backlog drained, and whether any acknowledged
message was lost, stored twice, or any deleted message came back.

Two views are used on purpose. Progress (written? searchable?) is polled straight from Cassandra
and OpenSearch, so the polling does not load the services being measured. The verdict (lost,
duplicated) is the reader's: a user's history, decrypted, compared text by text with what the
gateways acknowledged. Resurrection is checked everywhere a deleted message could reappear: the
reader (history and the message itself), its ciphertext in Cassandra, its document in the index.
"""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from sealstream.adapters.cassandra import MessageStore
from sealstream.adapters.opensearch import SearchIndex
from sealstream.drills.load import Posted
from sealstream.errors import SealstreamError
from sealstream.settings import Settings

_POLL_SECONDS = 0.5
_PAGE = 100  # the reader's largest history page
# A service may answer 503 for a moment after a server's return (e.g. a pooled connection that
# died with Postgres is found broken once); a client retries, and so does the verdict.
RETRY_SECONDS = 60.0


def retrying(call: Callable[[], httpx.Response], seconds: float = RETRY_SECONDS) -> httpx.Response:
    """`call()` again while it answers 503 or fails to connect, for up to `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            response = call()
            if response.status_code != 503 or time.monotonic() > deadline:
                return response
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.5)


@dataclass(frozen=True)
class Deleted:
    chat_id: str
    message_id: str
    token: str


@dataclass(frozen=True)
class Verdict:
    lost: list[str]  # acknowledged message ids the reader does not return with their text
    unindexed: list[str]  # readable but not found by search
    duplicated: int  # extra copies: a text stored under n ids counts n - 1
    resurrected: list[str]  # "<id>: history|message|ciphertext|index" for each one back
    stored_unacked: int  # messages the client never saw a 202 for, yet stored (allowed)


class Verifier:
    """Polls the stores for progress and asks the reader for the verdict."""

    def __init__(self, settings: Settings, reader_url: str, reader_token: str) -> None:
        self.settings = settings
        self.store = MessageStore(settings.cassandra)
        self.index = SearchIndex(settings.opensearch)
        self.reader_url = reader_url
        self.headers = {"Authorization": f"Bearer {reader_token}"}
        self.http = httpx.Client(timeout=30)
        self._connected = False

    def close(self) -> None:
        self.http.close()
        self.index.close()
        if self._connected:
            self.store.close()

    def _connect(self) -> None:
        if not self._connected:
            self.store.connect()
            self._connected = True

    def _reconnect(self) -> None:
        """Drop the Cassandra session: after an outage the driver may wait minutes (exponential
        reconnection backoff) before trying the node again, and the drill must measure the
        services, not its own driver."""
        if self._connected:
            self.store.close()
            self._connected = False
        self.store = MessageStore(self.settings.cassandra)

    # --- progress, straight from the stores ----------------------------------------------

    def wait_processed(
        self,
        messages: list[Posted],
        deleted: set[str],
        since: float,
        timeout: float,
    ) -> tuple[float | None, list[Posted]]:
        """Poll until every message of `messages` that got a 202 is written (a live row) and
        searchable; messages still being retried are waited for. Returns the seconds from `since`
        until that moment (None on timeout) and the messages still not done at the end."""
        pending = {id(m): m for m in messages}
        written: set[int] = set()
        deadline = time.monotonic() + timeout
        while True:
            for key, message in list(pending.items()):
                # The client knows it failed, or the drill deleted it (`deleted` grows meanwhile).
                if message.gave_up or message.rejected is not None or message.message_id in deleted:
                    del pending[key]
            try:
                self._connect()
                acked = [m for m in pending.values() if m.message_id is not None]
                for message in acked:
                    if id(message) not in written and self._live_row(message):
                        written.add(id(message))
                ready = [m for m in acked if id(m) in written]
                found = self.index.searchable_ids([int(str(m.message_id)) for m in ready])
                for message in ready:
                    if int(str(message.message_id)) in found:
                        del pending[id(message)]
            except SealstreamError:
                self._reconnect()  # a store still coming back: poll again on a fresh session
            now = time.monotonic()
            if not pending:
                return now - since, []
            if now > deadline:
                return None, list(pending.values())
            time.sleep(_POLL_SECONDS)

    def _live_row(self, message: Posted) -> bool:
        row = self.store.get(uuid.UUID(message.chat_id), int(str(message.message_id)))
        return row is not None and row.deleted_at is None

    def in_place(self, messages: list[Posted]) -> list[Posted]:
        """Those of `messages` that are written (a live row) and searchable, in the same order:
        a message that fully exists, so that deleting it and finding it again is a resurrection
        (not a late write of something never there)."""
        try:
            self._connect()
            written = [m for m in messages if self._live_row(m)]
            found = self.index.searchable_ids([int(str(m.message_id)) for m in written])
        except SealstreamError:
            self._reconnect()
            return []
        return [m for m in written if int(str(m.message_id)) in found]

    # --- the verdict, through the reader --------------------------------------------------

    def history(self, chat_id: str) -> list[dict[str, Any]]:
        """The chat's whole history through the reader API, newest first."""
        messages: list[dict[str, Any]] = []
        params: dict[str, Any] = {"limit": _PAGE}
        url = f"{self.reader_url}/v1/chats/{chat_id}/messages"
        while True:
            response = retrying(lambda: self.http.get(url, params=params, headers=self.headers))
            response.raise_for_status()
            body = response.json()
            messages.extend(body["messages"])
            if not body.get("next_cursor"):
                return messages
            params["before"] = body["next_cursor"]

    def verdict(self, posted: list[Posted], deleted: list[Deleted]) -> Verdict:
        self._reconnect()  # a session opened before the fault may still be backing off
        self._connect()
        deleted_ids = {d.message_id for d in deleted}
        stored: dict[str, list[str]] = defaultdict(list)  # text -> ids it is stored under
        in_history: set[str] = set()
        for chat_id in sorted({m.chat_id for m in posted}):
            for message in self.history(chat_id):
                stored[message["text"]].append(message["message_id"])
                in_history.add(message["message_id"])
        lost: list[str] = []
        readable: list[Posted] = []
        for m in posted:
            if m.message_id is None or m.message_id in deleted_ids:
                continue
            if m.message_id in stored.get(m.text, []):
                readable.append(m)
            else:
                lost.append(m.message_id)
        found = self.index.searchable_ids([int(str(m.message_id)) for m in readable])
        unindexed = [str(m.message_id) for m in readable if int(str(m.message_id)) not in found]
        duplicated = sum(len(ids) - 1 for ids in stored.values() if len(ids) > 1)
        stored_unacked = sum(1 for m in posted if m.message_id is None and m.text in stored)
        return Verdict(
            lost=lost,
            unindexed=unindexed,
            duplicated=duplicated,
            resurrected=self._resurrected(deleted, in_history),
            stored_unacked=stored_unacked,
        )

    def _resurrected(self, deleted: list[Deleted], in_history: set[str]) -> list[str]:
        back: list[str] = []
        in_index = self.index.searchable_ids([int(d.message_id) for d in deleted])
        for d in deleted:
            where = []
            if d.message_id in in_history:
                where.append("history")
            url = f"{self.reader_url}/v1/chats/{d.chat_id}/messages/{d.message_id}"
            one = retrying(lambda: self.http.get(url, headers=self.headers))  # noqa: B023
            if one.status_code != 404:
                where.append(f"message {one.status_code}")
            row = self.store.get(uuid.UUID(d.chat_id), int(d.message_id))
            if row is not None and (row.deleted_at is None or row.envelope):  # b"" once deleted
                where.append("ciphertext")
            if int(d.message_id) in in_index:
                where.append("index")
            if where:
                back.append(f"{d.message_id}: {'+'.join(where)}")
        return back
