"""One trip's backend call: retries, attempt timeouts and the stage budget.

Retries only retryable failures, and only while no chunk has reached a caller: a retry
starts the answer from scratch, and a caller who already got half of it would see it
repeated or spliced, so a stream that breaks after forwarding text fails with a clear
error instead. Open breakers are never waited out: they exist to fail fast.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import anyio

from mcp_orchestrator.config import InferenceSection, ResilienceSection
from mcp_orchestrator.errors import CircuitOpen, DeadlineExceeded, RequestError, StageTimeout, WorkerError, WorkerFailed
from mcp_orchestrator.metrics import Metrics
from mcp_orchestrator.models import DeadLetterReason, Provenance, StageName, Usage
from mcp_orchestrator.pipeline.guard import Trace, backend_name, is_circuit_open, leaves, start_trace
from mcp_orchestrator.pipeline.request import Trip
from mcp_orchestrator.resilience.breaker import BreakerState
from mcp_orchestrator.resilience.retry import Clock, RetryPolicy, Verdict, call_with_retries
from mcp_orchestrator.workers.base import Chunk, Worker, WorkerRequest

log = logging.getLogger(__name__)


@dataclass(slots=True)
class StageBudget:
    """When the inference stage of one trip must end, and why: its timeout or the trip's
    deadline, whichever comes first. Kept on two clocks: the loop's (cancel scopes) and the
    pipeline's (retry waits; a fake clock in tests)."""

    started: float
    """Loop time the stage started."""
    clock_offset: float
    """Pipeline clock minus loop clock at the start."""
    timeout_s: float
    deadline: float
    """The trip's deadline (loop time); moves later when a waiter with more time joins."""
    scope: anyio.CancelScope | None = None

    @property
    def loop_end(self) -> float:
        return min(self.started + self.timeout_s, self.deadline)

    def end(self) -> float:
        """The end on the pipeline clock (what the retry planner compares waits with)."""
        return self.loop_end + self.clock_offset

    @property
    def stage_binds(self) -> bool:
        """True when the stage timeout comes before the trip's deadline."""
        return self.started + self.timeout_s < self.deadline

    def extend(self, deadline: float) -> None:
        self.deadline = max(self.deadline, deadline)
        if self.scope is not None:
            self.scope.deadline = self.loop_end


@dataclass(slots=True)
class Answer:
    """What one successful call produced."""

    parts: list[str] = field(default_factory=list)
    usage: Usage | None = None
    finish_reason: str | None = None


@dataclass(slots=True)
class CallOutcome:
    """An answer, or the error the waiters see and the dead-letter reason."""

    answer: Answer | None
    error: RequestError | None
    reason: DeadLetterReason
    trace: Trace


class _OutOfTime(Exception):
    """The stage timeout or the trip's deadline ended the inference: final, never retried."""

    def __init__(self, error: RequestError, reason: DeadLetterReason) -> None:
        super().__init__(str(error))
        self.error = error
        self.reason = reason


def all_open(worker: Worker) -> bool:
    """Whether every backend inside `worker` is behind a breaker that refuses calls now."""
    members = leaves(worker)
    return bool(members) and not any(member.available for member in members)


class InferenceCall:
    """Calls the (guarded) worker for one trip, with retries, inside the stage timeout and
    the trip's deadline. Cancelled from outside (trip.stop) when its last waiter leaves."""

    __slots__ = (
        "clock",
        "deadline_ms",
        "loop_time",
        "metrics",
        "policy",
        "resilience",
        "section",
        "trace",
        "trip",
        "worker",
    )

    def __init__(
        self,
        trip: Trip,
        worker: Worker,
        section: InferenceSection,
        resilience: ResilienceSection,
        policy: RetryPolicy,
        *,
        clock: Clock,
        metrics: Metrics,
        deadline_ms: float,
        loop_time: Callable[[], float] = anyio.current_time,
    ) -> None:
        self.trip = trip
        self.worker = worker
        self.section = section
        self.resilience = resilience
        self.policy = policy
        self.clock = clock
        """Time for retry waits and the stage budget (injectable, so tests need not sleep)."""
        self.metrics = metrics
        self.deadline_ms = deadline_ms
        """The deadline as its caller gave it, for the error message."""
        self.loop_time = loop_time
        """The event loop's clock, which cancel scopes use (the pipeline passes a cheap reader)."""
        self.trace = start_trace()

    async def run(self) -> CallOutcome | None:
        """The call's outcome, or None when nobody waits any more (the trip was stopped)."""
        trip = self.trip
        submission = trip.submission
        # Only the call's own parameters: the worker layers them over its configure_worker
        # settings, which already sit over the config's [stages.inference] defaults.
        call = WorkerRequest(trip.messages, submission.params, next(iter(trip.waiters), ""), submission.session_id)
        now = self.loop_time()
        stage = StageBudget(now, self.clock.now() - now, self.section.timeout_ms / 1000, trip.deadline)
        # One scope for the whole stage: it ends the call at the stage's end, and trip.stop()
        # cancels it when the last waiter leaves. Attempt timeouts get their own, inner scope.
        with anyio.CancelScope(deadline=stage.loop_end) as scope:
            stage.scope = trip.scope = scope
            trip.on_extend = stage.extend
            try:
                answer = await call_with_retries(
                    partial(self._attempt, call, stage),
                    policy=self.policy,
                    deadline=stage.end,
                    clock=self.clock,
                    judge=self._judge,
                    on_retry=self._on_retry,
                )
            except _OutOfTime as exc:
                return CallOutcome(None, exc.error, exc.reason, self.trace)
            except WorkerError as exc:
                return CallOutcome(None, self._failure(exc), DeadLetterReason.worker_error, self.trace)
            except Exception as exc:
                log.exception("worker %s raised on request %s", self.worker.kind, call.request_id)
                error = WorkerFailed(f"{self.worker.kind} worker error: {exc}")
                return CallOutcome(None, error, DeadLetterReason.worker_error, self.trace)
            finally:
                trip.scope = trip.on_extend = stage.scope = None
                self.trace.blame_after = None
            return CallOutcome(answer, None, DeadLetterReason.worker_error, self.trace)
        if trip.stopped:
            return None
        ended = self._out_of_time(stage)
        return CallOutcome(None, ended.error, ended.reason, self.trace)

    def provenance(self) -> Provenance:
        trace = self.trace
        answered = trace.answered_by
        return Provenance(
            worker=answered.name if answered is not None else backend_name(self.worker),
            attempts=trace.attempts,
            retries=trace.retries,
            fallbacks=list(trace.hops),
            breaker=(answered.breaker.state if answered is not None else BreakerState.closed).value,
        )

    async def _attempt(self, call: WorkerRequest, stage: StageBudget, retry: int) -> Answer:
        """One call of the worker, bounded by the attempt timeout and what is left of the stage."""
        trace = self.trace
        remaining = stage.end() - self.clock.now()
        if remaining <= 0:
            raise self._out_of_time(stage)
        answer = Answer()
        limit_ms = self.resilience.attempt_timeout_ms
        if limit_ms is None or limit_ms / 1000 >= remaining:
            # The stage's scope (see run) ends this attempt; a timeout of ours is the
            # backend's fault, the caller's own deadline is not.
            trace.begin_attempt(stage.loop_end if stage.stage_binds else None)
            await self._stream(call, answer)
            return answer
        attempt_end = self.loop_time() + limit_ms / 1000
        trace.begin_attempt(attempt_end)
        with anyio.CancelScope(deadline=attempt_end) as scope:
            await self._stream(call, answer)
        trace.blame_after = None
        if not scope.cancelled_caught:
            return answer
        name = trace.active.name if trace.active is not None else backend_name(self.worker)
        error = WorkerError(name, f"no complete answer within {limit_ms} ms (resilience.attempt_timeout_ms)", True)
        if trace.active is not None:
            trace.record(trace.active, error)
        raise error

    async def _stream(self, call: WorkerRequest, answer: Answer) -> None:
        trace, broadcast = self.trace, self.trip.broadcast
        chunks = self.worker.generate(call)
        try:
            async for chunk in chunks:
                _take(answer, chunk, trace, broadcast)
        finally:  # what contextlib.aclosing does, for less per call
            await chunks.aclose()

    def _judge(self, error: BaseException) -> Verdict | None:
        """Whether a failed call may be retried. None: not a backend failure, let it through.

        Never retried: permanent errors, a stream that already reached a caller, and open
        breakers (they exist to fail fast, not to make callers wait them out).
        """
        if not isinstance(error, WorkerError):
            return None
        if not error.retryable or self.trace.forwarded or is_circuit_open(error) or all_open(self.worker):
            return Verdict(False)
        return Verdict(True, error.retry_after_s)

    def _on_retry(self, retry: int, error: BaseException, wait_s: float) -> None:
        trace = self.trace
        trace.retries += 1
        name = trace.active.name if trace.active is not None else self.worker.kind
        self.metrics.retries.labels(name).inc()
        log.info(
            "request %s: retry %d in %.3f s after: %s", next(iter(self.trip.waiters), "?"), retry + 1, wait_s, error
        )

    def _failure(self, error: WorkerError) -> RequestError:
        """The error the waiters see for a worker failure we stopped retrying."""
        trace, worker = self.trace, self.worker
        if is_circuit_open(error):
            return CircuitOpen(error.backend, error.retry_after_s or 0.0)
        if all_open(worker) and not trace.attempt_reached_a_backend:  # a pool or chain with nobody left
            members = leaves(worker)
            wait = min(member.breaker.retry_after_s() for member in members)
            return CircuitOpen(f"{worker.kind} (all {len(members)} members)", wait)
        message = str(error)
        if trace.forwarded and error.retryable:
            message += (
                f"; not retried: {trace.forwarded} chunk(s) had already been streamed to the caller "
                "and a retry would repeat them"
            )
        elif error.retryable:
            allowed = self.resilience.retry_attempts
            why = (
                f"resilience.retry_attempts = {allowed} used up"
                if trace.retries >= allowed
                else "waiting to retry would pass the request's deadline or the stage timeout"
            )
            message += f" (gave up after {trace.attempts} call(s): {why})"
        return WorkerFailed(message)

    def _out_of_time(self, stage: StageBudget) -> _OutOfTime:
        if stage.stage_binds:
            return _OutOfTime(
                StageTimeout(StageName.inference.value, self.section.timeout_ms), DeadLetterReason.stage_timeout
            )
        return _OutOfTime(
            DeadlineExceeded(self.deadline_ms, StageName.inference.value), DeadLetterReason.deadline_exceeded
        )


def _take(answer: Answer, chunk: Chunk, trace: Trace, broadcast: Callable[[str], bool]) -> None:
    if chunk.text:
        answer.parts.append(chunk.text)
        if broadcast(chunk.text):
            trace.forwarded += 1  # a caller has seen text: starting over would repeat it
    if chunk.usage is not None:
        answer.usage = chunk.usage
    if chunk.finish_reason is not None:
        answer.finish_reason = chunk.finish_reason
