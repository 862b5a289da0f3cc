"""Jobs: start, find, cancel and expire long calls, bounded in count and memory.

Why a registry of its own rather than the ledger: a job outlives the tool call that
started it and may hold many pipeline requests (a batch); its ended result must stay
fetchable for `[tasks] ttl_s`, and then its id must say "expired" rather than "unknown".
Every job runs in this registry's task group, so the orchestrator owns it and stops it.

A job's result is kept only once its id has been handed out (`hand_out`): a task answered
inline, whose id nobody saw, costs nothing after it ends. mirror.py adds the copies other
processes see.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any

import anyio
from anyio.abc import TaskGroup
from prometheus_client.core import Metric
from pydantic import BaseModel

from mcp_orchestrator.config import TasksSection
from mcp_orchestrator.errors import JobExpired, JobNotFound, PipelineNotRunning, TooManyJobs
from mcp_orchestrator.jobs.job import Job, JobFailure, JobState
from mcp_orchestrator.metrics import gauge
from mcp_orchestrator.models import JobsStatus
from mcp_orchestrator.resilience.retry import loop_clock

log = logging.getLogger(__name__)

RESULT_OVERHEAD_BYTES = 512
"""What a kept job costs besides its result's JSON (the Job and its bookkeeping), about."""
GONE_REMEMBERED = 10_000
"""Ids of dropped jobs remembered, so a late poll hears "expired" rather than "unknown"."""
INTERNAL_ERROR = -32603

Work = Callable[[Job], Awaitable[Any]]
"""A job's work: returns its result, raises JobFailure for a protocol-level error."""


class Jobs:
    def __init__(self, settings: TasksSection) -> None:
        self.settings = settings
        self._clock: Callable[[], float] = anyio.current_time
        """The event loop's clock (a reader bound to the running loop once started)."""
        self._jobs: dict[str, Job] = {}
        self._ended: OrderedDict[str, Job] = OrderedDict()
        """Ended jobs whose results are kept, oldest end first (the order they expire in)."""
        self._gone: OrderedDict[str, tuple[str, str]] = OrderedDict()
        """Dropped job id -> (owner, why)."""
        self._running: Counter[str] = Counter()
        """Running jobs per owner."""
        self._idle = anyio.Event()
        self._idle.set()
        self.kept_bytes = 0
        self.started = 0
        self.expired = 0
        self._task_group: TaskGroup | None = None

    async def __aenter__(self) -> Jobs:
        self._clock = loop_clock()  # readable from any thread, as status() may be (a metrics scrape)
        self._task_group = await anyio.create_task_group().__aenter__()
        return self

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        group, self._task_group = self._task_group, None
        assert group is not None
        group.cancel_scope.cancel()  # the pipeline is stopping: the jobs' requests end as cancelled
        return await group.__aexit__(*exc_info)

    # ------------------------------------------------------------------ a caller's side

    def start(self, owner: str, tool: str, kind: str, work: Work) -> Job:
        """Run `work` as a new job of `owner`'s. TooManyJobs over a bound; PipelineNotRunning when stopped."""
        if self._task_group is None:
            raise PipelineNotRunning()
        self._sweep()
        settings = self.settings
        if sum(self._running.values()) >= settings.max_open:
            raise TooManyJobs("tasks.max_open", settings.max_open, "on this server")
        if self._running[owner] >= settings.max_open_per_caller:
            raise TooManyJobs("tasks.max_open_per_caller", settings.max_open_per_caller, "for this caller")
        job = Job(str(uuid.uuid4()), owner, tool, kind)
        self._jobs[job.id] = job
        if not self._running:
            self._idle = anyio.Event()
        self._running[owner] += 1
        self._task_group.start_soon(self._run, job, work, name=f"job:{tool}:{job.id}")
        return job

    async def hand_out(self, job: Job) -> None:
        """`job`'s id is about to be given to its caller: from now on its result is kept
        (async so that a registry shared with other processes can publish it first)."""
        job.handed_out = True
        self.started += 1
        if job.ended and job.id not in self._ended:
            self._keep(job)

    def get(self, owner: str, job_id: str) -> Job:
        """`owner`'s job `job_id`: JobNotFound for an id it never had (or another caller's),
        JobExpired for one dropped after its time to live."""
        self._sweep()
        job = self._jobs.get(job_id)
        if job is not None and job.owner == owner and job.handed_out:
            return job
        gone = self._gone.get(job_id)
        if gone is not None and gone[0] == owner:
            raise JobExpired(job_id, gone[1])
        raise JobNotFound(job_id)

    async def find(self, owner: str, job_id: str) -> Job:
        """`get` (a shared registry also finds the jobs other processes run)."""
        return self.get(owner, job_id)

    async def cancel(self, owner: str, job_id: str) -> Job:
        """Ask `owner`'s job to stop (cooperative: a request it shares with another caller's
        keeps running for that one). Ending it is the job's own task's business."""
        job = self.get(owner, job_id)
        self.stop(job)
        return job

    def stop(self, job: Job) -> None:
        """Cancel a running job's work (its requests end as cancelled)."""
        if not job.ended:
            job.cancel_requested = True
            job.touch()
            job.scope.cancel()

    def forget(self, job: Job) -> None:
        """Drop an ended job nobody was told about (a task answered inline)."""
        if job.ended and not job.handed_out:
            self._jobs.pop(job.id, None)

    async def wait(self, job: Job, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for `job` to end; whether it has."""
        with anyio.move_on_after(timeout_s):
            await job.done.wait()
        return job.done.is_set()

    async def idle(self) -> None:
        """Return once no job runs (a drain waits for them within its grace)."""
        while self._running:
            await self._idle.wait()

    @property
    def running(self) -> int:
        return sum(self._running.values())

    def status(self) -> JobsStatus:
        if self._task_group is not None:  # the clock is the event loop's: none before it runs
            self._sweep()
        running = Counter(job.kind for job in self._jobs.values() if not job.ended)
        # created_at is wall time (it is shown to clients), so the age is too.
        oldest = min((job.created_at for job in self._jobs.values() if not job.ended), default=None)
        return JobsStatus(
            running_tasks=running["task"],
            running_background=running["background"],
            oldest_running_s=0.0 if oldest is None else round(max(0.0, time.time() - oldest), 3),
            kept=len(self._ended),
            kept_bytes=self.kept_bytes,
            max_kept_bytes=self.settings.max_kept_bytes,
            started=self.started,
            expired=self.expired,
            ttl_s=self.settings.ttl_s,
        )

    # ------------------------------------------------------------------ the job's own side

    async def _run(self, job: Job, work: Work) -> None:
        try:
            with job.scope:
                try:
                    result = await work(job)
                except JobFailure as protocol_error:
                    self._end(job, JobState.failed, failure=protocol_error)
                except Exception:
                    log.exception("%s %s (%s) failed", job.kind, job.id, job.tool)
                    internal = JobFailure(INTERNAL_ERROR, f"internal error in {job.tool}; see the server log")
                    self._end(job, JobState.failed, failure=internal)
                else:
                    self._end(job, JobState.completed, result=result)
        finally:
            if not job.ended:  # cancelled: by its caller, or the registry is stopping
                self._end(job, JobState.cancelled)

    def _end(self, job: Job, state: JobState, result: Any = None, failure: JobFailure | None = None) -> None:
        job.state, job.result, job.failure = state, result, failure
        job.ended_at = self._clock()
        job.requests = []  # the ended requests hold prompts and answers: only the result is kept
        job.touch()
        self._running[job.owner] -= 1
        if self._running[job.owner] <= 0:
            del self._running[job.owner]
        if not self._running:
            self._idle.set()
        if job.handed_out:
            self._keep(job)
        job.done.set()
        self.ended(job)

    def ended(self, job: Job) -> None:
        """A job ended (a shared registry publishes it)."""

    def spawn(self, work: Callable[..., Coroutine[Any, Any, None]], *args: Any) -> None:
        """Run `work` in the registry's task group (dropped once it stops)."""
        if self._task_group is not None:
            self._task_group.start_soon(work, *args)

    # ------------------------------------------------------------------ bounds

    def _keep(self, job: Job) -> None:
        job.size = result_size(job.result)
        if job.size > self.settings.max_kept_bytes:
            self._dropped(job, f"its result ({job.size} bytes) is larger than [tasks] max_kept_bytes")
            return
        self._ended[job.id] = job
        self.kept_bytes += job.size
        self._trim()

    def _sweep(self) -> None:
        """Drop the ended jobs whose time to live has run out."""
        deadline = self._clock() - self.settings.ttl_s
        while self._ended:
            oldest = next(iter(self._ended.values()))
            if oldest.ended_at is None or oldest.ended_at > deadline:
                break
            self._drop(oldest, f"results are kept {self.settings.ttl_s:g} s after the work ends ([tasks] ttl_s)")

    def _trim(self) -> None:
        """Keep the ended results within [tasks] max_kept_bytes: the oldest ended go first."""
        while self.kept_bytes > self.settings.max_kept_bytes and self._ended:
            oldest = next(iter(self._ended.values()))
            self._drop(oldest, "dropped early to keep finished results within [tasks] max_kept_bytes")

    def _drop(self, job: Job, why: str) -> None:
        del self._ended[job.id]
        self.kept_bytes -= job.size
        self._dropped(job, why)

    def _dropped(self, job: Job, why: str) -> None:
        self._jobs.pop(job.id, None)
        self.expired += 1
        self._gone[job.id] = (job.owner, why)
        while len(self._gone) > GONE_REMEMBERED:
            self._gone.popitem(last=False)

    # ------------------------------------------------------------------ metrics

    def live_metrics(self) -> Iterable[Metric]:
        shown = self.status()
        yield gauge(
            "orchestrator_jobs_running",
            "Tasks and background requests running, by kind.",
            ["kind"],
            [(["task"], shown.running_tasks), (["background"], shown.running_background)],
        )
        yield gauge(
            "orchestrator_jobs_oldest_running_seconds",
            "Age of the oldest task or background request still running.",
            [],
            [([], shown.oldest_running_s)],
        )
        yield gauge(
            "orchestrator_jobs_kept", "Ended tasks and background requests still fetchable.", [], [([], shown.kept)]
        )
        yield gauge(
            "orchestrator_jobs_kept_bytes",
            "Memory held by the kept results (bytes, about).",
            [],
            [([], shown.kept_bytes)],
        )


def result_size(result: Any) -> int:
    """Bytes a kept result costs, about: its JSON plus the bookkeeping."""
    if isinstance(result, BaseModel):
        return len(result.model_dump_json()) + RESULT_OVERHEAD_BYTES
    return RESULT_OVERHEAD_BYTES
