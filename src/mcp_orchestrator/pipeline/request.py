"""A request's life inside the pipeline: its data, its stage timings and its one-shot outcome."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio

from mcp_orchestrator.models import Message, Outcome, Provenance, StageName, Submission, Usage

if TYPE_CHECKING:
    from mcp_orchestrator.pipeline.coalesce import Flight

ChunkSink = Callable[[str], "bool | None"]
"""Receives the answer's chunks as they stream. A caller's own sink returns None; a flight's
relay returns whether any caller received the chunk (a retry may start over only while
nobody has seen any text)."""


@dataclass(slots=True, eq=False)
class Request:
    id: str
    submission: Submission
    submitted_at: float
    deadline: float
    """Absolute anyio clock time after which the request's trip through the stages ends. A flight
    leader's is pushed back to the latest deadline of the followers waiting on it."""
    rank: int = 2
    """Scheduling class used in the queues (0 critical .. 3 low): the submission's, raised
    while a more urgent identical request waits on this one's flight."""
    on_chunk: ChunkSink | None = None
    caller_deadline: float = 0.0
    """When the caller of this request stops waiting (its own deadline, never moved)."""

    stage: StageName = StageName.rag
    stage_entered_at: float = 0.0
    stage_ms: dict[str, float] = field(default_factory=dict)
    context: list[str] = field(default_factory=list)
    messages: tuple[Message, ...] = ()
    text: str = ""
    usage: Usage | None = None
    finish_reason: str | None = None
    worker: str = ""
    model: str = ""
    attempts: int = 0
    provenance: Provenance | None = None
    inference_scope: anyio.CancelScope | None = None

    outcome: Outcome | None = None
    error: BaseException | None = None
    done: anyio.Event = field(default_factory=anyio.Event)

    key: str | None = None
    """Answer key (see pipeline/coalesce.py) when the request may share or cache its answer."""
    flight: Flight | None = None
    coalesced: bool = False
    cached: bool = False
    caller_left: bool = False
    """A flight leader whose caller stopped waiting (already counted) while it travels on for followers."""
    admission_scope: anyio.CancelScope | None = None

    @property
    def finished(self) -> bool:
        return self.outcome is not None

    def enter(self, stage: StageName, now: float) -> None:
        """Close the timing of the current stage and start `stage`'s."""
        # StageName is a StrEnum: the member is its own name as a key (and skips the
        # enum's `.value` property, which is measurably slow on a path taken 6 times per request).
        self.stage_ms[self.stage] = (now - self.stage_entered_at) * 1000
        self.stage = stage
        self.stage_entered_at = now

    def settle(self, outcome: Outcome, error: BaseException | None = None) -> bool:
        """Record how the request ended. Only the first call counts; returns whether it was this one."""
        if self.outcome is not None:
            return False
        self.outcome = outcome
        self.error = error
        if self.inference_scope is not None:
            self.inference_scope.cancel()
        if self.admission_scope is not None:
            self.admission_scope.cancel()
        self.done.set()
        return True
