"""A real gateway process that SIGKILLs itself in the middle of its first post with a
`client_message_id`: `python -m tests.crashing_gateway after-publish|before-publish`.

`after-publish`: Kafka acknowledged the records, the client never gets the answer (the worst case
of an unknown outcome). `before-publish`: the claim is written, nothing is published. Everything
else is the production gateway (`ingest.wiring.run`) with its settings from the environment.
"""

from __future__ import annotations

import inspect
import os
import signal
import sys
from collections.abc import Sequence

import ingest.wiring as wiring
from schemas.events import MessageRecord
from sealstream.settings import Settings


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def main(mode: str) -> None:
    original = wiring.AckedPublisher.publish
    if mode not in ("after-publish", "before-publish"):
        raise SystemExit(f"unknown mode {mode!r}")

    def with_client_id(items: Sequence[MessageRecord]) -> bool:
        return any(r.client_message_id is not None for r in items)

    if inspect.iscoroutinefunction(original):

        async def publish_async(self: object, topic: str, items: Sequence[MessageRecord]):  # type: ignore[no-untyped-def]
            if with_client_id(items) and mode == "before-publish":
                _die()
            await original(self, topic, items)  # type: ignore[arg-type]
            if with_client_id(items):
                _die()

        wiring.AckedPublisher.publish = publish_async  # type: ignore[method-assign,assignment]
    else:

        def publish(self: object, topic: str, items: Sequence[MessageRecord]) -> None:
            if with_client_id(items) and mode == "before-publish":
                _die()
            original(self, topic, items)  # type: ignore[arg-type]
            if with_client_id(items):
                _die()

        wiring.AckedPublisher.publish = publish  # type: ignore[method-assign]
    wiring.run(Settings())


if __name__ == "__main__":
    main(sys.argv[1])
