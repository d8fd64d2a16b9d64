"""QEMU's job framework (job.c, qapi/job.json): states, verbs, manual dismiss, progress.

A job runs its work function on its own thread, so the monitor keeps answering while it runs
(QEMU 7.2 does not: its snapshot jobs run in the main loop).  A work function that is a
generator runs its first step as QEMU runs a snapshot job's bottom half: on the thread that
dispatched the command, before the reply goes out (no thread to wake between the command and
the job's start); the steps after its first ``yield`` go on a thread of their own.  A later
step that yields an object with a ``complete()`` method makes the job *ready*
(job_transition_to_ready(), as a mirror job in sync) and ``job-complete`` calls it.  Every
transition emits JOB_STATUS_CHANGE; a failed job concludes with ``error`` in ``query-jobs``.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from emulator.errors import JobCancelled, SnaplabError
from emulator.workers import spawn


class JobStatus(Enum):
    UNDEFINED = "undefined"
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    READY = "ready"
    STANDBY = "standby"
    WAITING = "waiting"
    PENDING = "pending"
    ABORTING = "aborting"
    CONCLUDED = "concluded"
    NULL = "null"


class JobVerb(Enum):
    """What a client asks of a job (qapi/job.json JobVerb); the values are QEMU's names."""

    CANCEL = "cancel"
    PAUSE = "pause"
    RESUME = "resume"
    SET_SPEED = "set-speed"
    COMPLETE = "complete"
    FINALIZE = "finalize"
    DISMISS = "dismiss"
    CHANGE = "change"


_S = list(JobStatus)
# job.c JobSTT: allowed transitions, rows = from, columns = to (U C R P Y S W D X E N)
_STT = {
    JobStatus.UNDEFINED: "01000000000",
    JobStatus.CREATED: "00100000101",
    JobStatus.RUNNING: "00011010100",
    JobStatus.PAUSED: "00100000000",
    JobStatus.READY: "00000110100",
    JobStatus.STANDBY: "00001000000",
    JobStatus.WAITING: "00000001100",
    JobStatus.PENDING: "00000000110",
    JobStatus.ABORTING: "00000000110",
    JobStatus.CONCLUDED: "00000000001",
    JobStatus.NULL: "00000000000",
}
# job.c JobVerbTable: in which states each verb is accepted (U C R P Y S W D X E N)
_VERBS = {
    JobVerb.CANCEL: "01111111000",
    JobVerb.PAUSE: "01111100000",
    JobVerb.RESUME: "01111100000",
    JobVerb.SET_SPEED: "01111100000",
    JobVerb.COMPLETE: "00001000000",
    JobVerb.FINALIZE: "00000001000",
    JobVerb.DISMISS: "00000000010",
    JobVerb.CHANGE: "01111100000",
}


def id_wellformed(ident: str) -> bool:
    """QEMU's id_wellformed(): a letter, then letters, digits, '-', '.', '_'."""
    if not ident or not ident[0].isascii() or not ident[0].isalpha():
        return False
    return all(c.isascii() and (c.isalnum() or c in "-._") for c in ident[1:])


@dataclass
class Job:
    id: str
    type: str
    work: Callable[[Job], Iterator[Any] | None]  # a generator: see the module's docstring
    status: JobStatus = JobStatus.CREATED
    current_progress: int = 0
    total_progress: int = 0
    error: str | None = None
    cancelled: bool = False
    result: dict[str, Any] = field(default_factory=dict)  # extra data a job reports (metrics)
    done: threading.Event = field(default_factory=threading.Event)
    completion: Any = None  # what job-complete calls .complete() on, while ready

    def info(self) -> dict[str, Any]:
        d: dict[str, Any] = {"current-progress": self.current_progress, "status": self.status.value,
                             "total-progress": self.total_progress, "type": self.type, "id": self.id}
        if self.error is not None:
            d["error"] = self.error
        return d


class JobManager:
    """The job list of one VM (QEMU's global job list)."""

    def __init__(self, emit: Callable[[str, dict[str, Any]], None],
                 bottom_half: Callable[[Callable[[], None]], Any] = spawn) -> None:
        self._emit = emit
        self._bottom_half = bottom_half
        self._jobs: dict[str, Job] = {}
        self._lock = threading.RLock()

    def _transition(self, job: Job, to: JobStatus) -> None:
        with self._lock:
            frm = job.status
            if _STT[frm][_S.index(to)] != "1" and frm != to:
                raise RuntimeError(f"job {job.id}: illegal transition {frm.value} -> {to.value}")
            job.status = to
        self._emit("JOB_STATUS_CHANGE", {"id": job.id, "status": to.value})

    def create(self, job_id: str, job_type: str, work: Callable[[Job], Iterator[Any] | None]) -> Job:
        """job_create() + job_start(): immediate errors for a bad or used id."""
        with self._lock:
            if not id_wellformed(job_id):
                raise SnaplabError(f"Invalid job ID '{job_id}'")
            if job_id in self._jobs:
                raise SnaplabError(f"Job ID '{job_id}' already in use")
            job = Job(job_id, job_type, work)
            self._jobs[job_id] = job
        self._emit("JOB_STATUS_CHANGE", {"id": job.id, "status": JobStatus.CREATED.value})
        self._transition(job, JobStatus.RUNNING)  # job_start(): running before the command returns
        if inspect.isgeneratorfunction(job.work):
            self._bottom_half(lambda: self._first_step(job))
        else:
            spawn(self._run, job)
        return job

    def _first_step(self, job: Job) -> None:
        """A generator job's first step, here; the rest on a worker."""
        steps: Iterator[Any] | None = None
        first_error: Exception | None = None
        try:
            if job.cancelled:
                raise JobCancelled("Operation canceled")
            steps = job.work(job)
            assert steps is not None
            next(steps)
        except StopIteration:
            steps = iter(())
        except Exception as err:  # concluded (with the error) on the worker, like any failure
            first_error = err
        spawn(self._run, job, steps, first_error)

    def _run(self, job: Job, steps: Iterator[Any] | None = None, first_error: Exception | None = None) -> None:
        try:
            if first_error is not None:
                raise first_error
            if steps is None:
                if job.cancelled:
                    raise JobCancelled("Operation canceled")
                job.total_progress = 1
                job.work(job)
            else:
                job.total_progress = 1
                for step in steps:  # started: it runs to its end (a cancel is reported after it)
                    if step is not None and job.status == JobStatus.RUNNING:
                        job.completion = step
                        self._transition(job, JobStatus.READY)
            job.current_progress = 1
            if job.cancelled:
                raise JobCancelled("Operation canceled")
            self._transition(job, JobStatus.WAITING)
            self._transition(job, JobStatus.PENDING)
            self._transition(job, JobStatus.CONCLUDED)
        except Exception as err:  # any failure, ours or a bug, concludes the job with an error
            job.current_progress = job.total_progress = 1
            job.error = str(err) if isinstance(err, SnaplabError) else f"internal error: {type(err).__name__}: {err}"
            if job.status != JobStatus.ABORTING:
                self._transition(job, JobStatus.ABORTING)
            self._transition(job, JobStatus.CONCLUDED)
        finally:
            job.done.set()

    def find(self, job_id: str) -> Job:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise SnaplabError("Job not found")
        return job

    def _verb(self, job: Job, verb: JobVerb) -> None:
        if _VERBS[verb][_S.index(job.status)] != "1":
            raise SnaplabError(f"Job '{job.id}' in state '{job.status.value}' cannot accept command verb "
                               f"'{verb.value}'")

    def dismiss(self, job_id: str) -> None:
        job = self.find(job_id)
        with self._lock:
            self._verb(job, JobVerb.DISMISS)
            self._jobs.pop(job_id, None)
        self._transition(job, JobStatus.NULL)

    def cancel(self, job_id: str) -> None:
        job = self.find(job_id)
        self._verb(job, JobVerb.CANCEL)
        job.cancelled = True
        if job.completion is not None:  # a ready load cannot be undone: it finishes, then reports the cancel
            job.completion.complete()

    def verb(self, job_id: str, verb: JobVerb) -> None:
        """pause/resume/finalize: snapshot jobs never reach the states that use them; complete:
        a ready job (an on-demand load) is told to finish."""
        job = self.find(job_id)
        self._verb(job, verb)
        if verb == JobVerb.COMPLETE and job.completion is not None:
            job.completion.complete()

    def query(self) -> list[dict[str, Any]]:
        with self._lock:
            return [j.info() for j in reversed(list(self._jobs.values()))]
