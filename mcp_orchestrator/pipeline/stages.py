"""The stage runners: the queues between the stages, the light stages' tasks, and how a
trip moves from one stage to the next.

    admission -> [rag] -> [assemble] -> [inference x concurrency] -> [post_process] -> [stream] -> answer

Each arrow is a bounded queue (anyio memory object streams; the one before inference is
a priority queue, see priority.py, read by inference.py's tasks). A full queue never
blocks the stage before it: the trip is shed to the dead-letter queue and its waiters are
told at once. A disabled stage (rag, post_process) is skipped: trips never enter it.

The light stages do their work synchronously (no await, so nothing can time out inside
them), except RAG with a context source, which awaits it under its timeout. While a light
stage's queue is empty its task is marked idle, and `forward` runs the next trip's work
right away in the task that hands it over instead of a queue hop and a task switch;
while the task is busy, trips queue behind it in order. So a queue fills, and sheds,
where a backlog really builds: before inference, or before RAG behind a slow source.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import anyio
import anyio.lowlevel
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from mcp_orchestrator.config import StagesSection
from mcp_orchestrator.errors import DeadlineExceeded, RequestError, StageFailed, StageTimeout
from mcp_orchestrator.logs import Sampled
from mcp_orchestrator.metrics import Metrics
from mcp_orchestrator.models import STAGE_ORDER, DeadLetterReason, StageName
from mcp_orchestrator.pipeline.coalesce import Trips
from mcp_orchestrator.pipeline.context import ContextSource, trim_context
from mcp_orchestrator.pipeline.priority import PriorityQueue, QueueFull
from mcp_orchestrator.pipeline.prompt import assemble_messages, post_process
from mcp_orchestrator.pipeline.request import Trip

log = logging.getLogger(__name__)

LIGHT_STAGES = (StageName.rag, StageName.assemble, StageName.post_process, StageName.stream)
SHED_LOG_INTERVAL_S = 5.0
BATCH = 256
"""Trips a light stage takes from its queue before it lets other tasks run."""


@dataclass
class StageCounters:
    processed: int = 0
    shed: int = 0


class Stages:
    def __init__(
        self,
        sections: StagesSection,
        trips: Trips,
        metrics: Metrics,
        *,
        aging_s: float,
        deadline_ms: Callable[[Trip], float],
        clock: Callable[[], float],
        now: Callable[[], float],
    ) -> None:
        self.sections = sections
        """Read per trip: a config reload replaces it (see Pipeline.reconfigure). `clock` is the
        event loop's (timings, deadlines), `now` the pipeline's injectable one (log sampling)."""
        self.context_source: ContextSource | None = None
        self.inference = PriorityQueue[Trip](sections.inference.channel_capacity, aging_s)
        self.counters = {stage: StageCounters() for stage in STAGE_ORDER}
        self._trips = trips
        self._deadline_ms = deadline_ms
        self._time = clock
        self._send: dict[StageName, MemoryObjectSendStream[Trip]] = {}
        self._receive: dict[StageName, MemoryObjectReceiveStream[Trip]] = {}
        self._idle: dict[StageName, bool] = {}
        """Light stages whose task waits on an empty queue (a trip may skip the hop)."""
        self._shed_log = Sampled(SHED_LOG_INTERVAL_S, clock=now)
        """One warning per stage and interval while shedding (thousands a second otherwise)."""
        self._stage_metric = {name: metrics.stage_duration.labels(name) for name in [*STAGE_ORDER, "admission"]}
        self._work: dict[StageName, Callable[[Trip], None]] = {
            StageName.rag: self._rag,
            StageName.assemble: self._assemble,
            StageName.post_process: self._post_process,
            StageName.stream: self._stream,
        }

    # ------------------------------------------------------------------ queues

    def open(self) -> None:
        for stage in LIGHT_STAGES:
            capacity = self.capacity(stage)
            self._send[stage], self._receive[stage] = anyio.create_memory_object_stream[Trip](capacity)

    def close(self) -> None:
        for send in self._send.values():
            send.close()
        for receive in self._receive.values():
            receive.close()

    def capacity(self, stage: StageName) -> int:
        if stage is StageName.inference:
            return self.inference.capacity
        return int(getattr(self.sections, stage.value).channel_capacity)

    def depth(self, stage: StageName) -> int:
        if stage is StageName.inference:
            return len(self.inference)
        receive = self._receive.get(stage)
        return receive.statistics().current_buffer_used if receive is not None else 0

    def enabled(self, stage: StageName) -> bool:
        return bool(getattr(self.sections, stage.value).enabled)

    # ------------------------------------------------------------------ moving trips

    def enter(self, trip: Trip, now: float) -> None:
        """A trip admitted into the pipeline: to RAG, or to assemble when RAG is off."""
        first = StageName.rag if self.sections.rag.enabled else StageName.assemble
        trip.stage, trip.entered_at = first, now  # nothing before the first stage is a stage's time
        self.forward(trip, first, now)

    def answered(self, trip: Trip, now: float) -> None:
        """The backend answered: to post-processing, or straight to the stream stage when it is off."""
        self.counters[StageName.inference].processed += 1
        self.forward(trip, StageName.post_process if self.sections.post_process.enabled else StageName.stream, now)

    def forward(self, trip: Trip, stage: StageName, now: float) -> None:
        """Hand `trip` to `stage`'s queue without waiting; shed it if the queue is full."""
        if trip.stopped:
            return
        trip.enter(stage, now)
        if self._idle.get(stage) and self._runs_inline(stage):
            # Nobody is queued ahead and the stage's task waits for work: do the stage's
            # (synchronous) work right here instead of a queue hop and a task switch.
            self._idle[stage] = False
            try:
                self._run_sync(stage, trip)
            finally:
                self._idle[stage] = True
            return
        try:
            if stage is StageName.inference:
                self.inference.put_nowait(trip, trip.rank, now)
            else:
                self._send[stage].send_nowait(trip)
                self._idle[stage] = False  # its task has work now
        except (anyio.WouldBlock, QueueFull):
            self._shed(trip, stage)

    def discard(self, trip: Trip) -> None:
        """A trip that stopped while queued for inference gives up its place."""
        self.inference.discard(trip)

    def promote(self, trip: Trip, ranks: int) -> None:
        if trip.stage is StageName.inference:
            self.inference.promote(trip, ranks)

    def _shed(self, trip: Trip, stage: StageName) -> None:
        first = next(iter(trip.waiters), "")
        self.counters[stage].shed += 1
        letter = self._trips.shed(trip, stage, self.capacity(stage))
        left_out = self._shed_log.take(stage)
        if left_out is not None:
            more = f" ({left_out} more shed there since the last such line)" if left_out else ""
            log.warning("request %s shed at %s (queue full), dead letter %s%s", first, stage.value, letter, more)

    def fail(self, trip: Trip, error: RequestError, reason: DeadLetterReason) -> None:
        self._trips.fail(trip, error, reason)

    # ------------------------------------------------------------------ the light stages' tasks

    async def run(self, stage: StageName, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """The stage's task: work on each trip of its queue, in order, up to BATCH between checkpoints."""
        async with self._receive[stage] as receive:
            self._idle[stage] = True
            task_status.started()  # the pipeline runs once every light stage waits for work
            taken = 0
            while True:
                try:
                    trip = receive.receive_nowait()
                except anyio.WouldBlock:
                    self._idle[stage] = True
                    try:
                        trip = await receive.receive()
                    except anyio.EndOfStream:
                        return
                    finally:
                        self._idle[stage] = False
                    taken = 0
                if self._runs_inline(stage):
                    self._run_sync(stage, trip)
                else:
                    await self._retrieve(trip)
                taken += 1
                if taken >= BATCH:  # let other tasks run between long batches
                    taken = 0
                    await anyio.lowlevel.checkpoint()

    def _runs_inline(self, stage: StageName) -> bool:
        """Whether `stage`'s work is synchronous (RAG awaits its context source)."""
        return stage is not StageName.rag or self.context_source is None

    def _run_sync(self, stage: StageName, trip: Trip) -> None:
        if trip.stopped:
            return
        self.counters[stage].processed += 1
        try:
            self._work[stage](trip)
        except Exception as exc:  # a bug in a stage must fail one trip, not the pipeline
            self._stage_failed(stage, trip, exc)

    def _stage_failed(self, stage: StageName, trip: Trip, exc: Exception) -> None:
        log.exception("stage %s failed on request %s", stage.value, next(iter(trip.waiters), "?"))
        self.fail(trip, StageFailed(stage.value, exc), DeadLetterReason.internal_error)

    # ------------------------------------------------------------------ the work of each stage

    async def _retrieve(self, trip: Trip) -> None:
        """RAG with a context source: retrieve under the stage timeout and the trip's deadline."""
        if trip.stopped:
            return
        source, section = self.context_source, self.sections.rag  # read per trip: a reload may change them
        assert source is not None
        started = self._time()
        timeout_s = section.timeout_ms / 1000
        submission = trip.submission
        with anyio.CancelScope(deadline=min(started + timeout_s, trip.deadline)) as scope:
            trip.scope = scope
            trip.on_extend = lambda deadline: setattr(scope, "deadline", min(started + timeout_s, deadline))
            try:
                found = await source.retrieve(submission.prompt, submission.session_id, section.max_context_tokens)
                trip.context = trim_context(found, section.max_context_tokens)
            except Exception as exc:  # a broken context source fails one trip, not the pipeline
                self._stage_failed(StageName.rag, trip, exc)
                return
            finally:
                trip.scope = trip.on_extend = None
        if not scope.cancelled_caught:
            self._run_sync(StageName.rag, trip)
        elif not trip.stopped:
            self._timed_out(trip, section.timeout_ms)

    def _timed_out(self, trip: Trip, timeout_ms: float) -> None:
        if self._time() >= trip.deadline:
            self.fail(
                trip, DeadlineExceeded(self._deadline_ms(trip), trip.stage.value), DeadLetterReason.deadline_exceeded
            )
        else:
            self.fail(trip, StageTimeout(trip.stage.value, timeout_ms), DeadLetterReason.stage_timeout)

    def _rag(self, trip: Trip) -> None:
        self.forward(trip, StageName.assemble, self._time())

    def _assemble(self, trip: Trip) -> None:
        if trip.context or not trip.messages:
            submission = trip.submission
            trip.messages = assemble_messages(submission.prompt, submission.system, trip.context)
        self.forward(trip, StageName.inference, self._time())

    def _post_process(self, trip: Trip) -> None:
        section = self.sections.post_process
        stop = trip.submission.params.stop
        text, truncated = post_process(trip.text, stop, section.max_output_chars, section.strip_whitespace)
        if truncated and trip.finish_reason in (None, "length"):
            trip.finish_reason = "stop" if stop else "length"
        trip.text = text
        self.forward(trip, StageName.stream, self._time())

    def _stream(self, trip: Trip) -> None:
        trip.enter(trip.stage, self._time())  # closes the stream stage's own timing
        histograms = self._stage_metric
        for stage, ms in trip.stage_ms.items():
            histograms[stage].observe(ms / 1000)
        self._trips.complete(trip)
