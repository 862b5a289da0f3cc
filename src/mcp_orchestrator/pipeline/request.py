"""A request's life inside the pipeline: its data, its stage timings and its one-shot outcome."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import anyio

from mcp_orchestrator.models import Message, Outcome, StageName, Submission, Usage

ChunkSink = Callable[[str], None]


@dataclass(slots=True, eq=False)
class Request:
    id: str
    submission: Submission
    seq: int
    submitted_at: float
    deadline: float
    """Absolute anyio clock time after which the request fails."""
    on_chunk: ChunkSink | None = None

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
    inference_scope: anyio.CancelScope | None = None

    outcome: Outcome | None = None
    error: BaseException | None = None
    done: anyio.Event = field(default_factory=anyio.Event)

    @property
    def finished(self) -> bool:
        return self.outcome is not None

    def enter(self, stage: StageName, now: float) -> None:
        """Close the timing of the current stage and start `stage`'s."""
        self.stage_ms[self.stage.value] = (now - self.stage_entered_at) * 1000
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
        self.done.set()
        return True
