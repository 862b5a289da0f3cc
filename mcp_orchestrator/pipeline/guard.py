"""Circuit breakers around backends, and the record of what each request's calls did.

`guard(worker, breakers)` wraps every leaf backend (each replica of a pool, each link
of a fallback chain, or the single worker) in a `GuardedWorker` with its own breaker.
A guarded worker fails fast when its breaker is open (a retryable WorkerError marked
`circuit_open`; pools and fallback chains skip it beforehand through its `available`
property), and reports each call's outcome to the breaker and to the request's
`Trace`, found through a context variable so the workers themselves stay unaware of it.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import anyio

from mcp_orchestrator.errors import CircuitOpen, WorkerError
from mcp_orchestrator.models import Hop
from mcp_orchestrator.resilience.breaker import BreakerOpen, CircuitBreaker, Permit
from mcp_orchestrator.workers.base import Chunk, Worker, WorkerRequest


def backend_name(worker: Worker) -> str:
    """A stable, key-free name for one backend: its kind plus where it lives."""
    info = worker.describe()
    named = info.get("name")
    if isinstance(named, str) and named:
        return named
    where = info.get("base_url") or info.get("url")
    return f"{worker.kind} at {where}" if where else worker.kind


def is_circuit_open(error: BaseException) -> bool:
    return isinstance(error, WorkerError) and error.circuit_open


@dataclass(slots=True)
class Trace:
    """What one request's backend calls did, across retries and fallback hops."""

    attempts: int = 0
    """Calls that reached a backend."""
    retries: int = 0
    forwarded: int = 0
    """Chunks of text already handed to the caller (a retry would repeat them)."""
    hops: list[Hop] = field(default_factory=list)
    answered_by: GuardedWorker | None = None
    active: GuardedWorker | None = None
    """The backend being called right now (or last)."""
    blame_after: float | None = None
    """Loop time from which a cancellation of the current call counts as the backend's
    fault (an attempt or stage timeout), rather than the caller going away."""
    calls_before_attempt: int = 0

    def begin_attempt(self, blame_after: float | None) -> None:
        self.blame_after = blame_after
        self.calls_before_attempt = self.attempts

    @property
    def attempt_reached_a_backend(self) -> bool:
        return self.attempts > self.calls_before_attempt

    def record(self, worker: GuardedWorker, error: WorkerError) -> None:
        self.hops.append(
            Hop(
                worker=worker.name,
                error=error.message if is_circuit_open(error) else str(error),
                status=error.status,
                breaker=worker.breaker.state.value,
            )
        )


_trace: ContextVar[Trace | None] = ContextVar("mcp_orchestrator_trace", default=None)


def start_trace() -> Trace:
    """A fresh trace for the calls made from the current task (one request at a time)."""
    trace = Trace()
    _trace.set(trace)
    return trace


class GuardedWorker:
    """A backend behind its circuit breaker. Implements the Worker protocol."""

    def __init__(self, inner: Worker, breaker: CircuitBreaker) -> None:
        self.inner = inner
        self.breaker = breaker
        self.name = breaker.name

    @property
    def kind(self) -> str:
        return self.inner.kind

    @property
    def model(self) -> str:
        return self.inner.model

    @property
    def available(self) -> bool:
        """False while the breaker would refuse a call: pools and fallback chains skip such
        members (the workers' `Availability` protocol)."""
        return self.breaker.available()

    def describe(self) -> dict[str, Any]:
        return self.inner.describe()

    async def health(self) -> None:
        await self.inner.health()

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def generate(self, request: WorkerRequest) -> AsyncGenerator[Chunk, None]:
        trace = _trace.get()
        permit = self._acquire(trace)
        if trace is not None:
            trace.attempts += 1
            trace.active = self
        chunks = self.inner.generate(request)
        try:
            try:
                async for chunk in chunks:
                    yield chunk
            finally:  # what contextlib.aclosing does, for less per call
                await chunks.aclose()
        except WorkerError as exc:
            # Permanent errors (400, 401, ...) prove the backend is up: no verdict.
            permit.failure() if exc.retryable else permit.release()
            if trace is not None:
                trace.record(self, exc)
            raise
        except anyio.get_cancelled_exc_class():
            self._cancelled(permit, trace)
            raise
        except GeneratorExit:
            permit.release()  # the consumer stopped reading (it failed or gave up)
            raise
        except Exception:
            permit.failure()  # an unmapped error: count it, so a broken backend is not hammered
            raise
        else:
            permit.success()
            if trace is not None:
                trace.answered_by = self

    def _acquire(self, trace: Trace | None) -> Permit:
        try:
            return self.breaker.acquire()
        except BreakerOpen as exc:
            # Retryable, so a fallback chain moves on; the pipeline itself does not wait it out.
            refusal = CircuitOpen(self.name, exc.retry_after_s, probing=exc.probing)
            error = WorkerError(
                self.name, str(refusal), retryable=True, retry_after_s=exc.retry_after_s, circuit_open=True
            )
        if trace is not None:
            trace.record(self, error)
        raise error

    def _cancelled(self, permit: Permit, trace: Trace | None) -> None:
        blame = trace.blame_after if trace is not None else None
        if blame is not None and anyio.current_time() >= blame:
            permit.failure()  # it did not answer in time
        else:
            permit.release()


def guard(worker: Worker, breaker_for: Callable[[str], CircuitBreaker]) -> Worker:
    """Put every leaf backend of `worker` behind its breaker; returns what to call.

    A composite (pool, fallback chain) exposes `members` and `wrap_members(wrap)`: its
    members are wrapped in place, one breaker per replica, and the composite itself is
    returned (it skips members whose `available` is false).
    """
    if isinstance(worker, GuardedWorker):
        return worker
    wrap_members = getattr(worker, "wrap_members", None)
    if getattr(worker, "members", None) is not None and callable(wrap_members):
        wrap_members(lambda member: guard(member, breaker_for))
        return worker
    return GuardedWorker(worker, breaker_for(backend_name(worker)))


def leaves(worker: Worker) -> list[GuardedWorker]:
    """The guarded backends inside `worker`, in order."""
    if isinstance(worker, GuardedWorker):
        return [worker]
    found: list[GuardedWorker] = []
    for member in getattr(worker, "members", None) or ():
        found.extend(leaves(member))
    return found
