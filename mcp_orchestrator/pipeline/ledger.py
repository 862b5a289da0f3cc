"""The ledger: every request from submission to its one end, and the counters that prove it.

`end` is the only way a request ends. It is idempotent (the first end wins, later ones
are ignored and say so), so whoever races to end a request (its trip answering, its
caller's deadline, its caller cancelling, shutdown) cannot count it twice. Because of
that, at any moment

    submitted == completed + failed + shed + cancelled + in flight

which `reconciles()` checks and `pipeline_status` reports.
"""

from __future__ import annotations

import secrets
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from mcp_orchestrator.errors import RateLimited, RequestError
from mcp_orchestrator.metrics import Metrics
from mcp_orchestrator.models import Outcome, Submission
from mcp_orchestrator.pipeline.answers import Answer
from mcp_orchestrator.pipeline.request import ChunkSink, Request

LATENCY_WINDOW = 4096
"""Latest completed requests kept for the latency percentiles."""


@dataclass
class Counters:
    submitted: int = 0
    completed: int = 0
    failed: int = 0
    shed: int = 0
    cancelled: int = 0
    coalesced: int = 0
    """Completed with the answer of a trip another request started."""
    cache_hits: int = 0
    rate_limited: int = 0
    """Refused by admission control (also counted in failed)."""

    def ended(self) -> int:
        return self.completed + self.failed + self.shed + self.cancelled


class Ledger:
    def __init__(self, metrics: Metrics, left: Callable[[Request], None]) -> None:
        self.live: dict[str, Request] = {}
        self.counters = Counters()
        self.latencies_ms: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._metrics = metrics
        self._latency_metric = metrics.request_duration.labels()
        self._left = left
        """Told when a request stops waiting on its trip (coalesce.py counts the trip's waiters)."""
        self._id_prefix = secrets.token_hex(10)
        """Request ids are this random prefix plus a counter: unique, and cheaper than a uuid each."""
        self._serial = 0

    def open(
        self, submission: Submission, now: float, deadline: float, on_chunk: ChunkSink | None, job_id: str | None
    ) -> Request:
        self._serial += 1
        request = Request(f"{self._id_prefix}{self._serial:012x}", submission, now, deadline, on_chunk, job_id)
        self.counters.submitted += 1
        self.live[request.id] = request
        return request

    def end(
        self,
        request: Request,
        outcome: Outcome,
        now: float,
        error: RequestError | None = None,
        answer: Answer | None = None,
    ) -> bool:
        """End `request` as `outcome` (with its error, or its answer when completed). Returns
        False when it had already ended: nothing changes then."""
        if request.outcome is not None:
            return False
        request.outcome, request.error, request.answer, request.ended_at = outcome, error, answer, now
        del self.live[request.id]
        counters = self.counters
        if outcome is Outcome.completed:
            counters.completed += 1
            if request.cached:
                counters.cache_hits += 1
            elif request.coalesced:
                counters.coalesced += 1
            latency_ms = (now - request.submitted_at) * 1000
            self.latencies_ms.append(latency_ms)
            self._latency_metric.observe(latency_ms / 1000)
        elif outcome is Outcome.failed:
            counters.failed += 1
            if isinstance(error, RateLimited):
                counters.rate_limited += 1
                self._metrics.rate_limited.labels(error.scope).inc()
        elif outcome is Outcome.shed:
            counters.shed += 1
        else:
            counters.cancelled += 1
        if request.trip is not None:
            self._left(request)
        request.done.set()
        return True

    def reconciles(self) -> bool:
        """The conservation law: submitted == completed + failed + shed + cancelled + in flight."""
        return self.counters.submitted == self.counters.ended() + len(self.live)

    def latency_percentiles(self) -> dict[str, float]:
        ordered = sorted(self.latencies_ms)
        if not ordered:
            return {"p50": 0.0, "p95": 0.0, "p99": 0.0}

        def pick(q: float) -> float:
            return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)

        return {"p50": pick(0.50), "p95": pick(0.95), "p99": pick(0.99)}
