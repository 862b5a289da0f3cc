"""Admission: where a submitted request goes.

In this order: an answer from the cache, a trip already under way for an identical
request, or a new trip that passes the rate limits into the stages. So only a request
that will call the backend spends a rate-limit token or a queue slot, and a burst of
identical calls costs one of each.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from functools import partial
from typing import TYPE_CHECKING, Any

import anyio

from mcp_orchestrator.config import DeduplicationSection, RateLimitsSection
from mcp_orchestrator.errors import PipelineNotRunning, RateLimited, ShuttingDown
from mcp_orchestrator.models import Message, Outcome
from mcp_orchestrator.pipeline.answers import Answer, CachedAnswer
from mcp_orchestrator.pipeline.coalesce import Trips, answer_key
from mcp_orchestrator.pipeline.lease import WorkerLease
from mcp_orchestrator.pipeline.ledger import Ledger
from mcp_orchestrator.pipeline.limits import RateLimits
from mcp_orchestrator.pipeline.prompt import assemble_messages
from mcp_orchestrator.pipeline.request import Request, Trip
from mcp_orchestrator.pipeline.stages import Stages
from mcp_orchestrator.resilience.cache import ResultCache

if TYPE_CHECKING:
    from mcp_orchestrator.pipeline.sharing import Sharing

Spawn = Callable[[Callable[[Trip], Coroutine[Any, Any, None]], Trip], None]


class Admission:
    def __init__(
        self,
        dedup: DeduplicationSection,
        rate_limits: RateLimitsSection,
        limits: RateLimits,
        *,
        ledger: Ledger,
        trips: Trips,
        stages: Stages,
        cache: ResultCache[CachedAnswer],
        lease: WorkerLease,
        clock: Callable[[], float],
    ) -> None:
        self.dedup = dedup
        self.rate_limits = rate_limits
        self.limits = limits
        """All three read per request: a config reload replaces them (see Pipeline.reconfigure)."""
        self._ledger = ledger
        self.trips = trips
        self._stages = stages
        self._cache = cache
        self._lease = lease
        self._time = clock
        self._spawn: Spawn | None = None
        self.admitting = True
        """False once the server began to shut down (shutdown.py): new requests are refused."""
        self.sharing: Sharing | None = None
        """Set when [distributed] redis_url is: new trips consult other processes (sharing.py)."""

    def start(self, spawn: Spawn | None) -> None:
        """Running (waits for rate-limit tokens run as tasks through `spawn`), or stopping (None)."""
        self._spawn = spawn

    def shares_answers(self) -> bool:
        """Coalescing and caching key on the assembled messages, known at admission only when
        no context source can add retrieved passages to them."""
        retrieves = self._stages.context_source is not None and self._stages.sections.rag.enabled
        return self.dedup.enabled and not retrieves

    def stop_admitting(self) -> None:
        """Refuse every request from now on, with ShuttingDown; those already admitted carry on."""
        self.admitting = False

    def admit(self, request: Request, now: float) -> None:
        if not self.admitting:
            self._ledger.end(request, Outcome.failed, now, ShuttingDown())
            return
        submission = request.submission
        key: str | None = None
        messages: tuple[Message, ...] = ()
        sharing = self.sharing
        if (submission.cache or submission.dedup) and self.shares_answers():
            # With no context source these are exactly the messages the assemble stage builds.
            messages = assemble_messages(submission.prompt, submission.system, [])
            key = self._key(messages, request)
            if submission.cache:
                cached = self._cache.get(key)
                if cached is not None:
                    self._answer_from_cache(request, cached.unpack(), now)
                    return
            if submission.dedup:
                trip = self.trips.flights.get(key)
                if trip is not None:
                    self.trips.join(trip, request)
                    return
        trip = self.trips.start(request, key, now, shared=submission.dedup)
        trip.messages = messages
        if sharing is not None and key is not None and self._spawn is not None:
            shared_key = sharing.key(messages, submission.params)
            self._spawn(partial(sharing.share, key=shared_key, lead=submission.dedup), trip)
            return
        self.pass_limits(trip, now)

    def _key(self, messages: tuple[Message, ...], request: Request) -> str:
        """Unset parameters stay unset in the key: the worker fills them from its own settings,
        which cannot change without a worker swap, and a swap changes the generation."""
        lease = self._lease
        worker = lease.worker
        return answer_key(f"{worker.kind}#{lease.generation}", worker.model, messages, request.submission.params)

    def _answer_from_cache(self, request: Request, answer: Answer, now: float) -> None:
        """A cache hit skips every stage: the cached text was post-processed with the same stop
        sequences (they are in the key) and no context source is active."""
        request.cached = True
        if request.on_chunk is not None and answer.text:
            request.on_chunk(answer.text)
        self._ledger.end(request, Outcome.completed, now, answer=answer)

    def now(self) -> float:
        return self._time()

    def pass_limits(self, trip: Trip, now: float) -> None:
        """Pass the rate limits (now, or by waiting for tokens) and enter the stages: the
        buckets shared with other processes when sharing, else this process's own."""
        if self.sharing is not None and self.limits.enabled and self._spawn is not None:
            self._spawn(self.sharing.pass_limits, trip)
            return
        self.pass_local_limits(trip, now)

    def pass_local_limits(self, trip: Trip, now: float) -> None:
        """Pass this process's own rate limits (now, or by waiting for tokens) and enter the stages."""
        budget = trip.deadline - now - self.rate_limits.min_remaining_ms / 1000
        try:
            admitted = self.limits.admit_now(trip.rank, trip.submission.session_id, budget)
        except RateLimited as exc:
            self.trips.refuse(trip, exc)
            return
        if admitted:
            self._stages.enter(trip, now)
        elif self._spawn is None:  # shutting down: nothing will admit it
            self.trips.refuse(trip, PipelineNotRunning())
        else:
            self._spawn(self._wait_for_tokens, trip)

    async def _wait_for_tokens(self, trip: Trip) -> None:
        """Wait for rate-limit tokens in the pipeline's task group, not a caller's task: the trip
        keeps its place in line while any of its waiters is still there."""
        limits = self.limits  # a reload replaces the limits; a wait begun finishes on these
        with anyio.CancelScope() as scope:  # trip.stop() cancels it: nobody waits any more
            trip.scope = scope
            try:
                while True:
                    deadline = trip.deadline
                    budget = deadline - self._time() - self.rate_limits.min_remaining_ms / 1000
                    try:
                        await limits.admit(trip.rank, trip.submission.session_id, budget)
                        break
                    except RateLimited as exc:
                        if trip.deadline > deadline:
                            continue  # a waiter with more time joined meanwhile: try again for it
                        self.trips.refuse(trip, exc)
                        return
            finally:
                trip.scope = None
        if scope.cancelled_caught or trip.stopped:
            return
        self.entered_after_wait(trip)

    def entered_after_wait(self, trip: Trip) -> None:
        """The trip got its tokens after waiting: into the stages, the wait counted as admission time."""
        now = self._time()
        trip.stage_ms["admission"] = (now - trip.entered_at) * 1000
        self._stages.enter(trip, now)
