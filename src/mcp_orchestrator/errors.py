"""Errors a request can end with. Their messages are shown to users as they are,
so each one says what happened, where, and what to do about it."""

from __future__ import annotations


class OrchestratorError(Exception):
    """Base of every error the pipeline reports to a caller."""


class PipelineNotRunning(OrchestratorError):
    def __init__(self) -> None:
        super().__init__("the pipeline is not running (server starting up or shutting down); try again")


class RequestShed(OrchestratorError):
    """A full stage queue refused the request; it is in the dead-letter queue."""

    def __init__(self, stage: str, capacity: int, dead_letter_id: str) -> None:
        self.stage = stage
        self.dead_letter_id = dead_letter_id
        super().__init__(
            f"request shed: the {stage} stage queue is full ({capacity} waiting); "
            f"saved as dead letter {dead_letter_id} (replay it with replay_dead_letter)"
        )


class DeadlineExceeded(OrchestratorError):
    def __init__(self, deadline_ms: float, stage: str) -> None:
        self.stage = stage
        super().__init__(f"deadline of {deadline_ms:g} ms exceeded while in the {stage} stage")


class StageTimeout(OrchestratorError):
    def __init__(self, stage: str, timeout_ms: float) -> None:
        self.stage = stage
        super().__init__(f"the {stage} stage timed out after {timeout_ms:g} ms")


class WorkerFailed(OrchestratorError):
    """The backend did not produce an answer; the message comes from the worker."""
