"""Fault drills, end to end: steady load through two gateways while each service is SIGKILLed
and each server of the local stack is crashed and started again; nothing acknowledged may be
lost or stored twice, nothing deleted may come back, and the gateways answer 503 with
Retry-After (never a 500, never a hang) while a server is away.

These drills stop the stack's servers: `tests/conftest.py` runs this module after every other
test, and each drill leaves every server answering (checked after the module too). Phases are
shorter than `sealstream drill`'s (10 s outages) so the module takes a few minutes.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from sealstream.drills.harness import (
    DEFAULT_DRILLS,
    REPO_ROOT,
    DrillConfig,
    DrillSession,
    drill_session,
)
from sealstream.settings import Settings, StackSettings
from sealstream.stack import runner
from sealstream.stack.base import StackContext
from tests.conftest import START_HINT

CONFIG = DrillConfig(
    outage_seconds=10.0,
    before_seconds=3.0,
    after_seconds=4.0,
    clients=4,
    rate=16.0,
    request_timeout=10.0,
    drain_timeout=90.0,
    deletions=3,
    server_mode="kill",
)


def _silent_servers() -> list[str]:
    ctx = StackContext(settings=StackSettings(), repo_root=REPO_ROOT)
    return [s.name for s in runner.status(runner.build(ctx)) if not s.answering]


@pytest.fixture(scope="module")
def drills(settings: Settings) -> Iterator[DrillSession]:
    silent = _silent_servers()
    if silent:
        pytest.fail(f"{', '.join(silent)} not answering; {START_HINT}", pytrace=False)
    with drill_session(CONFIG, settings) as session:
        yield session
    silent = _silent_servers()
    assert not silent, f"the drills left {', '.join(silent)} not answering"


@pytest.mark.parametrize("name", DEFAULT_DRILLS)
def test_drill_loses_duplicates_and_resurrects_nothing(drills: DrillSession, name: str) -> None:
    result = drills.run(name, log=lambda line: print(line, flush=True))
    print(
        f"{name}: acked {result.acknowledged}, deleted {result.deleted}, "
        f"answers while down {dict(result.answers_down)}, max {result.max_seconds_down:.1f} s, "
        f"back in {result.restart_seconds} s, drained in {result.drain_seconds} s"
    )
    assert result.acknowledged > 0 and result.deleted > 0, "the drill produced no traffic"
    assert result.failures == [], (
        f"{name}: {'; '.join(result.failures)}; lost {result.lost[:5]}, "
        f"resurrected {result.resurrected[:5]}, answers while down {dict(result.answers_down)}"
    )
