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
from dataclasses import dataclass
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


@dataclass(frozen=True, slots=True)
class Place:
    """Where a running job's work is."""

    status: Running
    stage: StageName | None = None
    position: int | None = None
    chunks: int = 0


def whereabouts(job: Job, pipeline: Pipeline) -> Place:
    """Where a running job's work is: its request's stage and queue place (one request), or
    just "working" (a batch, or all its requests ended), and the chunks streamed."""
    if not job.requests:
        return Place("queued")
    places = [pipeline.locate(request) for request in job.requests if not request.ended]
    chunks = sum(place.chunks for place in places)
    if len(places) != 1:
        return Place("working", chunks=chunks)
    place = places[0]
    return Place("queued" if place.position is not None else "working", place.stage, place.position, chunks)


def where_line(stage: StageName, position: int | None, chunks: int) -> str:
    """ "queued for inference, position 3" or "in the rag stage", with the chunks streamed."""
    where = f"queued for inference, position {position}" if position is not None else f"in the {stage.value} stage"
    return f"{where}; {chunks} tokens streamed" if chunks else where


def describe(job: Job, pipeline: Pipeline) -> str:
    """One line on where the work is (statusMessage, progress heartbeats)."""
    if job.state is JobState.completed:
        return f"failed: {text_of(job.result)}" if is_tool_error(job.result) else "completed"
    if job.state is JobState.failed:
        return f"failed: {job.failure}"
    if job.state is JobState.cancelled:
        return "cancelled"
    if job.elsewhere is not None:
        return job.elsewhere + ("; cancelling" if job.cancel_requested else "")
    return running_line(job, whereabouts(job, pipeline))


def running_line(job: Job, place: Place) -> str:
    if job.items_total:
        running = sum(1 for request in job.requests if not request.ended)
        line = f"{job.items_done}/{job.items_total} items done, {running} running"
        line += f"; {place.chunks} tokens streamed" if place.chunks else ""
    elif place.stage is not None:
        line = where_line(place.stage, place.position, place.chunks)
    else:
        line = "starting" if place.status == "queued" else "working"
    return line + ("; cancelling" if job.cancel_requested else "")


def describe_request(request: Request, pipeline: Pipeline) -> str:
    """One line on where one request is (the heartbeat of a call that waits for its answer)."""
    place = pipeline.locate(request)
    return "finishing" if place.ended else where_line(place.stage, place.position, place.chunks)


def is_tool_error(result: Any) -> bool:
    return isinstance(result, CallToolResult) and result.is_error


def view(job: Job, pipeline: Pipeline, poll_after_ms: int) -> JobView:
    common: dict[str, Any] = {
        "request_id": job.id,
        "tool": job.tool,
        "age_s": round(max(0.0, time.time() - job.created_at), 3),
        "items_done": job.items_done if job.items_total else None,
        "items_total": job.items_total or None,
    }
    if job.state is JobState.working:
        if job.elsewhere is not None:  # another process runs it: its record says no more
            place, message = Place("working"), describe(job, pipeline)
        else:
            place = whereabouts(job, pipeline)
            message = running_line(job, place)
        return JobView(
            status=place.status,
            message=message,
            stage=place.stage,
            position=place.position,
            tokens_streamed=place.chunks,
            poll_after_ms=poll_after_ms,
            **common,
        )
    message = describe(job, pipeline)
    if job.state is JobState.completed:
        result: CallToolResult = job.result
        if result.is_error:
            return JobView(status="failed", message=message, error=text_of(result), **common)
        return JobView(status="completed", message=message, result=result.structured_content, **common)
    if job.state is JobState.failed:
        return JobView(status="failed", message=message, error=str(job.failure), **common)
    return JobView(status="cancelled", message=message, **common)


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
