"""Errors a request can end with. Their messages are shown to users as they are,
so each one says what happened, where, and what to do about it."""

from __future__ import annotations

import math


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


class CircuitOpen(OrchestratorError):
    """A circuit breaker refused the call without touching the backend."""

    def __init__(self, backend: str, retry_after_s: float, *, probing: bool = False) -> None:
        self.backend = backend
        self.retry_after_s = retry_after_s
        self.probing = probing
        wait = max(1, math.ceil(retry_after_s))
        state = "circuit half-open and its probes are still running" if probing else "circuit open"
        super().__init__(f"backend {backend} unavailable, {state}, retry after {wait} s")


class RateLimited(OrchestratorError):
    """Admission control found no token for the request before its deadline."""

    def __init__(self, scope: str, rate: float, burst: int, retry_after_ms: int) -> None:
        self.scope = scope
        self.retry_after_ms = retry_after_ms
        super().__init__(
            f"rate limited: the {scope} limit ({rate:g} requests/s, burst {burst}) has no token for this "
            f"request before its deadline; retry_after_ms={retry_after_ms}"
        )
