"""Long calls on the MCP surface: who owns a job, what its status says, running a tool's work as one.

Two ways in share everything here: the MCP tasks extension (server/tasks.py) and the
background tools (`infer(background=true)`, `request_status`, `cancel_request`) for hosts
without tasks. Either way the tool's own body runs in a job (jobs/), with `CURRENT_JOB`
set so it submits its pipeline requests on the job's behalf instead of streaming progress
to a call that has already returned.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any, Literal

from mcp.types import CallToolResult, TextContent
from pydantic import BaseModel

from mcp_orchestrator.errors import OrchestratorError
from mcp_orchestrator.jobs import Job, JobState
from mcp_orchestrator.models import StageName
from mcp_orchestrator.pipeline import Pipeline, Request

CURRENT_JOB: ContextVar[Job | None] = ContextVar("current_job", default=None)
"""The job a tool body runs for (unset: the body answers its own call)."""

MAX_STATUS_WAIT_MS = 50_000
"""Longest wait one request_status call makes: below the tool-call timeout of common hosts (~60 s)."""
CANCEL_SETTLE_S = 1.0
"""How long cancel_request waits for the work to stop before it answers (cancelling is cooperative)."""


Running = Literal["queued", "working"]


class JobView(BaseModel):
    """A task's or background request's state, as request_status and cancel_request show it."""

    request_id: str
    """Pass it to request_status or cancel_request."""
    tool: str
    status: Literal["queued", "working", "completed", "failed", "cancelled"]
    message: str
    stage: StageName | None = None
    position: int | None = None
    """Place in the inference queue (1 = next), while it waits there."""
    tokens_streamed: int = 0
    items_done: int | None = None
    items_total: int | None = None
    age_s: float
    poll_after_ms: int | None = None
    """Suggested wait before asking again (while it runs)."""
    result: dict[str, Any] | None = None
    """The finished call's structured result (what the call would have returned inline)."""
    error: str | None = None


def whereabouts(job: Job, pipeline: Pipeline) -> tuple[Running, StageName | None, int | None, int]:
    """(status, stage, queue position, chunks streamed) of a running job."""
    live = [request for request in job.requests if not request.ended]
    if not job.requests:
        return "queued", None, None, 0
    if not live:
        return "working", None, None, 0
    places = [pipeline.locate(request) for request in live]
    chunks = sum(place.chunks for place in places)
    if len(places) == 1:
        place = places[0]
        return ("queued" if place.position is not None else "working"), place.stage, place.position, chunks
    return "working", None, None, chunks


def describe(job: Job, pipeline: Pipeline) -> str:
    """One line on where the work is (statusMessage, progress heartbeats)."""
    if job.state is JobState.completed:
        return "completed"
    if job.state is JobState.failed:
        return f"failed: {job.failure}"
    if job.state is JobState.cancelled:
        return "cancelled"
    if job.elsewhere is not None:
        return job.elsewhere + ("; cancelling" if job.cancel_requested else "")
    status, stage, position, chunks = whereabouts(job, pipeline)
    parts = []
    if job.items_total:
        running = sum(1 for request in job.requests if not request.ended)
        parts.append(f"{job.items_done}/{job.items_total} items done, {running} running")
    elif stage is not None and position is not None:
        parts.append(f"queued for inference, position {position}")
    elif stage is not None:
        parts.append(f"in the {stage.value} stage")
    else:
        parts.append("starting" if status == "queued" else "working")
    if chunks:
        parts.append(f"{chunks} tokens streamed")
    if job.cancel_requested:
        parts.append("cancelling")
    return "; ".join(parts)


def describe_request(request: Request, pipeline: Pipeline) -> str:
    """One line on where one request is (the heartbeat of a call that waits for its answer)."""
    place = pipeline.locate(request)
    if place.ended:
        return "finishing"
    where = (
        f"queued for inference, position {place.position}"
        if place.position is not None
        else f"in the {place.stage.value} stage"
    )
    return f"{where}; {place.chunks} tokens streamed" if place.chunks else where


def view(job: Job, pipeline: Pipeline, poll_after_ms: int) -> JobView:
    age_s = round(max(0.0, time.time() - job.created_at), 3)
    items = (job.items_done, job.items_total) if job.items_total else (None, None)
    common: dict[str, Any] = {
        "request_id": job.id,
        "tool": job.tool,
        "message": describe(job, pipeline),
        "age_s": age_s,
        "items_done": items[0],
        "items_total": items[1],
    }
    if job.state is JobState.working:
        status, stage, position, chunks = (
            whereabouts(job, pipeline) if job.elsewhere is None else ("working", None, None, 0)
        )
        return JobView(
            status=status,
            stage=stage,
            position=position,
            tokens_streamed=chunks,
            poll_after_ms=poll_after_ms,
            **common,
        )
    if job.state is JobState.completed:
        result: CallToolResult = job.result
        if result.is_error:
            return JobView(status="failed", error=text_of(result), **{**common, "message": "failed"})
        return JobView(status="completed", result=result.structured_content, **common)
    if job.state is JobState.failed:
        return JobView(status="failed", error=str(job.failure), **common)
    return JobView(status="cancelled", **common)


def text_of(result: CallToolResult) -> str:
    return "\n".join(block.text for block in result.content if isinstance(block, TextContent))


def status_result(job: Job, pipeline: Pipeline, poll_after_ms: int) -> CallToolResult:
    """request_status's answer: the finished call's own text (the answer) with the status as
    structured content; while it runs, the status line."""
    shown = view(job, pipeline, poll_after_ms)
    if shown.status == "completed":
        text = text_of(job.result)
    elif shown.status in ("queued", "working"):
        text = (
            f"{shown.status}: {shown.message}. Not finished yet: call request_status again "
            f"(request_id={job.id!r}, wait_ms up to {MAX_STATUS_WAIT_MS})."
        )
    else:
        text = f"{shown.status}: {shown.error or shown.message}"
    return CallToolResult(
        content=[TextContent(type="text", text=text)], structured_content=shown.model_dump(mode="json")
    )


def queued_result(job: Job, pipeline: Pipeline, poll_after_ms: int) -> CallToolResult:
    """What a background call answers at once."""
    shown = view(job, pipeline, poll_after_ms)
    text = (
        f"Started in the background as request {job.id} ({shown.message}). Fetch the result with "
        f"request_status(request_id={job.id!r}, wait_ms={MAX_STATUS_WAIT_MS}); stop it with cancel_request."
    )
    return CallToolResult(
        content=[TextContent(type="text", text=text)], structured_content=shown.model_dump(mode="json")
    )


def error_result(exc: OrchestratorError) -> CallToolResult:
    """A tool error as the call would have returned it inline (isError, its message)."""
    return CallToolResult(content=[TextContent(type="text", text=str(exc))], is_error=True)


async def as_job(job: Job, body: Callable[[], Awaitable[CallToolResult]]) -> CallToolResult:
    """Run a tool body for `job`: it submits on the job's behalf; a tool error is its result."""
    token = CURRENT_JOB.set(job)
    try:
        return await body()
    except OrchestratorError as exc:
        return error_result(exc)
    finally:
        CURRENT_JOB.reset(token)
