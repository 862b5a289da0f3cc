"""The pipeline: one task group, five stages, bounded queues between them.

    submit -> [rag] -> [assemble] -> [inference x concurrency] -> [post_process] -> [stream] -> caller

Each arrow is a bounded queue (anyio memory object streams; the queue in front of
inference is a bounded priority queue so higher classes go first). A full queue
never blocks the stage before it: the request is shed to the dead-letter queue
and its caller is told at once. Every request ends in exactly one of completed,
failed, shed or cancelled, and `Counters.reconciles()` checks that at any time.
"""

from __future__ import annotations

import itertools
import logging
import secrets
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from prometheus_client.core import Metric

from mcp_orchestrator.config import Config
from mcp_orchestrator.errors import (
    DeadlineExceeded,
    OrchestratorError,
    PipelineNotRunning,
    RateLimited,
    RequestShed,
    StageTimeout,
    WorkerFailed,
)
from mcp_orchestrator.logs import Sampled
from mcp_orchestrator.metrics import Metrics, counter, gauge
from mcp_orchestrator.models import (
    STAGE_ORDER,
    BreakerStatus,
    DeadLetterReason,
    InferResult,
    Outcome,
    Percentiles,
    PipelineStatus,
    StageName,
    StageStatus,
    StageTimings,
    Submission,
    Totals,
    Usage,
)
from mcp_orchestrator.pipeline.admission import Admission
from mcp_orchestrator.pipeline.breakers import Breakers
from mcp_orchestrator.pipeline.coalesce import CachedAnswer, Flight, FlightTable, answer_key
from mcp_orchestrator.pipeline.dead_letters import DeadLetterQueue
from mcp_orchestrator.pipeline.guard import (
    GuardedWorker,
    leaves,
)
from mcp_orchestrator.pipeline.inference import InferenceCall
from mcp_orchestrator.pipeline.priority import PriorityQueue, QueueFull
from mcp_orchestrator.pipeline.request import ChunkSink, Request
from mcp_orchestrator.pipeline.stages import ContextSource, assemble_messages, post_process, trim_context
from mcp_orchestrator.resilience.cache import ResultCache
from mcp_orchestrator.resilience.retry import AnyioClock, Clock, loop_clock
from mcp_orchestrator.workers.base import Worker

log = logging.getLogger(__name__)

LATENCY_WINDOW = 4096
HEALTH_TIMEOUT_S = 10.0
SHED_LOG_INTERVAL_S = 5.0
BATCH = 256
"""Requests a stage takes from its queue before it lets other tasks run."""


@dataclass
class Counters:
    submitted: int = 0
    completed: int = 0
    failed: int = 0
    shed: int = 0
    cancelled: int = 0
    coalesced: int = 0
    cache_hits: int = 0
    rate_limited: int = 0
    """Refused by admission control (also counted in failed)."""

    def ended(self) -> int:
        return self.completed + self.failed + self.shed + self.cancelled


@dataclass
class StageCounters:
    processed: int = 0
    shed: int = 0


@dataclass
class _Lease:
    """How many requests are running on one worker, and whether it has been swapped out."""

    worker: Worker
    guarded: Worker
    """The same worker with each backend behind its circuit breaker: what requests call."""
    active: int = 0
    retired: bool = False


@dataclass
class _Queues:
    """The stage inputs. Memory object streams, except the priority queue before inference."""

    send: dict[StageName, MemoryObjectSendStream[Request]] = field(default_factory=dict)
    receive: dict[StageName, MemoryObjectReceiveStream[Request]] = field(default_factory=dict)
    inference: PriorityQueue[Request] | None = None


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
        """Time for retry waits and breaker timeouts (injectable, so tests need not sleep)."""
        self.context_source = context_source
        self.metrics = metrics or Metrics()
        self.breakers = Breakers(lambda: self.config.resilience, self.clock, self.metrics)
        self.dead_letters = DeadLetterQueue(config.pipeline.dead_letter_capacity)
        self.counters = Counters()
        self.stage_counters = {stage: StageCounters() for stage in STAGE_ORDER}
        self.live: dict[str, Request] = {}
        self.latencies_ms: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self.input_tokens = 0
        self.output_tokens = 0
        self.started_at: float | None = None
        self._lease = self._new_lease(worker)
        self._queues = _Queues()
        self._task_group: TaskGroup | None = None
        self._seq = itertools.count()
        self._work: dict[StageName, Callable[[Request, bool], None]] = {
            StageName.rag: self._rag,
            StageName.assemble: self._assemble,
            StageName.post_process: self._post_process,
            StageName.stream: self._stream,
        }
        self._idle: dict[StageName, bool] = {}
        """Light stages whose task waits on an empty queue (a request may skip the hop)."""
        self._time: Callable[[], float] = anyio.current_time
        """The event loop's clock (cancel scopes and deadlines use it); a cheaper reader once running."""
        self._id_prefix = secrets.token_hex(10)
        """Request ids are this random prefix plus a counter: unique, and cheaper than a uuid each."""
        self._swap_lock = anyio.Lock()
        self._shed_log = Sampled(SHED_LOG_INTERVAL_S, clock=self._now)
        """One warning per stage and interval while shedding (thousands a second otherwise)."""
        self.admission = Admission(
            config.rate_limits, aging_s=config.pipeline.priority_aging_ms / 1000, clock=self._now
        )
        dedup = config.deduplication
        self.cache: ResultCache[CachedAnswer] = ResultCache(dedup.max_entries, dedup.window_s, clock=self._now)
        self.flights = FlightTable()
        self._worker_generation = 0
        """Bumped by each worker swap and part of every answer key: answers never cross workers."""
        # Series looked up once: a labels() call per request is a measurable cost.
        self._stage_metric = {
            name: self.metrics.stage_duration.labels(name) for name in [*(s.value for s in STAGE_ORDER), "admission"]
        }
        self._latency_metric = self.metrics.request_duration.labels()
        self.metrics.add_live_gauges(self._live_gauges)
        self.metrics.add_live_gauges(self._request_counters)
        self.metrics.add_live_gauges(self._admission_gauges)
        self.metrics.add_live_gauges(self._breaker_gauges)

    # ------------------------------------------------------------------ lifecycle

    @property
    def running(self) -> bool:
        return self._task_group is not None

    @property
    def worker(self) -> Worker:
        return self._lease.worker

    async def __aenter__(self) -> Pipeline:
        self._exit_stack = self._run()
        await self._exit_stack.__aenter__()
        return self

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        return await self._exit_stack.__aexit__(*exc_info)

    @asynccontextmanager
    async def _run(self) -> AsyncIterator[None]:
        stages = self.config.stages
        for stage in (StageName.rag, StageName.assemble, StageName.post_process, StageName.stream):
            capacity = getattr(stages, stage.value).channel_capacity
            send, receive = anyio.create_memory_object_stream[Request](capacity)
            self._queues.send[stage] = send
            self._queues.receive[stage] = receive
        self._queues.inference = PriorityQueue(
            stages.inference.channel_capacity, self.config.pipeline.priority_aging_ms / 1000
        )
        self._time = loop_clock()
        self.started_at = self._time()
        try:
            async with anyio.create_task_group() as tg:
                self._task_group = tg
                tg.start_soon(self._light_stage, StageName.rag, name="stage:rag")
                tg.start_soon(self._light_stage, StageName.assemble, name="stage:assemble")
                for index in range(stages.inference.concurrency):
                    tg.start_soon(self._inference_loop, name=f"stage:inference:{index}")
                tg.start_soon(self._light_stage, StageName.post_process, name="stage:post_process")
                tg.start_soon(self._light_stage, StageName.stream, name="stage:stream")
                try:
                    yield
                finally:
                    self._task_group = None
                    tg.cancel_scope.cancel()
        finally:
            self._abandon_live()
            for stream in self._queues.send.values():
                stream.close()
            for receiver in self._queues.receive.values():
                receiver.close()
            with anyio.CancelScope(shield=True), anyio.move_on_after(HEALTH_TIMEOUT_S):
                await self._lease.worker.aclose()

    def _abandon_live(self) -> None:
        for request in list(self.live.values()):
            self._fail(request, PipelineNotRunning(), DeadLetterReason.internal_error, record=False)

    # ------------------------------------------------------------------ the caller's side

    async def infer(self, submission: Submission, on_chunk: ChunkSink | None = None) -> InferResult:
        """Run one request through every stage and return its result (or raise why not)."""
        request = self.submit(submission, on_chunk)
        return await self.wait(request)

    def submit(self, submission: Submission, on_chunk: ChunkSink | None = None) -> Request:
        if self._task_group is None:
            raise PipelineNotRunning()
        now = self._time()
        deadline_ms = submission.deadline_ms or self.config.pipeline.default_deadline_ms
        request = Request(
            id=f"{self._id_prefix}{next(self._seq):012x}",
            submission=submission,
            submitted_at=now,
            deadline=now + deadline_ms / 1000,
            rank=submission.priority.rank,
            on_chunk=on_chunk,
            caller_deadline=now + deadline_ms / 1000,
            stage_entered_at=now,
        )
        self.counters.submitted += 1
        self.live[request.id] = request
        self._admit(request, now)
        return request

    async def wait(self, request: Request) -> InferResult:
        if not request.done.is_set():  # an answer already there needs no deadline timer
            try:
                with anyio.CancelScope(deadline=request.caller_deadline):
                    await request.done.wait()
            except anyio.get_cancelled_exc_class():
                self._leave(request, Outcome.cancelled)
                raise
        if not request.finished:
            deadline_ms = request.submission.deadline_ms or self.config.pipeline.default_deadline_ms
            where = request.flight.leader.stage if request.flight is not None else request.stage
            error = DeadlineExceeded(deadline_ms, where.value)
            if self._leave(request, Outcome.failed, error):
                raise error
        if request.outcome is Outcome.completed:
            return self._result(request)
        assert request.error is not None
        raise request.error

    # ------------------------------------------------------------------ admission: cache, coalescing, rate limit

    def _admit(self, request: Request, now: float) -> None:
        """Answer from the cache, or join an identical request in flight, or pass the rate
        limit and enter the RAG queue. In that order: only a request that will call the
        backend spends a token or a queue slot, so a burst of identical calls costs one of each."""
        submission = request.submission
        if self._shares_answers() and (submission.cache or submission.dedup):
            key = request.key = self._answer_key(request)
            if submission.cache:
                answer = self.cache.get(key)
                if answer is not None:
                    self._answer_from_cache(request, answer, now)
                    return
            if submission.dedup:
                flight = self.flights.find(key)
                if flight is not None:
                    self._join(flight, request)
                    return
                request.flight = self.flights.open(key, request, request.on_chunk)
                request.on_chunk = request.flight.broadcast
        self._enter(request, now)

    def _enter(self, request: Request, now: float) -> None:
        """Pass the rate limit (now, or by waiting for a token) and enter the RAG queue."""
        submission = request.submission
        budget = request.deadline - now - self.config.rate_limits.min_remaining_ms / 1000
        try:
            admitted = self.admission.admit_now(request.rank, submission.session_id, budget)
        except RateLimited as exc:
            self._settle(request, Outcome.failed, exc)
            return
        if admitted:
            self._forward(request, StageName.rag, now)
        elif self._task_group is None:  # shutting down: nothing will admit it
            self._settle(request, Outcome.failed, PipelineNotRunning())
        else:
            self._task_group.start_soon(self._wait_for_admission, request)

    def _shares_answers(self) -> bool:
        """Coalescing and caching key on the assembled messages, known at admission only when
        no context source can add retrieved passages to them."""
        rag_active = self.context_source is not None and self.config.stages.rag.enabled
        return self.config.deduplication.enabled and not rag_active

    def _answer_key(self, request: Request) -> str:
        """Unset parameters stay unset in the key: the worker fills them from its own settings,
        which cannot change without a worker swap, and a swap changes the generation. The
        messages are kept: with no context source they are what the assemble stage builds."""
        worker, submission = self._lease.worker, request.submission
        messages = request.messages = assemble_messages(submission.prompt, submission.system, [])
        return answer_key(f"{worker.kind}#{self._worker_generation}", worker.model, messages, submission.params)

    def _answer_from_cache(self, request: Request, answer: CachedAnswer, now: float) -> None:
        """A cache hit skips every stage: the cached text was post-processed with the same
        stop sequences (they are in the key) and no context source is active."""
        request.text, request.usage, request.finish_reason = answer.text, answer.usage(), answer.finish_reason
        request.worker, request.model, request.provenance = answer.worker, answer.model, answer.provenance()
        request.cached = True
        request.stage_entered_at = now
        self.counters.cache_hits += 1
        if request.on_chunk is not None and answer.text:
            request.on_chunk(answer.text)
        self._settle(request, Outcome.completed)

    def _join(self, flight: Flight, request: Request) -> None:
        """Wait on `flight` instead of travelling; the trip now lasts as long as its latest caller allows."""
        request.flight = flight
        request.coalesced = True
        flight.join(request, request.on_chunk)
        leader = flight.leader
        leader.deadline = max(leader.deadline, request.deadline)
        if request.rank < leader.rank:
            self._promote(leader, request.rank)

    def _promote(self, leader: Request, rank: int) -> None:
        """The trip now carries a more urgent caller: it travels in that caller's class from
        here on, and moves up the inference queue if it waits there. (A wait for a rate-limit
        token already begun keeps its place; a new attempt uses the new class.)"""
        raised_by = leader.rank - rank
        leader.rank = rank
        queue = self._queues.inference
        if leader.stage is StageName.inference and queue is not None:
            queue.promote(leader, raised_by)

    async def _wait_for_admission(self, request: Request) -> None:
        """Wait for rate-limit tokens in the pipeline's task group, not the caller's task, so a
        flight leader whose caller leaves keeps its place in line for its followers."""
        submission = request.submission
        with anyio.CancelScope() as scope:  # settle() cancels it: nobody waits any more
            request.admission_scope = scope
            try:
                while True:
                    deadline = request.deadline
                    budget = deadline - self._time() - self.config.rate_limits.min_remaining_ms / 1000
                    try:
                        await self.admission.admit(request.rank, submission.session_id, budget)
                        break
                    except RateLimited as exc:
                        if request.deadline > deadline:
                            continue  # a follower with more time joined meanwhile: try again for it
                        self._settle(request, Outcome.failed, exc)
                        return
            finally:
                request.admission_scope = None
        if scope.cancelled_caught or request.finished:
            return
        now = self._time()
        request.stage_ms["admission"] = (now - request.stage_entered_at) * 1000
        request.stage_entered_at = now
        self._forward(request, StageName.rag, now)

    def _leave(self, request: Request, outcome: Outcome, error: OrchestratorError | None = None) -> bool:
        """The caller stops waiting: cancelled (no error) or past its deadline (the error).

        A flight leader with followers still waiting is counted as ended for its caller but
        keeps travelling for them; returns True then (the request itself is not settled).
        """
        flight = request.flight
        if flight is None or flight.leader is not request or not flight.followers or request.finished:
            if error is None:
                self._settle(request, outcome)
            else:
                self._fail(request, error, DeadLetterReason.deadline_exceeded)
            return False
        request.caller_left = True
        flight.leave(request)  # no more chunks for a caller that is gone
        if error is not None:
            self.dead_letters.add(
                request.id, request.submission, request.stage, DeadLetterReason.deadline_exceeded, str(error)
            )
            self.metrics.errors.labels(request.stage.value, DeadLetterReason.deadline_exceeded.value).inc()
        self._count(request, outcome, error)
        return True

    def _land(self, flight: Flight, leader: Request) -> None:
        """The leader ended: its outcome is every follower's. Only a completed answer is cached."""
        self.flights.close(flight)
        followers = flight.land()
        if leader.outcome is not Outcome.completed:
            now = self._time()
            if isinstance(leader.error, DeadlineExceeded) and any(f.caller_deadline > now for f in followers):
                self._hand_over(flight.key, followers, now)
                return
            for follower in followers:
                self._settle(follower, leader.outcome or Outcome.failed, leader.error)
            return
        self._remember(leader)
        now = self._time()
        self.counters.coalesced += len(followers)
        for follower in followers:
            follower.text, follower.usage, follower.finish_reason = leader.text, leader.usage, leader.finish_reason
            follower.worker, follower.model, follower.provenance = leader.worker, leader.model, leader.provenance
            follower.stage_entered_at = now
            self._settle(follower, Outcome.completed)

    def _hand_over(self, key: str, followers: list[Request], now: float) -> None:
        """The trip ran out of its leader's own time (a stage already running keeps the deadline it
        started with), but some waiters still have theirs: the first of them travels now, the
        others wait on it. One more backend call, only in this case."""
        leader, *rest = followers
        leader.coalesced = False
        flight = leader.flight = self.flights.open(key, leader, leader.on_chunk)
        leader.on_chunk = flight.broadcast
        for follower in rest:
            self._join(flight, follower)
        self._enter(leader, now)

    def _remember(self, request: Request) -> None:
        if request.key is not None and request.submission.cache and not (request.cached or request.coalesced):
            self.cache.put(
                request.key,
                CachedAnswer.pack(
                    request.text,
                    request.usage,
                    request.finish_reason,
                    request.worker,
                    request.model,
                    request.provenance,
                ),
            )

    def _now(self) -> float:
        return self.clock.now()

    def _admission_gauges(self) -> Iterable[Metric]:
        waiting = float(self.admission.waiting())
        yield gauge("orchestrator_admission_waiting", "Requests waiting for a rate-limit token", [], [([], waiting)])
        entries = float(len(self.cache))
        yield gauge("orchestrator_cache_entries", "Answers held by the result cache", [], [([], entries)])
        flights = float(len(self.flights))
        yield gauge("orchestrator_flights", "Requests in flight that identical ones may join", [], [([], flights)])

    # ------------------------------------------------------------------ moving requests

    def _forward(self, request: Request, stage: StageName, now: float) -> None:
        """Hand `request` to `stage`'s queue without waiting; shed it if the queue is full."""
        if request.finished:
            return
        if stage is not StageName.rag:
            self.stage_counters[request.stage].processed += 1
        request.enter(stage, now)
        if self._idle.get(stage) and self._runs_inline(stage):
            # Nobody is queued ahead and the stage's task waits for work: do the stage's
            # (synchronous) work right here instead of a queue hop and a task switch.
            self._idle[stage] = False
            try:
                self._run_sync(stage, request)
            finally:
                self._idle[stage] = True
            return
        try:
            if stage is StageName.inference:
                assert self._queues.inference is not None
                self._queues.inference.put_nowait(request, request.rank, now)
            else:
                self._queues.send[stage].send_nowait(request)
                self._idle[stage] = False  # its task has work now
        except (anyio.WouldBlock, QueueFull):
            self._shed(request, stage)

    def _runs_inline(self, stage: StageName) -> bool:
        """Whether `stage`'s work is synchronous (RAG awaits its context source)."""
        return stage is not StageName.rag or self.context_source is None or not self.config.stages.rag.enabled

    def _shed(self, request: Request, stage: StageName) -> None:
        capacity = self._capacity(stage)
        letter = self.dead_letters.add(
            request.id, request.submission, stage, DeadLetterReason.queue_full, f"{stage.value} queue full ({capacity})"
        )
        self.stage_counters[stage].shed += 1
        self.metrics.shed.labels(stage.value).inc()
        self._settle(request, Outcome.shed, RequestShed(stage.value, capacity, letter.id))
        left_out = self._shed_log.take(stage)
        if left_out is not None:
            more = f" ({left_out} more shed there since the last such line)" if left_out else ""
            log.warning(
                "request %s shed at %s (queue full), dead letter %s%s", request.id, stage.value, letter.id, more
            )

    def _fail(
        self, request: Request, error: OrchestratorError, reason: DeadLetterReason, *, record: bool = True
    ) -> None:
        if request.finished:
            return
        if record:
            letter = self.dead_letters.add(request.id, request.submission, request.stage, reason, str(error))
            log.info("request %s failed in %s: %s (dead letter %s)", request.id, request.stage.value, error, letter.id)
        self.metrics.errors.labels(request.stage.value, reason.value).inc()
        self._settle(request, Outcome.failed, error)

    def _settle(self, request: Request, outcome: Outcome, error: BaseException | None = None) -> None:
        if not request.settle(outcome, error):
            return
        self._leave_inference_queue(request)
        if not request.caller_left:  # else counted when its caller left
            self._count(request, outcome, error)
        flight = request.flight
        if flight is None:
            if outcome is Outcome.completed:
                self._remember(request)
        elif flight.landed:
            pass
        elif flight.leader is request:
            self._land(flight, request)
        else:
            flight.leave(request)
            if flight.leader.caller_left and not flight.followers:
                # Nobody waits for this trip any more: stop it, backend call included.
                self._settle(flight.leader, Outcome.cancelled)

    def _leave_inference_queue(self, request: Request) -> None:
        """A request that ended while queued (cancelled, deadline) must not keep its place or count in the depth."""
        queue = self._queues.inference
        if request.stage is StageName.inference and queue is not None:
            queue.discard(request)

    def _count(self, request: Request, outcome: Outcome, error: BaseException | None) -> None:
        """Record how a caller's request ended: exactly once per submitted request."""
        del self.live[request.id]
        counters = self.counters
        if outcome is Outcome.completed:
            counters.completed += 1
        elif outcome is Outcome.failed:
            counters.failed += 1
        elif outcome is Outcome.shed:
            counters.shed += 1
        else:
            counters.cancelled += 1
        if isinstance(error, RateLimited):
            self.counters.rate_limited += 1
            self.metrics.rate_limited.labels(error.scope).inc()

    # ------------------------------------------------------------------ the stages

    async def _light_stage(self, stage: StageName) -> None:
        """Run the stage's work on each request of its queue, in order.

        The light stages are synchronous (no await, so no timeout can fire inside them);
        only RAG with a context source awaits, and it runs under its timeout. While the
        queue is empty the stage is marked idle, and `_forward` runs the next request's
        work at once in the handing task (see there). Up to BATCH queued requests are
        taken per checkpoint.
        """
        async with self._queues.receive[stage] as receive:
            taken = 0
            while True:
                try:
                    request = receive.receive_nowait()
                except anyio.WouldBlock:
                    self._idle[stage] = True
                    try:
                        request = await receive.receive()
                    except anyio.EndOfStream:
                        return
                    finally:
                        self._idle[stage] = False
                    taken = 0
                if self._runs_inline(stage):
                    self._run_sync(stage, request)
                else:
                    await self._run_retrieval(request)
                taken += 1
                if taken >= BATCH:  # let other tasks run between long batches
                    taken = 0
                    await anyio.lowlevel.checkpoint()

    async def _run_retrieval(self, request: Request) -> None:
        """RAG with a context source: retrieve under the stage timeout, then the stage's work."""
        if request.finished:
            return
        try:
            await self._retrieve(request)
        except Exception as exc:  # a broken context source fails one request, not the pipeline
            self._stage_failed(StageName.rag, request, exc)
            return
        self._run_sync(StageName.rag, request)

    def _run_sync(self, stage: StageName, request: Request) -> None:
        if request.finished:
            return
        try:
            self._work[stage](request, getattr(self.config.stages, stage).enabled)
        except Exception as exc:  # a bug in a stage must fail one request, not the pipeline
            self._stage_failed(stage, request, exc)

    def _stage_failed(self, stage: StageName, request: Request, exc: Exception) -> None:
        log.exception("stage %s failed on request %s", stage.value, request.id)
        error = OrchestratorError(f"internal error in the {stage.value} stage: {exc}")
        self._fail(request, error, DeadLetterReason.internal_error)

    async def _retrieve(self, request: Request) -> None:
        assert self.context_source is not None
        section = self.config.stages.rag  # read per request: a config reload may change it
        timeout_ms = section.timeout_ms
        submission = request.submission
        budget = min(timeout_ms / 1000, request.deadline - self._time())
        with anyio.move_on_after(max(budget, 0)) as scope:
            found = await self.context_source.retrieve(
                submission.prompt, submission.session_id, section.max_context_tokens
            )
            request.context = trim_context(found, section.max_context_tokens)
        if scope.cancelled_caught:
            self._timed_out(request, timeout_ms)

    def _timed_out(self, request: Request, stage_timeout_ms: float) -> None:
        if self._time() >= request.deadline:
            deadline_ms = request.submission.deadline_ms or self.config.pipeline.default_deadline_ms
            self._fail(request, DeadlineExceeded(deadline_ms, request.stage.value), DeadLetterReason.deadline_exceeded)
        else:
            self._fail(request, StageTimeout(request.stage.value, stage_timeout_ms), DeadLetterReason.stage_timeout)

    def _rag(self, request: Request, enabled: bool) -> None:
        self._forward(request, StageName.assemble, self._time())

    def _assemble(self, request: Request, enabled: bool) -> None:
        if request.context or not request.messages:
            submission = request.submission
            request.messages = assemble_messages(submission.prompt, submission.system, request.context)
        self._forward(request, StageName.inference, self._time())

    def _post_process(self, request: Request, enabled: bool) -> None:
        if enabled:
            section = self.config.stages.post_process
            text, truncated = post_process(
                request.text, request.submission.params.stop, section.max_output_chars, section.strip_whitespace
            )
            if truncated and request.finish_reason in (None, "length"):
                request.finish_reason = "stop" if request.submission.params.stop else "length"
            request.text = text
        self._forward(request, StageName.stream, self._time())

    def _stream(self, request: Request, enabled: bool) -> None:
        now = self._time()
        request.enter(request.stage, now)  # closes the stream stage's own timing
        self.stage_counters[StageName.stream].processed += 1
        latency_ms = (now - request.submitted_at) * 1000
        self.latencies_ms.append(latency_ms)
        self._latency_metric.observe(latency_ms / 1000)
        histograms = self._stage_metric
        for stage, ms in request.stage_ms.items():
            histograms[stage].observe(ms / 1000)
        self._settle(request, Outcome.completed)

    # ------------------------------------------------------------------ inference

    async def _inference_loop(self) -> None:
        queue = self._queues.inference
        assert queue is not None
        while True:
            request = await queue.get()
            if not request.finished:
                await self._infer_one(request)

    async def _infer_one(self, request: Request) -> None:
        lease = self._lease
        lease.active += 1
        try:
            await self._call_worker(request, lease.guarded)
        finally:
            lease.active -= 1
            if lease.retired and lease.active == 0:
                self._close_later(lease.worker)

    async def _call_worker(self, request: Request, worker: Worker) -> None:
        """Run the request's backend call (retries, breakers, timeouts: see inference.py) and
        hand the answer on, or fail the request with the error the caller should see."""
        request.worker, request.model = worker.kind, worker.model
        call = InferenceCall(request, worker, self.config, self.clock, self.metrics, self._time)
        outcome = await call.run()
        request.attempts = call.trace.attempts
        if request.finished or outcome is None:  # the caller gave up (deadline or cancellation)
            return
        if outcome.error is not None or outcome.answer is None:
            error = outcome.error or WorkerFailed(f"{worker.kind}: no answer")
            self._fail(request, error, outcome.reason)
            return
        answer = outcome.answer
        request.text = "".join(answer.parts)
        request.usage, request.finish_reason = answer.usage, answer.finish_reason
        request.provenance = call.provenance()
        usage = request.usage
        if usage is not None:
            self.input_tokens += usage.input_tokens
            self.output_tokens += usage.output_tokens
        self._forward(request, StageName.post_process, self._time())

    # ------------------------------------------------------------------ breakers

    def _new_lease(self, worker: Worker) -> _Lease:
        still_running = self._lease.guarded if hasattr(self, "_lease") else None
        return _Lease(worker, self.breakers.guard(worker, still_running))

    def apply_resilience(self) -> None:
        """Push the current [resilience] settings into the live breakers (config reload)."""
        self.breakers.apply_settings()

    def current_breakers(self) -> list[GuardedWorker]:
        return leaves(self._lease.guarded)

    def breaker_status(self) -> list[BreakerStatus]:
        return self.breakers.status(self._lease.guarded)

    def _breaker_gauges(self) -> Iterable[Metric]:
        return self.breakers.gauges(self.current_breakers())

    # ------------------------------------------------------------------ worker swap

    async def swap_worker(self, worker: Worker) -> Worker:
        """Make `worker` serve new requests; requests already running finish on the old one.

        The new worker is health-checked first; if that fails, nothing changes.
        """
        async with self._swap_lock:
            with anyio.fail_after(HEALTH_TIMEOUT_S):
                await worker.health()
            old = self._lease
            self._lease = self._new_lease(worker)
            self._worker_generation += 1
            self.cache.clear()
            old.retired = True
            self.metrics.worker_swaps.inc()
            if old.active == 0:
                self._close_later(old.worker)
            return old.worker

    def _close_later(self, worker: Worker) -> None:
        if self._task_group is not None:
            self._task_group.start_soon(self._close_worker, worker)

    @staticmethod
    async def _close_worker(worker: Worker) -> None:
        with anyio.move_on_after(HEALTH_TIMEOUT_S):
            await worker.aclose()

    # ------------------------------------------------------------------ reading the state

    def _result(self, request: Request) -> InferResult:
        return InferResult(
            request_id=request.id,
            text=request.text,
            worker=request.worker,
            model=request.model,
            usage=request.usage or Usage(),
            finish_reason=request.finish_reason,
            latency_ms=round((request.stage_entered_at - request.submitted_at) * 1000, 3),
            stage_ms=StageTimings(**{k: round(v, 3) for k, v in request.stage_ms.items()}),
            attempts=request.attempts,
            provenance=request.provenance,
            coalesced=request.coalesced,
            cached=request.cached,
        )

    def _capacity(self, stage: StageName) -> int:
        return int(getattr(self.config.stages, stage.value).channel_capacity)

    def depth(self, stage: StageName) -> int:
        if stage is StageName.inference:
            return len(self._queues.inference) if self._queues.inference is not None else 0
        receive = self._queues.receive.get(stage)
        return receive.statistics().current_buffer_used if receive is not None else 0

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

    def uptime_s(self) -> float:
        return 0.0 if self.started_at is None else round(self._time() - self.started_at, 3)

    def _live_gauges(self) -> Iterable[Metric]:
        yield gauge(
            "orchestrator_queue_depth",
            "Requests waiting in each stage queue",
            ["stage"],
            ((([stage.value]), float(self.depth(stage))) for stage in STAGE_ORDER),
        )
        yield gauge("orchestrator_in_flight", "Requests submitted and not yet ended", [], [([], float(len(self.live)))])

    def _request_counters(self) -> Iterable[Metric]:
        """Per-request counts, read from the pipeline's own counters at scrape time (see metrics.py)."""
        counters = self.counters
        yield counter(
            "orchestrator_requests",
            "Requests that ended, by outcome",
            ["outcome"],
            [([outcome.name], float(getattr(counters, outcome.name))) for outcome in Outcome],
        )
        yield counter(
            "orchestrator_tokens",
            "Tokens reported by backends",
            ["direction"],
            [(["input"], float(self.input_tokens)), (["output"], float(self.output_tokens))],
        )
        yield counter(
            "orchestrator_coalesced",
            "Requests answered by another in-flight request",
            [],
            [([], float(counters.coalesced))],
        )
        yield counter(
            "orchestrator_cache_hits", "Requests answered from the result cache", [], [([], float(counters.cache_hits))]
        )

    def status(self) -> PipelineStatus:
        stages = self.config.stages
        counters = self.counters
        return PipelineStatus(
            stages=[
                StageStatus(
                    name=stage,
                    depth=self.depth(stage),
                    capacity=self._capacity(stage),
                    processed=self.stage_counters[stage].processed,
                    shed=self.stage_counters[stage].shed,
                    enabled=bool(getattr(stages, stage.value).enabled),
                )
                for stage in STAGE_ORDER
            ],
            totals=Totals(
                submitted=counters.submitted,
                completed=counters.completed,
                failed=counters.failed,
                shed=counters.shed,
                cancelled=counters.cancelled,
                in_flight=len(self.live),
                coalesced=counters.coalesced,
                cache_hits=counters.cache_hits,
                dead_letters=len(self.dead_letters),
                backend_calls_saved=counters.coalesced + counters.cache_hits,
                rate_limited=counters.rate_limited,
            ),
            worker={**self.worker.describe(), "in_flight": self._lease.active},
            rate_limit=self.admission.status(),
            latency_ms=Percentiles(**self.latency_percentiles()),
            tokens=Usage(input_tokens=self.input_tokens, output_tokens=self.output_tokens),
            concurrency={"limit": stages.inference.concurrency, "busy": self._lease.active},
            uptime_s=self.uptime_s(),
            reconciles=self.reconciles(),
            breakers=self.breaker_status(),
        )
