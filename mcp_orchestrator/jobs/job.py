"""One long call: its state, the pipeline requests it waits on, and its outcome."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

import anyio

from mcp_orchestrator.pipeline.request import Request


class JobState(StrEnum):
    """The MCP tasks statuses this server uses (it never needs input from the client)."""

    working = "working"
    completed = "completed"
    failed = "failed"
    """Only for a protocol-level error; a tool error is `completed` with `isError: true`."""
    cancelled = "cancelled"


class JobFailure(Exception):
    """A job's work ended with a protocol-level error (JSON-RPC code and message)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(eq=False)
class Job:
    id: str
    owner: str
    """Who may see it: a stdio connection, an OAuth subject, a token, an HTTP session."""
    tool: str
    kind: str
    """"task" (the MCP tasks extension) or "background" (infer(background=true) and friends)."""
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    state: JobState = JobState.working
    requests: list[Request] = field(default_factory=list)
    """The pipeline requests it made (one for infer, one per item for a batch)."""
    items_total: int = 0
    items_done: int = 0
    result: Any = None
    """The tool's result (a CallToolResult) once completed."""
    failure: JobFailure | None = None
    cancel_requested: bool = False
    handed_out: bool = False
    """Its id was given to its caller: its result is kept after it ends (else nobody could ask)."""
    elsewhere: str | None = None
    """For a copy of a job another process runs: its last status line there (and the node)."""
    ended_at: float | None = None
    """Event loop time it ended (its time to live counts from there)."""
    size: int = 0
    """Bytes its kept result costs (for [tasks] max_kept_bytes)."""
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    done: anyio.Event = field(default_factory=anyio.Event)

    @property
    def ended(self) -> bool:
        return self.state is not JobState.working

    def track(self, request: Request) -> None:
        """A pipeline request this job waits on (its stage and queue place make the status)."""
        self.requests.append(request)
        self.touch()

    def item_done(self) -> None:
        self.items_done += 1
        self.touch()

    def touch(self) -> None:
        self.updated_at = time.time()


@dataclass(frozen=True, slots=True)
class JobRecord:
    """A job as other processes see it (distributed/jobs.py keeps it in Redis)."""

    id: str
    owner: str
    """Digest of the owner's identity."""
    tool: str
    kind: str
    state: str
    created_at: float
    updated_at: float
    node: str
    result: dict[str, Any] | None = None
    failure: dict[str, Any] | None = None


class MirrorUnavailable(Exception):
    """The shared store did not answer in time (the link has logged why)."""


class JobMirror(Protocol):
    """Where jobs are published for other processes (distributed.jobs.SharedJobs)."""

    node: str
    cancel_local: Callable[[str, str], None]

    def owner_digest(self, owner: str) -> str: ...

    async def put(self, record: JobRecord, ttl_s: float) -> None: ...

    async def get(self, job_id: str) -> JobRecord | None: ...

    async def ask_cancel(self, job_id: str, owner: str) -> None: ...
