"""One request's backend call: retries, attempt timeouts and the stage budget.

Retries only retryable failures, and only while no chunk has reached the caller: a
retry starts the answer from scratch, and a caller who already got half of it would
see it repeated or spliced, so a stream that breaks after forwarding text fails with
a clear error instead. Open breakers are never waited out: they exist to fail fast.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache, partial

import anyio

from mcp_orchestrator.config import Config, ResilienceSection
from mcp_orchestrator.errors import CircuitOpen, DeadlineExceeded, OrchestratorError, StageTimeout, WorkerFailed
from mcp_orchestrator.metrics import Metrics
from mcp_orchestrator.models import DeadLetterReason, Provenance, StageName, Usage
from mcp_orchestrator.pipeline.guard import Trace, backend_name, is_circuit_open, leaves, start_trace
from mcp_orchestrator.pipeline.request import ChunkSink, Request
from mcp_orchestrator.resilience.breaker import BreakerState
from mcp_orchestrator.resilience.retry import Clock, RetryPolicy, Verdict, call_with_retries
from mcp_orchestrator.workers.base import Chunk, Worker, WorkerError, WorkerRequest

log = logging.getLogger(__name__)


@dataclass(slots=True)
class StageBudget:
    """When the inference stage of one request must end (on the pipeline's clock), and why."""

    end: float
    loop_end: float
    """The same moment on the event loop's clock (what cancel scopes use)."""
    timeout_ms: int
    stage_binds: bool
    """True when the stage timeout comes before the request's deadline."""
    deadline_ms: float


@dataclass(slots=True)
class Answer:
    """What one successful call produced."""

    parts: list[str] = field(default_factory=list)
    usage: Usage | None = None
    finish_reason: str | None = None


@dataclass(slots=True)
class CallOutcome:
    """An answer, or the error the caller sees and the dead-letter reason."""

    answer: Answer | None
    error: OrchestratorError | None
    reason: DeadLetterReason
    trace: Trace


class _OutOfTime(Exception):
    """The stage timeout or the request's deadline ended the inference: final, never retried."""

    def __init__(self, error: OrchestratorError, reason: DeadLetterReason) -> None:
        super().__init__(str(error))
        self.error = error
        self.reason = reason


def retry_policy(resilience: ResilienceSection) -> RetryPolicy:
    """The retry policy of a [resilience] section (live: a config reload changes it)."""
    return _policy(resilience.retry_attempts, resilience.retry_base_ms, resilience.retry_max_ms)


@lru_cache(maxsize=8)
def _policy(retries: int, base_ms: int, max_ms: int) -> RetryPolicy:
    return RetryPolicy(retries, base_ms / 1000, max_ms / 1000)


def all_open(worker: Worker) -> bool:
    """Whether every backend inside `worker` is behind a breaker that refuses calls now."""
    members = leaves(worker)
    return bool(members) and not any(member.available for member in members)


class InferenceCall:
    """Calls the (guarded) worker for one request, with retries, inside the stage timeout
    and the request's deadline. Cancelled from outside when the caller gives up."""

    __slots__ = ("clock", "config", "loop_time", "metrics", "request", "trace", "worker")

    def __init__(
        self,
        request: Request,
        worker: Worker,
        config: Config,
        clock: Clock,
        metrics: Metrics,
        loop_time: Callable[[], float] = anyio.current_time,
    ) -> None:
        self.request = request
        self.worker = worker
        self.config = config
        self.clock = clock
        """Time for retry waits and the stage budget (injectable, so tests need not sleep)."""
        self.metrics = metrics
        self.loop_time = loop_time
        """The event loop's clock, which cancel scopes use (the pipeline passes a cheap reader)."""
        self.trace = start_trace()

    async def run(self) -> CallOutcome | None:
        """The call's outcome, or None when the caller gave up (the request was settled and
        cancelled this call's scope from outside)."""
        request, section = self.request, self.config.stages.inference
        submission = request.submission
        # Only the call's own parameters: the worker layers them over its configure_worker
        # settings, which already sit over the config's [stages.inference] defaults.
        call = WorkerRequest(request.messages, submission.params, request.id, submission.session_id)
        # The stage ends at its timeout or at the request's deadline, whichever comes first.
        # Kept on self.clock, the clock the retry waits run on; cancel scopes use the loop's.
        now = self.loop_time()
        left_s = request.deadline - now
        stage_s = min(left_s, section.timeout_ms / 1000)
        stage = StageBudget(
            end=self.clock.now() + stage_s,
            loop_end=now + stage_s,
            timeout_ms=section.timeout_ms,
            stage_binds=section.timeout_ms / 1000 < left_s,
            deadline_ms=submission.deadline_ms or self.config.pipeline.default_deadline_ms,
        )
        # One scope for the whole stage: it ends the call at the stage's end, and settle()
        # cancels it when the caller gives up. Attempt timeouts get their own, inner scope.
        with anyio.CancelScope(deadline=stage.loop_end) as scope:
            request.inference_scope = scope
            try:
                answer = await call_with_retries(
                    partial(self._attempt, call, stage),
                    policy=retry_policy(self.config.resilience),
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
                log.exception("worker %s raised on request %s", self.worker.kind, request.id)
                error = WorkerFailed(f"{self.worker.kind} worker error: {exc}")
                return CallOutcome(None, error, DeadLetterReason.worker_error, self.trace)
            finally:
                request.inference_scope = None
                self.trace.blame_after = None
            return CallOutcome(answer, None, DeadLetterReason.worker_error, self.trace)
        if request.finished:
            return None
        ended = _out_of_time(stage)
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
        remaining = stage.end - self.clock.now()
        if remaining <= 0:
            raise _out_of_time(stage)
        answer = Answer()
        limit_ms = self.config.resilience.attempt_timeout_ms
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
        trace, sink = self.trace, self.request.on_chunk
        chunks = self.worker.generate(call)
        try:
            async for chunk in chunks:
                _take(answer, chunk, trace, sink)
        finally:  # what contextlib.aclosing does, for less per call
            await chunks.aclose()

    def _judge(self, error: BaseException) -> Verdict | None:
        """Whether a failed call may be retried. None: not a backend failure, let it through.

        Never retried: permanent errors, a stream that already reached the caller, and
        open breakers (they exist to fail fast, not to make callers wait them out).
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
        log.info("request %s: retry %d in %.3f s after: %s", self.request.id, retry + 1, wait_s, error)

    def _failure(self, error: WorkerError) -> OrchestratorError:
        """The error the caller sees for a worker failure we stopped retrying."""
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
            allowed = self.config.resilience.retry_attempts
            why = (
                f"resilience.retry_attempts = {allowed} used up"
                if trace.retries >= allowed
                else "waiting to retry would pass the request's deadline or the stage timeout"
            )
            message += f" (gave up after {trace.attempts} call(s): {why})"
        return WorkerFailed(message)


def _take(answer: Answer, chunk: Chunk, trace: Trace, sink: ChunkSink | None) -> None:
    if chunk.text:
        answer.parts.append(chunk.text)
        if sink is not None and sink(chunk.text) is not False:
            trace.forwarded += 1  # a caller has seen text: starting over would repeat it
    if chunk.usage is not None:
        answer.usage = chunk.usage
    if chunk.finish_reason is not None:
        answer.finish_reason = chunk.finish_reason


def _out_of_time(stage: StageBudget) -> _OutOfTime:
    if stage.stage_binds:
        return _OutOfTime(StageTimeout(StageName.inference.value, stage.timeout_ms), DeadLetterReason.stage_timeout)
    return _OutOfTime(
        DeadlineExceeded(stage.deadline_ms, StageName.inference.value), DeadLetterReason.deadline_exceeded
    )
