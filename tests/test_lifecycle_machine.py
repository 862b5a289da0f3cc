"""The request lifecycle as a state machine: hypothesis interleaves submissions (identical and
different), callers cancelling, deadlines passing, shedding at a queue of one, backend
answers and failures, worker swaps and live reconfiguration, and after every step checks:

- every request ended at most once: the outcome counters equal the requests that have an
  outcome, and no outcome ever changes;
- conservation: submitted == completed + failed + shed + cancelled + in flight;
- no trip is left without a waiter: every trip open to joiners has waiters and runs, and
  every request still waiting on a trip is one of its waiters;
- at the end, once the backend answers everything, nothing is in flight.

The pipeline runs in an event loop of its own (an anyio blocking portal); every step and
check runs on that loop, so it sees the pipeline between two of its steps, never inside one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from mcp_orchestrator.errors import RequestError
from mcp_orchestrator.models import Outcome, Priority, Submission, Usage
from mcp_orchestrator.pipeline import Pipeline, Request
from mcp_orchestrator.workers.base import Chunk, WorkerError, WorkerRequest
from tests.conftest import make_config
from tests.support_workers import StubWorker

STEP_TIMEOUT_S = 10.0
PROMPTS = ["alpha", "beta", "gamma"]
"""Few prompts, so identical requests meet often."""


@dataclass(eq=False)
class Pending:
    """One backend call the machine decides the fate of."""

    prompt: str
    decided: anyio.Event = field(default_factory=anyio.Event)
    failure: WorkerError | None = None


class ControlledWorker(StubWorker):
    """Every call waits until the machine answers or fails it."""

    kind = "controlled"

    def __init__(self, name: str) -> None:
        self.name = name
        self.pending: list[Pending] = []

    @property
    def model(self) -> str:
        return self.name

    async def generate(self, request: WorkerRequest) -> Any:
        call = Pending(request.messages[-1].content)
        self.pending.append(call)
        try:
            await call.decided.wait()
        finally:
            if call in self.pending:
                self.pending.remove(call)
        if call.failure is not None:
            raise call.failure
        yield Chunk(call.prompt, Usage(input_tokens=1, output_tokens=1), "stop")


@dataclass(eq=False)
class Caller:
    request: Request
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    done: bool = False


def config(**changes: Any) -> Any:
    return make_config(
        stages={"inference": {"concurrency": 1, "channel_capacity": changes.pop("capacity", 1)}},
        resilience={"retry_attempts": 0, "circuit_breaker_threshold": 1000},
        pipeline={"default_deadline_ms": 60_000, **changes.pop("pipeline", {})},
        deduplication={"enabled": changes.pop("dedup", True)},
    )


class LifecycleMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self._portal_cm = anyio.from_thread.start_blocking_portal()
        self.portal = self._portal_cm.__enter__()
        self.workers = [ControlledWorker("w0")]
        self.pipeline = Pipeline(config(), self.workers[0])
        self.stop = self.portal.call(anyio.Event)
        self.running = self.portal.call(anyio.Event)
        self.runner = self.portal.start_task_soon(self._run)
        self.portal.call(self.running.wait)
        self.callers: list[Caller] = []
        self.outcomes: dict[str, Outcome] = {}

    async def _run(self) -> None:
        async with self.pipeline, anyio.create_task_group() as self.callers_group:
            self.running.set()
            await self.stop.wait()
            self.callers_group.cancel_scope.cancel()

    async def _wait(self, caller: Caller) -> None:
        with caller.scope:
            try:
                await self.pipeline.wait(caller.request)
            except RequestError:
                pass
        caller.done = True

    def _on_loop(self, function: Any, *args: Any) -> Any:
        async def call() -> Any:
            with anyio.fail_after(STEP_TIMEOUT_S):
                result = function(*args)
                await anyio.lowlevel.checkpoint()  # let what the step started take its first steps
                return result

        return self.portal.call(call)

    # ------------------------------------------------------------------ steps

    submissions = st.builds(
        Submission,
        prompt=st.sampled_from(PROMPTS),
        dedup=st.booleans(),
        cache=st.booleans(),
        priority=st.sampled_from(list(Priority)),
        deadline_ms=st.sampled_from([None, None, 5, 40]),
    )

    @initialize(first=st.lists(submissions, min_size=1, max_size=4))
    def some_requests_to_start_with(self, first: list[Submission]) -> None:
        for submission in first:
            self.submit(submission)

    @rule(submission=submissions)
    def submit(self, submission: Submission) -> None:
        def start() -> None:
            caller = Caller(self.pipeline.submit(submission))
            self.callers.append(caller)
            self.callers_group.start_soon(self._wait, caller)

        self._on_loop(start)

    @rule(submissions=st.lists(submissions, min_size=2, max_size=5))
    def burst(self, submissions: list[Submission]) -> None:
        """Several at once (no step in between): identical ones join, a queue of one sheds."""

        def start() -> None:
            for submission in submissions:
                caller = Caller(self.pipeline.submit(submission))
                self.callers.append(caller)
                self.callers_group.start_soon(self._wait, caller)

        self._on_loop(start)

    # Which caller or backend call a step acts on is drawn as a number, not from the current
    # list: what is waiting depends on timing (deadlines), and hypothesis needs the same draws
    # to make the same choices. With nothing to act on, the step does nothing.

    @rule(pick=st.integers(0, 1000))
    def caller_cancels(self, pick: int) -> None:
        waiting = [caller for caller in self.callers if not caller.done]
        if waiting:
            self._on_loop(waiting[pick % len(waiting)].scope.cancel)

    @rule(seconds=st.sampled_from([0.0, 0.006, 0.05]))
    def time_passes(self, seconds: float) -> None:
        self.portal.call(anyio.sleep, seconds)

    @rule(pick=st.integers(0, 1000), fails=st.sampled_from([None, True, False]))
    def backend_decides(self, pick: int, fails: bool | None) -> None:
        calls = [call for worker in self.workers for call in worker.pending]
        if not calls:
            return
        call = calls[pick % len(calls)]
        if fails is not None:
            call.failure = WorkerError("controlled", "it broke", retryable=fails, status=503 if fails else 400)
        self._on_loop(call.decided.set)

    @rule(pick=st.integers(0, 1000))
    def callers_leave_as_the_answer_arrives(self, pick: int) -> None:
        """The race `Ledger.end` must win: a caller cancelled after its request ended but
        before its task saw that (its end must not be counted a second time)."""
        calls = [call for worker in self.workers for call in worker.pending]
        if not calls:
            return

        async def step() -> None:
            calls[pick % len(calls)].decided.set()
            for _ in range(10):
                await anyio.lowlevel.checkpoint()
                for caller in self.callers:
                    if caller.request.outcome is not None and not caller.done:
                        caller.scope.cancel()

        self.portal.call(step)

    @rule()
    def swap_worker(self) -> None:
        worker = ControlledWorker(f"w{len(self.workers)}")
        self.workers.append(worker)
        self.portal.call(self.pipeline.swap_worker, worker)

    @rule(
        dedup=st.booleans(),
        capacity=st.sampled_from([1, 2]),
        aging_ms=st.sampled_from([1, 10_000]),
        default_deadline_ms=st.sampled_from([30, 60_000]),
    )
    def reload(self, dedup: bool, capacity: int, aging_ms: int, default_deadline_ms: int) -> None:
        pipeline = {"priority_aging_ms": aging_ms, "default_deadline_ms": default_deadline_ms}
        new = config(dedup=dedup, capacity=capacity, pipeline=pipeline)
        self._on_loop(self.pipeline.reconfigure, new, None)

    # ------------------------------------------------------------------ what must hold after every step

    @invariant()
    def holds(self) -> None:
        self.portal.call(self._check)

    async def _check(self) -> None:
        pipeline = self.pipeline
        ledger = pipeline.ledger
        ended = [caller.request for caller in self.callers if caller.request.outcome is not None]
        for request in ended:
            assert request.outcome is not None
            first = self.outcomes.setdefault(request.id, request.outcome)
            assert request.outcome is first, f"{request.id} ended as {first.name}, now {request.outcome.name}"
        assert ledger.counters.ended() == len(ended), "a request was counted more than once (or not at all)"
        assert ledger.reconciles(), ledger.counters
        assert len(ledger.live) == len(self.callers) - len(ended)
        for key, trip in pipeline.trips.flights.items():
            assert trip.key == key
            assert trip.waiters, "a trip open to joiners with nobody waiting"
            assert not trip.stopped, "a stopped trip still open to joiners"
        for request in ledger.live.values():
            trip = request.trip
            if trip is not None:
                assert not trip.stopped, "a request waits on a stopped trip"
                assert trip.waiters.get(request.id) is request

    def teardown(self) -> None:
        """Let the backend answer everything still waiting: every caller ends, nothing is left."""

        async def drain() -> dict[str, int]:
            with anyio.fail_after(STEP_TIMEOUT_S):
                while any(not caller.done for caller in self.callers):
                    for worker in self.workers:
                        for call in list(worker.pending):
                            call.decided.set()
                    await anyio.sleep(0.001)
            await self._check()
            assert not self.pipeline.ledger.live, "requests left in flight"
            assert self.pipeline.status().totals.in_flight == 0
            assert not self.pipeline.trips.flights
            return dict(vars(self.pipeline.ledger.counters))

        try:
            counters = self.portal.call(drain)
        finally:
            self.portal.call(self.stop.set)
            self.runner.result(timeout=STEP_TIMEOUT_S)
            self._portal_cm.__exit__(None, None, None)
        for name, count in counters.items():
            if count:
                event(f"some requests {name}")  # what the run covered (--hypothesis-show-statistics)


LifecycleMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_request_lifecycle = LifecycleMachine.TestCase
