"""Jobs that every process sharing a store (Redis: distributed/jobs.py) can find.

A job runs in the process that started it; its record (state, then its result) is
published when its id is handed out and again when it ends, so a poll that lands on another
process (behind `--workers N` the kernel picks the process) is answered from the record,
a wait there follows the record, and a cancel there is passed to the process that runs it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
from pydantic import BaseModel

from mcp_orchestrator.config import TasksSection
from mcp_orchestrator.errors import JobNotFound
from mcp_orchestrator.jobs.job import Job, JobFailure, JobMirror, JobRecord, JobState, MirrorUnavailable
from mcp_orchestrator.jobs.registry import Jobs

RUNNING_RECORD_TTL_S = 86_400.0
"""How long the record of a job still running lives without news (its end rewrites it)."""
REMOTE_POLL_S = 0.25
"""How often a wait for a job another process runs reads its record."""


class MirroredJobs(Jobs):
    def __init__(
        self, settings: TasksSection, mirror: JobMirror, decode_result: Callable[[dict[str, Any]], Any]
    ) -> None:
        super().__init__(settings)
        self._mirror = mirror
        self._decode = decode_result
        """Turns a published result back into what the job returned (a CallToolResult)."""
        mirror.cancel_local = self._cancel_from_elsewhere

    async def hand_out(self, job: Job) -> None:
        """Publish `job` before its id is given out (a task's handle must resolve wherever the
        client polls). Bounded by the store's timeout; unreachable, the job is still found here."""
        await super().hand_out(job)
        await self._publish(job)

    def ended(self, job: Job) -> None:
        if job.handed_out:
            self.spawn(self._publish, job)

    async def find(self, owner: str, job_id: str) -> Job:
        try:
            return self.get(owner, job_id)
        except JobNotFound:
            record = await self._record(job_id)
            if record is None or record.owner != self._mirror.owner_digest(owner):
                raise
            return self._copy_of(record, owner)

    async def cancel(self, owner: str, job_id: str) -> Job:
        try:
            return await super().cancel(owner, job_id)
        except JobNotFound:
            job = await self.find(owner, job_id)
            if not job.ended:
                try:
                    await self._mirror.ask_cancel(job_id, self._mirror.owner_digest(owner))
                    job.cancel_requested = True
                except MirrorUnavailable:
                    pass  # its status still says "working": the caller may try again
            return job

    async def wait(self, job: Job, timeout_s: float) -> bool:
        if job.elsewhere is None:
            return await super().wait(job, timeout_s)
        with anyio.move_on_after(timeout_s):  # another process runs it: follow its record
            while not job.ended:
                await anyio.sleep(REMOTE_POLL_S)
                record = await self._record(job.id)
                if record is not None and record.state != JobState.working.value:
                    self._update(job, record)
        return job.ended

    # ------------------------------------------------------------------ records

    async def _publish(self, job: Job) -> None:
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
            created_at=job.created_at,
            updated_at=job.updated_at,
            node=self._mirror.node,
            result=result,
            failure=failure,
        )
        ttl_s = self.settings.ttl_s if job.ended else RUNNING_RECORD_TTL_S
        try:
            await self._mirror.put(record, ttl_s)
        except MirrorUnavailable:
            pass  # the link logged it; this process still answers for the job

    async def _record(self, job_id: str) -> JobRecord | None:
        try:
            return await self._mirror.get(job_id)
        except MirrorUnavailable:
            return None

    def _copy_of(self, record: JobRecord, owner: str) -> Job:
        """A job another process runs, as its record says (it runs nothing here)."""
        copy = Job(record.id, owner, record.tool, record.kind, record.created_at, record.updated_at)
        copy.handed_out = True
        copy.elsewhere = f"{record.state} on {record.node}"
        self._update(copy, record)
        return copy

    def _update(self, copy: Job, record: JobRecord) -> None:
        copy.state = JobState(record.state)
        copy.updated_at = record.updated_at
        copy.result = self._decode(record.result) if record.result is not None else None
        copy.failure = JobFailure(**record.failure) if record.failure is not None else None
        if copy.ended:
            copy.elsewhere = None  # nothing runs any more: show it like a local one
            copy.done.set()

    def _cancel_from_elsewhere(self, job_id: str, owner_digest: str) -> None:
        """A cancel asked on another process; only the job's owner may ask."""
        job = self._jobs.get(job_id)
        if job is not None and self._mirror.owner_digest(job.owner) == owner_digest:
            self.stop(job)
