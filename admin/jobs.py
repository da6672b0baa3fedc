"""Long key-lifecycle jobs (rotations, rewrap, re-encryption, retention) run in the background.

A job runs in one of a few worker threads of the admin process; its progress and result are kept
in memory and read with `GET /v1/jobs/{id}`. The jobs themselves are idempotent and resumable, so
a job lost with its process (restart, crash) is finished by starting it again.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from sealstream.errors import SealstreamError

log = logging.getLogger(__name__)

JobState = Literal["queued", "running", "succeeded", "failed"]
# A job body gets a function to report progress (any JSON-able counters) and returns its result.
JobBody = Callable[[Callable[..., None]], dict[str, Any]]


@dataclass
class Job:
    job_id: str
    kind: str
    requested_by: str
    state: JobState = "queued"
    progress: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] | None = None
    error: str | None = None
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    finished_at: datetime | None = None


class JobRunner:
    def __init__(self, workers: int = 2, keep: int = 1000) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="admin-job")
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._keep = keep

    def submit(self, kind: str, requested_by: str, body: JobBody) -> Job:
        job = Job(job_id=uuid.uuid4().hex, kind=kind, requested_by=requested_by)
        with self._lock:
            self._jobs[job.job_id] = job
            while len(self._jobs) > self._keep:  # forget the oldest finished jobs
                oldest = next((j for j in self._jobs.values() if j.finished_at is not None), None)
                if oldest is None:
                    break
                del self._jobs[oldest.job_id]
        self._pool.submit(self._run, job, body)
        return job

    def _run(self, job: Job, body: JobBody) -> None:
        job.state = "running"

        def progress(**counters: Any) -> None:
            job.progress = counters

        try:
            job.result = body(progress)
            job.state = "succeeded"
        except SealstreamError as exc:
            job.error, job.state = str(exc), "failed"  # our messages carry no secrets
        except Exception as exc:  # noqa: BLE001 - reported on the job, not raised into the pool
            job.error, job.state = f"internal error ({type(exc).__name__})", "failed"
            # The type only: a driver's message may quote the values it was given.
            log.error(
                "admin job failed",
                extra={"job": job.job_id, "kind": job.kind, "error": type(exc).__name__},
            )
        finally:
            job.finished_at = datetime.now(UTC)
            log.info("admin job finished", extra={"job": job.job_id, "state": job.state})

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def all(self) -> list[Job]:
        with self._lock:
            return sorted(self._jobs.values(), key=lambda j: j.created_at, reverse=True)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
