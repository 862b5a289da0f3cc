"""The inference stage: `concurrency` tasks, each taking the most urgent trip from the
priority queue and running its backend call (inference.py) on the worker in service."""

from __future__ import annotations

from collections.abc import Callable

from mcp_orchestrator.config import InferenceSection, ResilienceSection
from mcp_orchestrator.errors import WorkerFailed
from mcp_orchestrator.metrics import Metrics
from mcp_orchestrator.pipeline.inference import InferenceCall
from mcp_orchestrator.pipeline.lease import WorkerLease
from mcp_orchestrator.pipeline.request import Trip
from mcp_orchestrator.pipeline.stages import Stages
from mcp_orchestrator.resilience.retry import Clock
from mcp_orchestrator.workers.base import Worker


class Dispatch:
    def __init__(
        self,
        section: InferenceSection,
        resilience: ResilienceSection,
        stages: Stages,
        lease: WorkerLease,
        *,
        clock: Clock,
        metrics: Metrics,
        deadline_ms: Callable[[Trip], float],
    ) -> None:
        self.section = section
        self.resilience = resilience
        """Both read per call: a config reload replaces them (see reconfigure)."""
        self._policy = resilience.retry_policy()
        self._stages = stages
        self._lease = lease
        self._clock = clock
        self._metrics = metrics
        self._deadline_ms = deadline_ms
        self.loop_time: Callable[[], float] = clock.now
        """The event loop's clock; the pipeline sets a cheap reader of it once running."""
        self.input_tokens = 0
        self.output_tokens = 0

    def reconfigure(self, section: InferenceSection, resilience: ResilienceSection) -> None:
        self.section, self.resilience = section, resilience
        self._policy = resilience.retry_policy()

    async def run(self) -> None:
        """One of the stage's tasks: forever take a trip and call the backend for it."""
        queue = self._stages.inference
        while True:
            trip = await queue.get()
            if not trip.stopped:
                lease = self._lease.take()
                try:
                    await self._call(trip, lease.guarded)
                finally:
                    self._lease.give_back(lease)

    async def _call(self, trip: Trip, worker: Worker) -> None:
        """Run the trip's backend call and hand the answer on, or fail the trip with the
        error its waiters should see."""
        trip.worker, trip.model = worker.kind, worker.model
        call = InferenceCall(
            trip,
            worker,
            self.section,
            self.resilience,
            self._policy,
            clock=self._clock,
            metrics=self._metrics,
            deadline_ms=self._deadline_ms(trip),
            loop_time=self.loop_time,
        )
        outcome = await call.run()
        trip.attempts = call.trace.attempts
        if trip.stopped or outcome is None:  # nobody waits any more
            return
        if outcome.error is not None or outcome.answer is None:
            self._stages.fail(trip, outcome.error or WorkerFailed(f"{worker.kind}: no answer"), outcome.reason)
            return
        answer = outcome.answer
        trip.text = "".join(answer.parts)
        trip.usage, trip.finish_reason = answer.usage, answer.finish_reason
        trip.provenance = call.provenance()
        if answer.usage is not None:
            self.input_tokens += answer.usage.input_tokens
            self.output_tokens += answer.usage.output_tokens
        self._stages.answered(trip, self.loop_time())
