"""The pipeline: one task group, five stages, bounded queues between them.

A request's life, each step in one place:

    submit -> ledger.open                                  (ledger.py)
           -> admission: cache | join a trip | new trip    (admission.py, coalesce.py)
           -> rate limits -> stages -> inference -> stages (stages.py, dispatch.py)
           -> trip ends -> every waiter ends               (coalesce.py)
    its caller leaves (cancelled, deadline) -> it ends     (here, in `wait`)

and every end goes through `Ledger.end`, exactly once per request, so the counters
always reconcile. The pipeline knows nothing of MCP: a tool handler, a REST route or a
plain library call can drive it.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskGroup
from prometheus_client.core import Metric

from mcp_orchestrator.config import Config
from mcp_orchestrator.errors import DeadlineExceeded, PipelineNotRunning, ReplayRefused, RequestError
from mcp_orchestrator.event_loop import EventLoopName, running_loop
from mcp_orchestrator.metrics import Metrics
from mcp_orchestrator.models import (
    InferResult,
    Outcome,
    PipelineStatus,
    StageName,
    StageTimings,
    Submission,
    Usage,
    Whereabouts,
)
from mcp_orchestrator.pipeline.admission import Admission
from mcp_orchestrator.pipeline.answers import CachedAnswer
from mcp_orchestrator.pipeline.breakers import Breakers
from mcp_orchestrator.pipeline.coalesce import TripHooks, Trips
from mcp_orchestrator.pipeline.context import ContextSource
from mcp_orchestrator.pipeline.dead_letters import DeadLetterQueue
from mcp_orchestrator.pipeline.dispatch import Dispatch
from mcp_orchestrator.pipeline.lease import WorkerLease, close_quietly
from mcp_orchestrator.pipeline.ledger import Ledger
from mcp_orchestrator.pipeline.limits import RateLimits
from mcp_orchestrator.pipeline.request import ChunkSink, Request, Trip
from mcp_orchestrator.pipeline.stages import LIGHT_STAGES, Stages
from mcp_orchestrator.pipeline.status import live_metrics, pipeline_status
from mcp_orchestrator.resilience.cache import ResultCache
from mcp_orchestrator.resilience.retry import AnyioClock, Clock, loop_clock
from mcp_orchestrator.workers.base import Worker

if TYPE_CHECKING:
    from mcp_orchestrator.pipeline.sharing import Sharing

RESTART_KEYS = (
    "stages.rag.channel_capacity",
    "stages.assemble.channel_capacity",
    "stages.post_process.channel_capacity",
    "stages.stream.channel_capacity",
    "stages.inference.concurrency",
    "deduplication.window_s",
    "deduplication.max_entries",
    "deduplication.max_bytes",
)
"""Settings the pipeline fixes when it starts: memory streams are sized once, the inference
tasks are started once, and the result cache is sized once."""

LIVE_KEYS = (
    "pipeline.default_deadline_ms",
    "pipeline.dead_letter_capacity",
    "pipeline.dead_letter_max_bytes",
    "pipeline.priority_aging_ms",
    "stages.rag.enabled",
    "stages.rag.timeout_ms",
    "stages.rag.max_context_tokens",
    "stages.rag.source",
    "stages.post_process.*",
    "stages.inference.channel_capacity",
    "stages.inference.timeout_ms",
    "stages.*.enabled",
    "resilience.*",
    "rate_limits.*",
    "deduplication.enabled",
)
"""Settings the pipeline applies at once on `reconfigure` (read per request, or pushed into
the part that holds them)."""


def matches(key: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in patterns)


class Pipeline:
    def __init__(
        self,
        config: Config,
        worker: Worker,
        *,
        context_source: ContextSource | None = None,
        metrics: Metrics | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.config = config
        self.clock: Clock = clock or AnyioClock()
        """Time for retry waits, breakers and the cache (injectable, so tests need not sleep)."""
        self.metrics = metrics or Metrics()
        self._time: Callable[[], float] = anyio.current_time
        """The event loop's clock (cancel scopes and deadlines use it); a cheaper reader once running."""
        now = self.clock.now
        dedup = config.deduplication
        self.dead_letters = DeadLetterQueue(config.pipeline.dead_letter_capacity, config.pipeline.dead_letter_max_bytes)
        self.cache: ResultCache[CachedAnswer] = ResultCache(
            dedup.max_entries, dedup.window_s, clock=now, max_bytes=dedup.max_bytes, size_of=CachedAnswer.size
        )
        self.breakers = Breakers(config.resilience.breaker_settings(), self.clock, self.metrics)
        self.lease = WorkerLease(worker, self.breakers, self.metrics)
        self.trips: Trips
        self.ledger = Ledger(self.metrics, left=lambda request: self.trips.left(request))
        self.trips = Trips(self.ledger, self.dead_letters, self.cache, self.metrics, self._loop_time)
        aging_s = config.pipeline.priority_aging_ms / 1000
        self.stages = Stages(
            config.stages,
            self.trips,
            self.metrics,
            aging_s=aging_s,
            deadline_ms=self._deadline_ms,
            clock=self._loop_time,
            now=now,
        )
        self.stages.context_source = context_source
        self.trips.hooks = TripHooks(self.stages.discard, self.stages.promote)
        self.dispatch = Dispatch(
            config.stages.inference,
            config.resilience,
            self.stages,
            self.lease,
            clock=self.clock,
            metrics=self.metrics,
            deadline_ms=self._deadline_ms,
        )
        self.admission = Admission(
            dedup,
            config.rate_limits,
            RateLimits(config.rate_limits, aging_s=aging_s, clock=now),
            ledger=self.ledger,
            trips=self.trips,
            stages=self.stages,
            cache=self.cache,
            lease=self.lease,
            clock=self._loop_time,
        )
        self.concurrency = config.stages.inference.concurrency
        self.started_at: float | None = None
        self.event_loop: EventLoopName | None = None
        """The event loop the pipeline runs on (None before it starts)."""
        self._task_group: TaskGroup | None = None
        self.sharing = self._sharing(config)
        """Sharing with other processes through Redis ([distributed] redis_url), or None."""
        self.metrics.add_live_gauges(self._live_metrics)

    # ------------------------------------------------------------------ lifecycle

    @property
    def running(self) -> bool:
        return self._task_group is not None

    @property
    def worker(self) -> Worker:
        return self.lease.worker

    @property
    def context_source(self) -> ContextSource | None:
        return self.stages.context_source

    def _sharing(self, config: Config) -> Sharing | None:
        url = config.distributed.url(os.environ)
        if url is None:
            return None
        from mcp_orchestrator.pipeline.sharing import build_sharing  # Redis is imported only when used

        sharing = build_sharing(url, config, lambda: self.config, self.lease, self.breakers, self.dead_letters)
        self.admission.sharing = sharing
        sharing.admission = self.admission
        return sharing

    async def claim_replay(self, letter_id: str) -> str | None:
        """Claim the one replay of a dead letter: across every process when sharing through
        Redis (its token), else in this one (ReplayRefused when another replay has it)."""
        if self.sharing is not None:
            return await self.sharing.claim_replay(letter_id)
        if not self.dead_letters.claim(letter_id):
            raise ReplayRefused(letter_id, "already replayed by this process")
        return None

    async def release_replay(self, letter_id: str, token: str | None) -> None:
        """Give back the claim of a replay that was refused before it ran (rate limited, shutting
        down): the letter may be replayed again."""
        if self.sharing is not None and token is not None:
            await self.sharing.release_replay(letter_id, token)
        else:
            self.dead_letters.release(letter_id)

    @asynccontextmanager
    async def _run_shared(self) -> AsyncIterator[None]:
        """Run with sharing's background tasks around the pipeline's (they outlive its last trip)."""
        if self.sharing is None:
            async with self._run():
                yield
        else:
            async with self.sharing.shared.running(), self._run():
                yield

    async def __aenter__(self) -> Pipeline:
        self._exit_stack = self._run_shared()
        await self._exit_stack.__aenter__()
        return self

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        return await self._exit_stack.__aexit__(*exc_info)

    @asynccontextmanager
    async def _run(self) -> AsyncIterator[None]:
        self.stages.open()
        self._time = self.dispatch.loop_time = loop_clock()
        self.started_at = self._time()
        self.event_loop = running_loop()
        try:
            async with anyio.create_task_group() as tg:
                self._task_group = tg
                self.admission.start(self._spawn)
                self.lease.start(self._close_later)
                for stage in LIGHT_STAGES:
                    await tg.start(self.stages.run, stage, name=f"stage:{stage.value}")
                for index in range(self.concurrency):
                    tg.start_soon(self.dispatch.run, name=f"stage:inference:{index}")
                try:
                    yield
                finally:
                    self._task_group = None
                    self.admission.start(None)
                    tg.cancel_scope.cancel()
        finally:
            self.trips.abandon_all(PipelineNotRunning())
            self.stages.close()
            await self.lease.aclose()

    def _close_later(self, worker: Worker) -> None:
        if self._task_group is not None:
            self._task_group.start_soon(close_quietly, worker)

    def _spawn(self, work: Callable[[Trip], Coroutine[Any, Any, None]], trip: Trip) -> None:
        if self._task_group is not None:
            self._task_group.start_soon(work, trip)

    # ------------------------------------------------------------------ a caller's side

    async def infer(self, submission: Submission, on_chunk: ChunkSink | None = None) -> InferResult:
        """Run one request through every stage and return its result (or raise why not)."""
        return await self.wait(self.submit(submission, on_chunk))

    def submit(
        self, submission: Submission, on_chunk: ChunkSink | None = None, *, job_id: str | None = None
    ) -> Request:
        """Start a request; `wait` for its result. Raises PipelineNotRunning when stopped.
        `job_id`: the task or background request it belongs to (named in its dead letter)."""
        if self._task_group is None:
            raise PipelineNotRunning()
        now = self._time()
        deadline_ms = submission.deadline_ms or self.config.pipeline.default_deadline_ms
        request = self.ledger.open(submission, now, now + deadline_ms / 1000, on_chunk, job_id)
        self.admission.admit(request, now)
        return request

    async def wait(self, request: Request) -> InferResult:
        """The request's result, or its error raised. Leaving early (cancellation) or past the
        request's deadline ends it: the others waiting on its trip are not affected."""
        if not request.done.is_set():  # an answer already there needs no deadline timer
            try:
                with anyio.CancelScope(deadline=request.deadline):
                    await request.done.wait()
            except anyio.get_cancelled_exc_class():
                self.ledger.end(request, Outcome.cancelled, self._time())
                raise
            if request.outcome is None:
                deadline_ms = request.submission.deadline_ms or self.config.pipeline.default_deadline_ms
                self.trips.expire(request, DeadlineExceeded(deadline_ms, request.where.value))
        if request.outcome is Outcome.completed:
            return self._result(request)
        assert request.error is not None
        raise request.error

    def locate(self, request: Request) -> Whereabouts:
        """Where a request is now: its stage, its place in the inference queue while it waits
        there, and the chunks its answer has streamed so far."""
        trip = request.trip
        if request.ended or trip is None:
            return Whereabouts(request.where, None, 0, request.ended)
        position = self.stages.inference.position(trip) if trip.stage is StageName.inference else None
        return Whereabouts(trip.stage, position, trip.chunks, False)

    def _result(self, request: Request) -> InferResult:
        answer = request.answer
        assert answer is not None
        timings = request.stage_ms or {}
        return InferResult(
            request_id=request.id,
            text=answer.text,
            worker=answer.worker,
            model=answer.model,
            usage=answer.usage or Usage(),
            finish_reason=answer.finish_reason,
            latency_ms=round((request.ended_at - request.submitted_at) * 1000, 3),
            stage_ms=StageTimings(**{stage: round(ms, 3) for stage, ms in timings.items()}),
            attempts=request.attempts,
            provenance=answer.provenance,
            coalesced=request.coalesced,
            cached=request.cached,
        )

    # ------------------------------------------------------------------ shutting down

    def stop_admitting(self) -> None:
        """New requests are refused (ShuttingDown); requests in flight carry on."""
        self.admission.stop_admitting()

    def cancel_in_flight(self, error: Callable[[], RequestError]) -> int:
        """End every request in flight as cancelled, its caller getting its own `error()`
        (a shutdown whose grace ran out). Returns how many there were."""
        live = list(self.ledger.live.values())
        now = self._time()
        for request in live:
            self.ledger.end(request, Outcome.cancelled, now, error())
        return len(live)

    # ------------------------------------------------------------------ changing it while it runs

    async def swap_worker(self, worker: Worker) -> Worker:
        """Make `worker` serve new requests; requests already running finish on the old one.
        The new worker is health-checked first; if that fails, nothing changes."""
        return await self.lease.swap(worker, on_swapped=self.cache.clear)

    @staticmethod
    def needs_restart(key: str) -> bool | None:
        """True for a setting the pipeline fixes at start, False for one it applies live,
        None for one it does not hold."""
        if matches(key, RESTART_KEYS):
            return True
        if matches(key, LIVE_KEYS):
            return False
        return None

    def reconfigure(self, config: Config, context_source: ContextSource | None) -> None:
        """Apply `config`'s live settings to the running parts (RESTART_KEYS must hold their
        running values in it: the caller reverted them). Nothing here can fail."""
        old = self.config
        self.config = config
        aging_s = config.pipeline.priority_aging_ms / 1000
        self.dead_letters.capacity = config.pipeline.dead_letter_capacity
        self.dead_letters.max_bytes = config.pipeline.dead_letter_max_bytes
        self.stages.sections = config.stages
        self.stages.context_source = context_source
        self.stages.inference.capacity = config.stages.inference.channel_capacity
        if self.stages.inference.aging_s != aging_s:
            self.stages.inference.aging_s = aging_s
        self.dispatch.reconfigure(config.stages.inference, config.resilience)
        if config.resilience != old.resilience:
            self.breakers.update(config.resilience.breaker_settings())
        admission = self.admission
        admission.dedup, admission.rate_limits = config.deduplication, config.rate_limits
        if config.rate_limits != old.rate_limits or aging_s != old.pipeline.priority_aging_ms / 1000:
            admission.limits = admission.limits.replaced(config.rate_limits, aging_s)
        if config.stages.rag != old.stages.rag or config.stages.post_process != old.stages.post_process:
            self.cache.clear()  # cached answers were made with the old retrieval or post-processing
        if not admission.shares_answers():
            self.cache.clear()

    # ------------------------------------------------------------------ reading the state

    def clock_advanced(self) -> None:
        """Tell requests waiting for a rate-limit token to look at their bucket again (only a
        fake clock that jumps, in tests, needs this; the real clock wakes them on time)."""
        self.admission.limits.clock_advanced()

    def status(self) -> PipelineStatus:
        return pipeline_status(self)

    def reconciles(self) -> bool:
        """The conservation law: submitted == completed + failed + shed + cancelled + in flight."""
        return self.ledger.reconciles()

    def uptime_s(self) -> float:
        return 0.0 if self.started_at is None else round(self._time() - self.started_at, 3)

    def _deadline_ms(self, trip: Trip) -> float:
        return trip.submission.deadline_ms or self.config.pipeline.default_deadline_ms

    def _loop_time(self) -> float:
        return self._time()

    def _live_metrics(self) -> Iterable[Metric]:
        return live_metrics(self)
