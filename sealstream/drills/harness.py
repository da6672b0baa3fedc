"""Fault drills: steady load through two gateways while one process or server fails, then the
accounting (acknowledged, lost, duplicated, resurrected), what the gateways answered meanwhile,
and how long the backlog took to drain. `sealstream drill` prints the table; the e2e test
`tests/e2e/test_drills.py` runs the same drills with shorter phases.

Each drill: chats of its own, load for `before_seconds`, a few written messages deleted through
the admin API, the fault, `outage_seconds` of outage under load, the return (the process or
server answers again), load for `after_seconds` (a few more messages deleted), the load stopped,
every acknowledged message waited for (written and searchable), then the reader's verdict.
The whole run uses a namespace of its own (topics, groups, keyspace, index, schema, Redis prefix,
Transit key), removed afterwards; the stack is taken from the `SEALSTREAM_STACK_*` settings.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from sealstream.auth import ADMIN_ROLE, mint_token
from sealstream.bench.pipeline_bench import _free_port, drop_namespace, isolated
from sealstream.drills.checks import Deleted, Verdict, Verifier, retrying
from sealstream.drills.faults import SERVER_MODES, Fault, KillService, ServerOutage
from sealstream.drills.fleet import GATEWAYS, Fleet
from sealstream.drills.load import CONNECTION_ERROR, TIMEOUT, Posted, SteadyLoad
from sealstream.migrate import migrate_all
from sealstream.settings import Settings, StackSettings
from sealstream.stack import runner
from sealstream.stack.base import StackContext

REPO_ROOT = Path(__file__).resolve().parents[2]
READER_USER = "drill-reader"

SERVICE_DRILLS = {
    "kill-encryptor": "encryptor",
    "kill-indexer": "indexer",
    "kill-gateway": GATEWAYS[0],
}
SERVER_DRILLS = {f"stop-{name}": name for name in runner.SERVERS}
HANG_DRILLS = {f"hang-{name}": name for name in runner.SERVERS}
# What `sealstream drill` runs by default (the list); hang-* on request.
DEFAULT_DRILLS = (*SERVICE_DRILLS, *SERVER_DRILLS)
ALL_DRILLS = (*DEFAULT_DRILLS, *HANG_DRILLS)


@dataclass(frozen=True)
class DrillConfig:
    """Durations in seconds; `rate` in messages per second over all clients."""

    outage_seconds: float = 30.0
    before_seconds: float = 10.0
    after_seconds: float = 10.0
    clients: int = 4
    rate: float = 20.0
    request_timeout: float = 10.0  # longer than this is a hang
    drain_timeout: float = 300.0
    deletions: int = 3  # messages deleted just before the fault, and again after the return
    server_mode: str = "kill"  # stop-* drills: kill (crash), term (graceful stop)

    def __post_init__(self) -> None:
        if self.server_mode not in ("kill", "term"):
            raise ValueError(f"server_mode: kill or term, not {self.server_mode!r}")


@dataclass
class DrillResult:
    name: str
    acknowledged: int = 0
    lost: list[str] = field(default_factory=list)
    duplicated: int = 0
    resurrected: list[str] = field(default_factory=list)
    unindexed: list[str] = field(default_factory=list)
    gave_up: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    deleted: int = 0
    stored_unacked: int = 0
    # What the gateways answered to requests sent while the process/server was away.
    answers_down: Counter[str] = field(default_factory=Counter)
    max_seconds_down: float = 0.0
    # Over the whole drill: 500s, requests past the deadline, 503s without Retry-After.
    http_500: int = 0
    hangs: int = 0
    no_retry_after: int = 0
    restart_seconds: float | None = None  # from "bring it back" until it answered
    drain_seconds: float | None = None  # from its return until the backlog was written+searchable
    exits: list[str] = field(default_factory=list)  # services that died on their own
    errors: list[str] = field(default_factory=list)  # the drill itself could not do a step

    @property
    def failures(self) -> list[str]:
        found = [
            f"{label}: {value}"
            for label, value in (
                ("lost", len(self.lost)),
                ("duplicated", self.duplicated),
                ("resurrected", len(self.resurrected)),
                ("unindexed", len(self.unindexed)),
                ("gave up", self.gave_up),
                ("rejected", sum(self.rejected.values())),
                ("HTTP 500", self.http_500),
                ("hung", self.hangs),
                ("503 without Retry-After", self.no_retry_after),
            )
            if value
        ]
        if self.drain_seconds is None:
            found.append("backlog not drained")
        return found + self.exits + self.errors


class DrillSession:
    """One namespace and one fleet of services, on which drills run one after the other."""

    def __init__(self, settings: Settings, fleet: Fleet, config: DrillConfig) -> None:
        self.settings = settings
        self.fleet = fleet
        self.config = config
        self.ctx = StackContext(settings=StackSettings(), repo_root=REPO_ROOT)
        self.admin_headers = {
            "Authorization": f"Bearer {mint_token(settings.auth, 'drill-ops', roles=(ADMIN_ROLE,))}"
        }

    def fault(self, name: str) -> Fault:
        if name in SERVICE_DRILLS:
            return KillService(self.fleet, SERVICE_DRILLS[name])
        for drills, mode in ((SERVER_DRILLS, self.config.server_mode), (HANG_DRILLS, "hang")):
            if name in drills:
                [server] = runner.build(self.ctx, [drills[name]])
                return ServerOutage(server, mode)
        raise ValueError(f"unknown drill {name!r}; known: {', '.join(ALL_DRILLS)}")

    def run(self, name: str, log: Callable[[str], None] = print) -> DrillResult:
        fault = self.fault(name)
        cfg = self.config
        result = DrillResult(name)
        self.fleet.exits.clear()
        self.fleet.wait_ready(list(self.fleet.service))
        tag = f"{name.replace('-', '')}{secrets.token_hex(2)}"
        chats, tokens = self._chats(tag)
        load = SteadyLoad(
            self.fleet.gateway_urls,
            chats,
            tokens,
            tag,
            cfg.rate,
            cfg.request_timeout,
            give_up_after=cfg.drain_timeout,
        )
        reader_token = mint_token(self.settings.auth, READER_USER)
        verifier = Verifier(self.settings, self.fleet.urls["reader"], reader_token)
        deleted: list[Deleted] = []
        deleted_ids: set[str] = set()
        injected = restored = False
        try:
            load.start()
            time.sleep(cfg.before_seconds)
            self._delete_recent(load, verifier, deleted, deleted_ids, result)
            log(f"{name}: fault ({fault.target}), {cfg.outage_seconds:.0f} s outage")
            down_at = time.monotonic()
            fault.inject()
            injected = True
            time.sleep(cfg.outage_seconds)
            back_from = time.monotonic()
            fault.restore()
            restored = True
            back_at = time.monotonic()
            result.restart_seconds = back_at - back_from
            log(f"{name}: {fault.target} back after {result.restart_seconds:.1f} s start-up")
            backlog = [m for m in load.snapshot() if m.first_sent < back_at]
            drain: dict[str, float | None] = {}
            # Its own verifier (own connections): it polls while this thread deletes messages.
            drain_verifier = Verifier(self.settings, self.fleet.urls["reader"], reader_token)
            drain_thread = threading.Thread(
                target=lambda: drain.update(
                    seconds=drain_verifier.wait_processed(
                        backlog, deleted_ids, back_at, cfg.after_seconds + cfg.drain_timeout
                    )[0]
                ),
                daemon=True,
            )
            drain_thread.start()
            time.sleep(cfg.after_seconds / 2)
            self._delete_recent(load, verifier, deleted, deleted_ids, result)
            time.sleep(cfg.after_seconds / 2)
            load.stop()
            drain_thread.join()
            drain_verifier.close()
            result.drain_seconds = drain.get("seconds")
            # Settle: everything acknowledged written and searchable (redeliveries included:
            # a partition is processed in order), then the verdict.
            posted = load.snapshot()
            # After a backlog that never drained, a short last wait: it is not going to.
            settle = cfg.drain_timeout if result.drain_seconds is not None else 30.0
            verifier.wait_processed(posted, deleted_ids, time.monotonic(), settle)
            self._account(result, posted, down_at, back_at, verifier.verdict(posted, deleted))
        except Exception as exc:  # noqa: BLE001 - a failed step is part of the drill's report
            result.errors.append(f"drill step failed: {type(exc).__name__}: {exc}"[:300])
            load.stop()
        finally:
            verifier.close()
            if injected and not restored:
                try:
                    fault.restore()
                except Exception as exc:  # noqa: BLE001 - reported, and the stack check follows
                    result.errors.append(f"restore failed: {type(exc).__name__}: {exc}"[:300])
            result.exits.extend(self.fleet.check_exits())
            result.errors.extend(self._stack_answering())
        result.deleted = len(deleted)
        return result

    def _chats(self, tag: str) -> tuple[list[str], list[str]]:
        """One chat per client (owner = the client's user, plus the reader user)."""
        chats, tokens = [], []
        for n in range(self.config.clients):
            token = mint_token(self.settings.auth, f"drill-{tag}-c{n}")
            response = httpx.post(
                f"{self.fleet.gateway_urls[n % 2]}/v1/chats",
                json={"participants": [READER_USER]},
                headers={"Authorization": f"Bearer {token}"},
                timeout=30,
            )
            response.raise_for_status()
            chats.append(str(response.json()["chat_id"]))
            tokens.append(token)
        return chats, tokens

    def _delete_recent(
        self,
        load: SteadyLoad,
        verifier: Verifier,
        deleted: list[Deleted],
        deleted_ids: set[str],
        result: DrillResult,
    ) -> None:
        """Delete, through the admin API, the newest acknowledged messages that are already
        written and indexed (their offsets are the likeliest to be redelivered after a crash)."""
        candidates = [
            m for m in reversed(load.snapshot()) if m.message_id and m.message_id not in deleted_ids
        ]
        picked = verifier.in_place(candidates[: self.config.deletions * 30])
        for message in picked[: self.config.deletions]:
            url = (
                f"{self.fleet.urls['admin']}/v1/chats/{message.chat_id}"
                f"/messages/{message.message_id}"
            )
            try:
                response = retrying(
                    lambda: httpx.delete(url, headers=self.admin_headers, timeout=30)  # noqa: B023
                )
            except httpx.HTTPError as exc:
                result.errors.append(f"delete {message.message_id}: {type(exc).__name__}")
                continue
            if response.status_code != 200:
                result.errors.append(f"delete {message.message_id}: HTTP {response.status_code}")
                continue
            deleted.append(Deleted(message.chat_id, str(message.message_id), message.token))
            deleted_ids.add(str(message.message_id))

    def _account(
        self,
        result: DrillResult,
        posted: list[Posted],
        down_at: float,
        back_at: float,
        verdict: Verdict,
    ) -> None:
        deadline = self.config.request_timeout
        result.acknowledged = sum(1 for m in posted if m.message_id is not None)
        result.gave_up = sum(1 for m in posted if m.gave_up)
        result.rejected = Counter(m.rejected for m in posted if m.rejected is not None)
        for attempt in (a for m in posted for a in m.attempts):
            if down_at <= attempt.sent_at < back_at:
                result.answers_down[attempt.outcome] += 1
                result.max_seconds_down = max(result.max_seconds_down, attempt.seconds)
            result.http_500 += attempt.outcome == "500"
            result.hangs += attempt.outcome == TIMEOUT or (
                attempt.seconds > deadline and attempt.outcome != CONNECTION_ERROR
            )
            result.no_retry_after += attempt.outcome == "503" and not attempt.retry_after
        result.lost = verdict.lost
        result.unindexed = verdict.unindexed
        result.duplicated = verdict.duplicated
        result.resurrected = verdict.resurrected
        result.stored_unacked = verdict.stored_unacked

    def _stack_answering(self) -> list[str]:
        """Every server of the stack answers again; one that does not is started (and named)."""
        problems = []
        for status in runner.status(runner.build(self.ctx)):
            if not status.answering:
                problems.append(f"{status.name} not answering after the drill: {status.detail}")
                runner.up(runner.build(self.ctx, [status.name]), report=lambda _: None)
        return problems


@contextmanager
def drill_session(
    config: DrillConfig, settings: Settings | None = None, logs: Path | None = None
) -> Iterator[DrillSession]:
    """A fresh namespace, migrated, with the six services running; all removed afterwards."""
    run_id = secrets.token_hex(3)
    cfg = isolated(settings or Settings(), run_id, prefix="drill")
    migrate_all(cfg)
    fleet = Fleet(
        cfg, (_free_port(), _free_port()), logs or StackSettings().dir / "drills" / run_id
    )
    try:
        fleet.start_all()
        yield DrillSession(cfg, fleet, config)
    finally:
        fleet.stop_all()
        drop_namespace(cfg)


def run(
    names: list[str], config: DrillConfig, log: Callable[[str], None] = print
) -> list[DrillResult]:
    unknown = [n for n in names if n not in ALL_DRILLS]
    if unknown:
        raise ValueError(f"unknown drill(s) {', '.join(unknown)}; known: {', '.join(ALL_DRILLS)}")
    results = []
    with drill_session(config) as session:
        log(f"services up; logs in {session.fleet.logs}")
        for name in names:
            results.append(session.run(name, log))
            log(f"{name}: {', '.join(results[-1].failures) or 'passed'}")
    return results


__all__ = ["ALL_DRILLS", "DEFAULT_DRILLS", "SERVER_MODES", "DrillConfig", "DrillResult", "run"]
