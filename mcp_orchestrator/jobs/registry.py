"""Jobs: start, find, cancel and expire long calls, bounded in count and memory.

Why a registry of its own rather than the ledger: a job outlives the tool call that
started it and may hold many pipeline requests (a batch); its ended result must stay
fetchable for `[tasks] ttl_s`, and then its id must say "expired" rather than "unknown".
Every job runs in this registry's task group, so the orchestrator owns it and stops it.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import anyio
from anyio.abc import TaskGroup
from prometheus_client.core import Metric
from pydantic import BaseModel

from mcp_orchestrator.config import TasksSection
from mcp_orchestrator.errors import JobExpired, JobNotFound, PipelineNotRunning, TooManyJobs
from mcp_orchestrator.jobs.job import Job, JobFailure, JobMirror, JobRecord, JobState, MirrorUnavailable
from mcp_orchestrator.metrics import gauge
from mcp_orchestrator.models import JobsStatus
from mcp_orchestrator.resilience.retry import loop_clock

log = logging.getLogger(__name__)

RESULT_OVERHEAD_BYTES = 512
"""What a kept job costs besides its result's JSON (the Job and its bookkeeping), about."""
RUNNING_RECORD_TTL_S = 86_400.0
"""How long the shared record of a job still running lives without news (its end rewrites it)."""
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
        """Ended jobs still kept, oldest end first (the order they expire in)."""
        self._gone: OrderedDict[str, tuple[str, str]] = OrderedDict()
        """Dropped job id -> (owner, why)."""
        self._running: Counter[str] = Counter()
        """Running jobs per owner."""
        self.kept_bytes = 0
        self.started = 0
        self.expired = 0
        self._task_group: TaskGroup | None = None
        self._mirror: JobMirror | None = None
        self._decode: Callable[[dict[str, Any]], Any] = dict

    def share(self, mirror: JobMirror, decode_result: Callable[[dict[str, Any]], Any]) -> None:
        """Publish every job to `mirror`, so other processes find it (and cancels reach it);
        `decode_result` turns a published result back into what the job returned."""
        self._mirror, self._decode = mirror, decode_result
        mirror.cancel_local = self._cancel_from_elsewhere

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
        self._running[owner] += 1
        self.started += 1
        self._task_group.start_soon(self._run, job, work, name=f"job:{tool}:{job.id}")
        return job

    def get(self, owner: str, job_id: str) -> Job:
        """`owner`'s job `job_id`: JobNotFound for an id it never had (or another caller's),
        JobExpired for one dropped after its time to live."""
        self._sweep()
        job = self._jobs.get(job_id)
        if job is not None and job.owner == owner:
            return job
        gone = self._gone.get(job_id)
        if gone is not None and gone[0] == owner:
            raise JobExpired(job_id, gone[1])
        raise JobNotFound(job_id)

    def cancel(self, owner: str, job_id: str) -> Job:
        """Ask `owner`'s job to stop (cooperative: a request it shares with another caller's
        keeps running for that one). Ending it is the job's own task's business."""
        job = self.get(owner, job_id)
        if not job.ended:
            job.cancel_requested = True
            job.touch()
            job.scope.cancel()
        return job

    async def announce(self, job: Job) -> None:
        """Make `job` findable from every process before its id is handed out (a task's
        handle must resolve wherever the client polls). Bounded by the shared store's timeout;
        if it does not answer, the job is still found on this process."""
        if self._mirror is not None:
            await self._publish(job)

    async def find(self, owner: str, job_id: str) -> Job:
        """Like `get`, and also a job another process runs (a copy of its record), when shared."""
        try:
            return self.get(owner, job_id)
        except JobNotFound:
            if self._mirror is None:
                raise
            try:
                record = await self._mirror.get(job_id)
            except MirrorUnavailable:
                raise JobNotFound(job_id) from None
            if record is None or record.owner != self._mirror.owner_digest(owner):
                raise
            return self._copy_of(record, owner)

    async def cancel_anywhere(self, owner: str, job_id: str) -> Job:
        """`cancel`, or ask the process that runs the job to cancel it (when shared)."""
        try:
            return self.cancel(owner, job_id)
        except JobNotFound:
            job = await self.find(owner, job_id)
            if not job.ended and self._mirror is not None:
                try:
                    await self._mirror.ask_cancel(job_id, self._mirror.owner_digest(owner))
                    job.cancel_requested = True
                except MirrorUnavailable:
                    pass  # the status it returns still says "working": the caller may try again
            return job

    def forget(self, job: Job) -> None:
        """Drop an ended job nobody was told about (a task answered inline)."""
        if job.ended and self._ended.pop(job.id, None) is not None:
            del self._jobs[job.id]
            self.kept_bytes -= job.size

    async def wait(self, job: Job, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for `job` to end; whether it has."""
        with anyio.move_on_after(timeout_s):
            await job.done.wait()
        return job.done.is_set()

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
        job.touch()
        self._running[job.owner] -= 1
        if self._running[job.owner] <= 0:
            del self._running[job.owner]
        job.size = result_size(result)
        self._ended[job.id] = job
        self.kept_bytes += job.size
        self._trim()
        job.done.set()
        if self._mirror is not None and self._task_group is not None:
            self._task_group.start_soon(self._publish, job)

    # ------------------------------------------------------------------ bounds

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
        while self.kept_bytes > self.settings.max_kept_bytes and len(self._ended) > 1:
            oldest = next(iter(self._ended.values()))
            self._drop(oldest, "dropped early to keep finished results within [tasks] max_kept_bytes")

    def _drop(self, job: Job, why: str) -> None:
        del self._ended[job.id]
        del self._jobs[job.id]
        self.kept_bytes -= job.size
        self.expired += 1
        self._gone[job.id] = (job.owner, why)
        while len(self._gone) > GONE_REMEMBERED:
            self._gone.popitem(last=False)

    # ------------------------------------------------------------------ sharing

    async def _publish(self, job: Job) -> None:
        assert self._mirror is not None
        ttl_s = self.settings.ttl_s if job.ended else RUNNING_RECORD_TTL_S
        result = (
            job.result.model_dump(by_alias=True, mode="json", exclude_none=True)
            if isinstance(job.result, BaseModel)
            else None
        )
        failure = {"code": job.failure.code, "message": job.failure.message} if job.failure else None
        record = JobRecord(
            id=job.id,
            owner=self._mirror.owner_digest(job.owner),
            tool=job.tool,
            kind=job.kind,
            state=job.state.value,
            message="working" if not job.ended else job.state.value,
            created_at=job.created_at,
            updated_at=job.updated_at,
            node=self._mirror.node,
            result=result,
            failure=failure,
        )
        try:
            await self._mirror.put(record, ttl_s)
        except MirrorUnavailable:
            pass  # the link logged it; this process still answers for the job

    def _copy_of(self, record: JobRecord, owner: str) -> Job:
        """A job another process runs, as its record says (it runs nothing here)."""
        copy = Job(record.id, owner, record.tool, record.kind, record.created_at, record.updated_at)
        copy.state = JobState(record.state)
        copy.result = self._decode(record.result) if record.result is not None else None
        copy.failure = JobFailure(**record.failure) if record.failure is not None else None
        copy.elsewhere = f"{record.message} on {record.node}"
        if copy.ended:
            copy.done.set()
        return copy

    def _cancel_from_elsewhere(self, job_id: str, owner_digest: str) -> None:
        job = self._jobs.get(job_id)
        if job is None or job.ended or self._mirror is None:
            return
        if self._mirror.owner_digest(job.owner) == owner_digest:  # only its owner may cancel it
            job.cancel_requested = True
            job.touch()
            job.scope.cancel()

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
