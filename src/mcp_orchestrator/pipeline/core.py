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
import uuid
from collections import deque
from collections.abc import AsyncIterator, Iterable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from prometheus_client.core import Metric

from mcp_orchestrator.config import Config
from mcp_orchestrator.errors import (
    DeadlineExceeded,
    OrchestratorError,
    PipelineNotRunning,
    RequestShed,
    StageTimeout,
    WorkerFailed,
)
from mcp_orchestrator.metrics import Metrics, gauge
from mcp_orchestrator.models import (
    STAGE_ORDER,
    DeadLetterReason,
    InferResult,
    Outcome,
    Percentiles,
    PipelineStatus,
    RateLimitStatus,
    StageName,
    StageStatus,
    StageTimings,
    Submission,
    Totals,
    Usage,
)
from mcp_orchestrator.pipeline.dead_letters import DeadLetterQueue
from mcp_orchestrator.pipeline.priority import PriorityQueue, QueueFull
from mcp_orchestrator.pipeline.request import ChunkSink, Request
from mcp_orchestrator.pipeline.stages import ContextSource, assemble_messages, post_process, trim_context
from mcp_orchestrator.workers.base import Worker, WorkerError, WorkerRequest

log = logging.getLogger(__name__)

LATENCY_WINDOW = 4096
HEALTH_TIMEOUT_S = 10.0


@dataclass
class Counters:
    submitted: int = 0
    completed: int = 0
    failed: int = 0
    shed: int = 0
    cancelled: int = 0
    coalesced: int = 0
    cache_hits: int = 0

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
    ) -> None:
        self.config = config
        self.context_source = context_source
        self.metrics = metrics or Metrics()
        self.dead_letters = DeadLetterQueue(config.pipeline.dead_letter_capacity)
        self.counters = Counters()
        self.stage_counters = {stage: StageCounters() for stage in STAGE_ORDER}
        self.live: dict[str, Request] = {}
        self.latencies_ms: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self.tokens = Usage()
        self.started_at: float | None = None
        self._lease = _Lease(worker)
        self._queues = _Queues()
        self._task_group: TaskGroup | None = None
        self._seq = itertools.count()
        self._swap_lock = anyio.Lock()
        self.metrics.add_live_gauges(self._live_gauges)

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
        self.started_at = anyio.current_time()
        try:
            async with anyio.create_task_group() as tg:
                self._task_group = tg
                tg.start_soon(self._light_stage, StageName.rag, self._rag, name="stage:rag")
                tg.start_soon(self._light_stage, StageName.assemble, self._assemble, name="stage:assemble")
                for index in range(stages.inference.concurrency):
                    tg.start_soon(self._inference_loop, name=f"stage:inference:{index}")
                tg.start_soon(self._light_stage, StageName.post_process, self._post_process, name="stage:post_process")
                tg.start_soon(self._light_stage, StageName.stream, self._stream, name="stage:stream")
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
        now = anyio.current_time()
        deadline_ms = submission.deadline_ms or self.config.pipeline.default_deadline_ms
        request = Request(
            id=uuid.uuid4().hex,
            submission=submission,
            seq=next(self._seq),
            submitted_at=now,
            deadline=now + deadline_ms / 1000,
            on_chunk=on_chunk,
            stage_entered_at=now,
        )
        self.counters.submitted += 1
        self.live[request.id] = request
        self._forward(request, StageName.rag, now)
        return request

    async def wait(self, request: Request) -> InferResult:
        try:
            with anyio.CancelScope(deadline=request.deadline):
                await request.done.wait()
        except anyio.get_cancelled_exc_class():
            self._settle(request, Outcome.cancelled)
            raise
        if not request.finished:
            deadline_ms = request.submission.deadline_ms or self.config.pipeline.default_deadline_ms
            error = DeadlineExceeded(deadline_ms, request.stage.value)
            self._fail(request, error, DeadLetterReason.deadline_exceeded)
        if request.outcome is Outcome.completed:
            return self._result(request)
        assert request.error is not None
        raise request.error

    # ------------------------------------------------------------------ moving requests

    def _forward(self, request: Request, stage: StageName, now: float) -> None:
        """Hand `request` to `stage`'s queue without waiting; shed it if the queue is full."""
        if request.finished:
            return
        if stage is not StageName.rag:
            self.stage_counters[request.stage].processed += 1
        request.enter(stage, now)
        try:
            if stage is StageName.inference:
                assert self._queues.inference is not None
                self._queues.inference.put_nowait(request, request.submission.priority.rank, now)
            else:
                self._queues.send[stage].send_nowait(request)
        except (anyio.WouldBlock, QueueFull):
            self._shed(request, stage)

    def _shed(self, request: Request, stage: StageName) -> None:
        capacity = self._capacity(stage)
        letter = self.dead_letters.add(
            request.id, request.submission, stage, DeadLetterReason.queue_full, f"{stage.value} queue full ({capacity})"
        )
        self.stage_counters[stage].shed += 1
        self.metrics.shed.labels(stage.value).inc()
        self._settle(request, Outcome.shed, RequestShed(stage.value, capacity, letter.id))
        log.warning("request %s shed at %s (queue full), dead letter %s", request.id, stage.value, letter.id)

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
        del self.live[request.id]
        setattr(self.counters, outcome.name, getattr(self.counters, outcome.name) + 1)
        self.metrics.requests.labels(outcome.name).inc()

    # ------------------------------------------------------------------ the stages

    async def _light_stage(self, stage: StageName, work: Any) -> None:
        """Run `work` on each request of `stage`'s queue, one at a time.

        The light stages are synchronous (no await, so no timeout can fire inside
        them); only RAG with a context source awaits, and it runs under its timeout.
        """
        section = getattr(self.config.stages, stage.value)
        async with self._queues.receive[stage] as receive:
            async for request in receive:
                if request.finished:
                    continue
                try:
                    if stage is StageName.rag and section.enabled and self.context_source is not None:
                        await self._retrieve(request, section.timeout_ms)
                    work(request, section.enabled)
                except Exception as exc:  # a bug in a stage must fail one request, not the pipeline
                    log.exception("stage %s failed on request %s", stage.value, request.id)
                    error = OrchestratorError(f"internal error in the {stage.value} stage: {exc}")
                    self._fail(request, error, DeadLetterReason.internal_error)

    async def _retrieve(self, request: Request, timeout_ms: int) -> None:
        assert self.context_source is not None
        section = self.config.stages.rag
        submission = request.submission
        budget = min(timeout_ms / 1000, request.deadline - anyio.current_time())
        with anyio.move_on_after(max(budget, 0)) as scope:
            found = await self.context_source.retrieve(
                submission.prompt, submission.session_id, section.max_context_tokens
            )
            request.context = trim_context(found, section.max_context_tokens)
        if scope.cancelled_caught:
            self._timed_out(request, timeout_ms)

    def _timed_out(self, request: Request, stage_timeout_ms: float) -> None:
        if anyio.current_time() >= request.deadline:
            deadline_ms = request.submission.deadline_ms or self.config.pipeline.default_deadline_ms
            self._fail(request, DeadlineExceeded(deadline_ms, request.stage.value), DeadLetterReason.deadline_exceeded)
        else:
            self._fail(request, StageTimeout(request.stage.value, stage_timeout_ms), DeadLetterReason.stage_timeout)

    def _rag(self, request: Request, enabled: bool) -> None:
        self._forward(request, StageName.assemble, anyio.current_time())

    def _assemble(self, request: Request, enabled: bool) -> None:
        submission = request.submission
        request.messages = assemble_messages(submission.prompt, submission.system, request.context)
        self._forward(request, StageName.inference, anyio.current_time())

    def _post_process(self, request: Request, enabled: bool) -> None:
        if enabled:
            section = self.config.stages.post_process
            text, truncated = post_process(
                request.text, request.submission.params.stop, section.max_output_chars, section.strip_whitespace
            )
            if truncated and request.finish_reason in (None, "length"):
                request.finish_reason = "stop" if request.submission.params.stop else "length"
            request.text = text
        self._forward(request, StageName.stream, anyio.current_time())

    def _stream(self, request: Request, enabled: bool) -> None:
        now = anyio.current_time()
        request.enter(request.stage, now)  # closes the stream stage's own timing
        self.stage_counters[StageName.stream].processed += 1
        latency_ms = (now - request.submitted_at) * 1000
        self.latencies_ms.append(latency_ms)
        self.metrics.request_duration.observe(latency_ms / 1000)
        for stage, ms in request.stage_ms.items():
            self.metrics.stage_duration.labels(stage).observe(ms / 1000)
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
            await self._call_worker(request, lease.worker)
        finally:
            lease.active -= 1
            if lease.retired and lease.active == 0:
                self._close_later(lease.worker)

    async def _call_worker(self, request: Request, worker: Worker) -> None:
        section = self.config.stages.inference
        submission = request.submission
        params = submission.params
        params = params.model_copy(
            update={
                "max_tokens": params.max_tokens if params.max_tokens is not None else section.max_tokens,
                "temperature": params.temperature if params.temperature is not None else section.temperature,
            }
        )
        call = WorkerRequest(request.messages, params, request.id, submission.session_id)
        request.worker, request.model = worker.kind, worker.model
        parts: list[str] = []
        sink = request.on_chunk
        attempt_deadline = min(request.deadline, anyio.current_time() + section.timeout_ms / 1000)
        try:
            with anyio.CancelScope(deadline=attempt_deadline) as scope:
                request.inference_scope = scope
                request.attempts += 1
                async with aclosing(worker.generate(call)) as chunks:
                    async for chunk in chunks:
                        if chunk.text:
                            parts.append(chunk.text)
                            if sink is not None:
                                sink(chunk.text)
                        if chunk.usage is not None:
                            request.usage = chunk.usage
                        if chunk.finish_reason is not None:
                            request.finish_reason = chunk.finish_reason
        except WorkerError as exc:
            request.inference_scope = None
            self._fail(request, WorkerFailed(str(exc)), DeadLetterReason.worker_error)
            return
        except Exception as exc:
            request.inference_scope = None
            log.exception("worker %s raised on request %s", worker.kind, request.id)
            self._fail(request, WorkerFailed(f"{worker.kind} worker error: {exc}"), DeadLetterReason.worker_error)
            return
        request.inference_scope = None
        if request.finished:  # the caller gave up (deadline or cancellation) while we worked
            return
        if scope.cancelled_caught:
            self._timed_out(request, section.timeout_ms)
            return
        request.text = "".join(parts)
        usage = request.usage or Usage()
        self.tokens.input_tokens += usage.input_tokens
        self.tokens.output_tokens += usage.output_tokens
        self.metrics.tokens.labels("input").inc(usage.input_tokens)
        self.metrics.tokens.labels("output").inc(usage.output_tokens)
        self._forward(request, StageName.post_process, anyio.current_time())

    # ------------------------------------------------------------------ worker swap

    async def swap_worker(self, worker: Worker) -> Worker:
        """Make `worker` serve new requests; requests already running finish on the old one.

        The new worker is health-checked first; if that fails, nothing changes.
        """
        async with self._swap_lock:
            with anyio.fail_after(HEALTH_TIMEOUT_S):
                await worker.health()
            old = self._lease
            self._lease = _Lease(worker)
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
        return 0.0 if self.started_at is None else round(anyio.current_time() - self.started_at, 3)

    def _live_gauges(self) -> Iterable[Metric]:
        yield gauge(
            "orchestrator_queue_depth",
            "Requests waiting in each stage queue",
            ["stage"],
            ((([stage.value]), float(self.depth(stage))) for stage in STAGE_ORDER),
        )
        yield gauge("orchestrator_in_flight", "Requests submitted and not yet ended", [], [([], float(len(self.live)))])

    def status(self) -> PipelineStatus:
        stages = self.config.stages
        counters = self.counters
        limits = self.config.rate_limits
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
            ),
            worker={**self.worker.describe(), "in_flight": self._lease.active},
            rate_limit=RateLimitStatus(
                enabled=limits.enabled,
                requests_per_second=limits.requests_per_second,
                burst_capacity=limits.burst_capacity,
                per_session_rps=limits.per_session_rps,
                per_session_burst=limits.per_session_burst,
            ),
            latency_ms=Percentiles(**self.latency_percentiles()),
            tokens=self.tokens.model_copy(),
            concurrency={"limit": stages.inference.concurrency, "busy": self._lease.active},
            uptime_s=self.uptime_s(),
            reconciles=self.reconciles(),
        )
