"""A bounded pool of jobs (segmentation, registration): queued, running, done, failed, timeout."""

from __future__ import annotations

import shutil
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from medseg.errors import MedsegError


class QueueFull(MedsegError):
    """More jobs are waiting than the pool accepts."""


@dataclass
class Job:
    """One job's state, as the status endpoint shows it."""

    id: str
    kind: str  # "upload", "pacs" or "register"
    source: str  # the uploaded file name or the study UID (never a server path)
    folder: Path
    status: str = "queued"  # queued | running | done | failed | timeout
    progress: float = 0.0
    message: str = ""
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    result: dict = field(default_factory=dict)

    def public(self) -> dict:
        """The JSON the API returns (no server paths)."""
        return {
            "id": self.id,
            "kind": self.kind,
            "source": self.source,
            "status": self.status,
            "progress": round(self.progress, 3),
            "message": self.message,
            "created": self.created,
            "started": self.started,
            "finished": self.finished,
            "seconds": round((self.finished or time.time()) - (self.started or self.created), 3),
            "result": {k: v for k, v in self.result.items() if not k.startswith("_")},
        }


class JobPool:
    """Runs jobs in ``workers`` threads; refuses new ones beyond ``max_pending`` waiting.

    A job that runs longer than ``timeout_s`` is reported as ``timeout`` and its result is
    discarded when it finishes (a thread cannot be killed; the worker moves on after it).
    Only the latest ``keep_finished`` finished jobs are kept (older ones and their folders
    are deleted), so memory and disk stay bounded however long the service runs.
    """

    def __init__(
        self,
        root: Path,
        *,
        workers: int = 1,
        max_pending: int = 16,
        timeout_s: float = 600,
        keep_finished: int = 256,
    ):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.workers, self.max_pending, self.timeout_s = workers, max_pending, timeout_s
        self.keep_finished = max(1, int(keep_finished))
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="medseg-job")
        self._lock = threading.Lock()
        self.jobs: dict[str, Job] = {}
        self.durations: deque[float] = deque(maxlen=1000)  # the latest done jobs' seconds
        self.done_count, self.done_seconds = 0, 0.0  # over the service's life
        self._finished: deque[str] = deque()

    def new_job(self, kind: str, source: str) -> Job:
        """Reserve an id and a folder (before the upload is stored in it)."""
        with self._lock:
            waiting = sum(j.status in ("queued", "running") for j in self.jobs.values())
            if waiting >= self.max_pending + self.workers:
                raise QueueFull(f"{waiting} jobs are waiting; try again later")
            job_id = uuid.uuid4().hex
            job = Job(id=job_id, kind=kind, source=source, folder=self.root / job_id)
            job.folder.mkdir(parents=True)
            self.jobs[job_id] = job
            return job

    def submit(self, job: Job, work: Callable[[Job], dict]) -> None:
        """Run ``work(job)`` (which sets ``job.progress`` and returns the result dict)."""
        self._executor.submit(self._run, job, work)

    def _run(self, job: Job, work: Callable[[Job], dict]) -> None:
        job.status, job.started = "running", time.time()
        try:
            result = work(job)
        except MedsegError as exc:
            self._finish(job, "failed", str(exc))
        except Exception as exc:  # noqa: BLE001 - a job's crash must not kill the worker
            self._finish(job, "failed", f"internal error: {type(exc).__name__}: {exc}")
        else:
            if self._expired(job):
                self._finish(job, "timeout", f"took longer than {self.timeout_s:g} s")
            else:
                job.result = result
                job.progress = 1.0
                self._finish(job, "done", "")

    def _expired(self, job: Job) -> bool:
        return job.started is not None and time.time() - job.started > self.timeout_s

    def _finish(self, job: Job, status: str, message: str) -> None:
        # Messages name files by their place in the job folder: no server paths to clients.
        message = message.replace(f"{job.folder}/", "").replace(str(job.folder), "")
        job.status, job.message, job.finished = status, message, time.time()
        if status == "done":
            seconds = job.finished - (job.started or job.created)
            self.durations.append(seconds)
            self.done_count += 1
            self.done_seconds += seconds
        with self._lock:
            self._finished.append(job.id)
            while len(self._finished) > self.keep_finished:
                old = self.jobs.pop(self._finished.popleft(), None)
                if old is not None:
                    shutil.rmtree(old.folder, ignore_errors=True)

    def get(self, job_id: str) -> Job | None:
        job = self.jobs.get(job_id)
        if job is not None and job.status == "running" and self._expired(job):
            job.status, job.message = "timeout", f"took longer than {self.timeout_s:g} s"
        return job

    def counts(self) -> dict[str, int]:
        out = {s: 0 for s in ("queued", "running", "done", "failed", "timeout")}
        for job in list(self.jobs.values()):
            out[job.status] = out.get(job.status, 0) + 1
        return out

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
