"""A caller's request and the trip that carries it through the stages.

The two are kept apart because coalescing makes them different things:

- a `Request` is one call: it has a caller, a deadline of its own, and it ends exactly
  once (ledger.py is the only place that ends it);
- a `Trip` is one journey through the stages and at most one backend call. Every
  request that needs the backend waits on a trip: its own, or an identical one already
  under way (coalesce.py). A trip runs while anybody waits on it and stops when the
  last waiter leaves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import anyio

from mcp_orchestrator.errors import RequestError
from mcp_orchestrator.models import Message, Outcome, Provenance, StageName, Submission, Usage
from mcp_orchestrator.pipeline.answers import Answer

ChunkSink = Callable[[str], None]
"""Receives the answer's text chunks as they stream (a caller's progress, say)."""


class Lead(Protocol):
    """A trip that calls the backend on behalf of other processes too (pipeline/sharing.py):
    told once how the trip ended, so those processes learn it."""

    def finish(self, answer: Answer, cacheable: bool) -> None: ...

    def fail(self, error: str) -> None: ...

    def release(self) -> None: ...


@dataclass(slots=True, eq=False)
class Request:
    id: str
    submission: Submission
    submitted_at: float
    """Event loop time (cancel scopes and deadlines use that clock)."""
    deadline: float
    """When this request's caller stops waiting (loop time); never moved."""
    on_chunk: ChunkSink | None = None
    job_id: str | None = None
    """The task or background request (jobs/) it belongs to, if any: its dead letter names it."""
    trip: Trip | None = None
    """The trip it waits on, while it waits."""
    coalesced: bool = False
    """It joined a trip another request started."""
    cached: bool = False
    outcome: Outcome | None = None
    error: RequestError | None = None
    answer: Answer | None = None
    ended_at: float = 0.0
    stage_ms: dict[str, float] | None = None
    """The stage timings of the trip this request started (None for a shared or cached answer)."""
    attempts: int = 0
    done: anyio.Event = field(default_factory=anyio.Event)

    @property
    def ended(self) -> bool:
        return self.outcome is not None

    @property
    def where(self) -> StageName:
        """The stage its trip is in (the first one before it has a trip)."""
        return self.trip.stage if self.trip is not None else StageName.rag


@dataclass(slots=True, eq=False)
class Trip:
    submission: Submission
    """What travels: the request that started the trip (identical to every other waiter's)."""
    key: str | None
    """Answer key (coalesce.py) when identical requests may join it and its answer be cached."""
    rank: int
    """Scheduling class in the queues (0 critical .. 3 low): the best of its waiters'."""
    deadline: float
    """When the last of its waiters stops waiting (loop time): its stages end by then."""
    entered_at: float
    cacheable: bool = False
    stage: StageName = StageName.rag
    stage_ms: dict[str, float] = field(default_factory=dict)
    waiters: dict[str, Request] = field(default_factory=dict)
    """Requests waiting for this trip's answer, by id, in arrival order."""
    sinks: dict[str, ChunkSink] = field(default_factory=dict)
    context: list[str] = field(default_factory=list)
    messages: tuple[Message, ...] = ()
    text: str = ""
    chunks: int = 0
    """Text chunks the backend has streamed so far, all attempts (progress of a long answer)."""
    usage: Usage | None = None
    finish_reason: str | None = None
    worker: str = ""
    model: str = ""
    provenance: Provenance | None = None
    attempts: int = 0
    stopped: bool = False
    """Ended (answered, failed, shed) or abandoned by its last waiter: no stage works on it any more."""
    scope: anyio.CancelScope | None = None
    """The scope of the work running on it now (a rate-limit wait, retrieval, the backend call)."""
    on_extend: Callable[[float], None] | None = None
    """Moves the running stage's end when a waiter with a later deadline joins."""
    lead: Lead | None = None
    """Set while this trip leads a flight shared with other processes (told when it ends)."""

    def enter(self, stage: StageName, now: float) -> None:
        """Close the timing of the current stage and start `stage`'s."""
        # StageName is a StrEnum: the member is its own key (and skips the enum's slow `.value`).
        self.stage_ms[self.stage] = (now - self.entered_at) * 1000
        self.stage = stage
        self.entered_at = now

    def extend(self, deadline: float) -> None:
        """A waiter that joined needs the trip until `deadline`."""
        if deadline > self.deadline:
            self.deadline = deadline
            if self.on_extend is not None:
                self.on_extend(deadline)

    def broadcast(self, text: str) -> bool:
        """Hand a chunk to every waiter that asked for chunks; whether anyone received it."""
        self.chunks += 1
        if not self.sinks:
            return False
        for sink in tuple(self.sinks.values()):
            sink(text)
        return True

    def stop(self) -> None:
        """No stage works on this trip any more; cancel what runs on it now."""
        self.stopped = True
        if self.scope is not None:
            self.scope.cancel()

    def answer(self) -> Answer:
        return Answer(self.text, self.usage, self.finish_reason, self.worker, self.model, self.provenance)
