"""Trips and who waits on them: single flight, reference-counted.

Every request that needs the backend waits on a trip. With coalescing on, a request whose
answer key matches a trip under way joins that trip instead of starting its own (1,000
identical concurrent calls cost one backend call). Which requests are identical is
decided by `answer_key`: everything that can change the backend's answer is in it.

A trip belongs to nobody in particular: it runs while at least one request waits on it.
A waiter that leaves (its caller cancelled, or its own deadline passed) leaves the others
untouched; the last one to leave stops the trip, backend call included. When the trip
ends, its outcome is every waiter's: an answer (cached for identical requests to come)
or an error (never cached), with one dead letter for the trip.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

from mcp_orchestrator.errors import RequestError, RequestShed
from mcp_orchestrator.metrics import Metrics
from mcp_orchestrator.models import DeadLetterReason, GenerationParams, Message, Outcome, StageName
from mcp_orchestrator.pipeline.answers import Answer, CachedAnswer
from mcp_orchestrator.pipeline.dead_letters import DeadLetterQueue
from mcp_orchestrator.pipeline.ledger import Ledger
from mcp_orchestrator.pipeline.request import Request, Trip
from mcp_orchestrator.resilience.cache import ResultCache

log = logging.getLogger(__name__)


def answer_key(worker: str, model: str, messages: tuple[Message, ...], params: GenerationParams) -> str:
    """A fixed-size digest of everything that can change the backend's answer.

    Unset parameters stay unset (the worker fills them from its own settings, which only a
    worker swap can change, and the swap changes `worker`). Every part is length-prefixed,
    so no prompt text can make two different requests spell the same payload, and every
    field of GenerationParams is in its JSON, so a parameter added later is in the key
    without touching this function.
    """
    parts = [worker, model]
    for message in messages:
        parts.append(message.role)
        parts.append(message.content)
    # Frozen model, fields in declaration order: the same values always give the same JSON.
    parts.append(params.model_dump_json() if params.model_fields_set else _DEFAULT_PARAMS)
    payload = "".join(f"{len(part)}:{part}" for part in parts)
    return hashlib.sha256(payload.encode("utf-8", "surrogatepass")).hexdigest()


_DEFAULT_PARAMS = GenerationParams().model_dump_json()


@dataclass(frozen=True, slots=True)
class TripHooks:
    """What the stages do when a trip stops or moves up: leave the inference queue."""

    discard: Callable[[Trip], None]
    promote: Callable[[Trip, int], None]


class Trips:
    def __init__(
        self,
        ledger: Ledger,
        dead_letters: DeadLetterQueue,
        cache: ResultCache[CachedAnswer],
        metrics: Metrics,
        clock: Callable[[], float],
    ) -> None:
        self.flights: dict[str, Trip] = {}
        """Trips identical requests may join, by answer key."""
        self._ledger = ledger
        self._dead_letters = dead_letters
        self._cache = cache
        self._metrics = metrics
        self._time = clock
        self.hooks = TripHooks(lambda trip: None, lambda trip, ranks: None)
        """Set by the pipeline once its stages exist."""

    # ------------------------------------------------------------------ who waits

    def start(self, request: Request, key: str | None, now: float, *, shared: bool) -> Trip:
        """A new trip carrying `request`. With a key its answer may be cached; `shared` also
        lets identical requests join it while it runs."""
        submission = request.submission
        trip = Trip(submission, key, submission.priority.rank, request.deadline, now, submission.cache)
        self._attach(trip, request)
        if key is not None and shared:
            self.flights[key] = trip
        return trip

    def join(self, trip: Trip, request: Request) -> None:
        """`request` waits on `trip` instead of travelling: the trip lasts as long as its latest
        waiter allows and travels in the best class among them."""
        request.coalesced = True
        self._attach(trip, request)
        trip.cacheable = trip.cacheable or request.submission.cache
        trip.extend(request.deadline)
        rank = request.submission.priority.rank
        if rank < trip.rank:
            raised_by, trip.rank = trip.rank - rank, rank
            self.hooks.promote(trip, raised_by)

    def left(self, request: Request) -> None:
        """`request` ended before its trip did (the ledger says so): the last one out stops the trip."""
        trip = request.trip
        request.trip = None
        if trip is None or trip.stopped:
            return
        del trip.waiters[request.id]
        trip.sinks.pop(request.id, None)
        if not trip.waiters:
            self._close(trip)

    @staticmethod
    def _attach(trip: Trip, request: Request) -> None:
        request.trip = trip
        trip.waiters[request.id] = request
        if request.on_chunk is not None:
            trip.sinks[request.id] = request.on_chunk

    # ------------------------------------------------------------------ how it ends

    def complete(self, trip: Trip) -> None:
        """The trip's answer is every waiter's; it is cached for identical requests to come."""
        answer = trip.answer()
        lead, trip.lead = trip.lead, None  # told after the waiters: other processes' news is off their path
        try:
            waiters = self._close(trip)
            if trip.key is not None and trip.cacheable:
                self._cache.put(trip.key, CachedAnswer.pack(answer))
            now = self._time()
            end = self._ledger.end
            for request in waiters:
                if not request.coalesced:
                    request.stage_ms, request.attempts = trip.stage_ms, trip.attempts
                end(request, Outcome.completed, now, answer=answer)
        finally:
            if lead is not None:  # whatever happened here, the other processes are told
                lead.finish(answer, trip.cacheable)

    def fail(self, trip: Trip, error: RequestError, reason: DeadLetterReason) -> None:
        """The trip ended without an answer: one dead letter, the error to every waiter."""
        waiters = self._close(trip, failure=str(error))
        if waiters:
            self._letter(waiters[0], trip.stage, error, reason, _job_of(waiters))
            self._end_all(waiters, Outcome.failed, error)

    def expire(self, request: Request, error: RequestError) -> None:
        """`request`'s own deadline passed while it waited: a dead letter of its own."""
        self._letter(request, request.where, error, DeadLetterReason.deadline_exceeded, request.job_id)
        self._ledger.end(request, Outcome.failed, self._time(), error)

    def _letter(
        self, request: Request, stage: StageName, error: RequestError, reason: DeadLetterReason, job_id: str | None
    ) -> None:
        letter = self._dead_letters.add(request.id, request.submission, stage, reason, str(error), job_id)
        error.dead_letter_id = letter.id
        self._metrics.errors.labels(stage.value, reason.value).inc()
        log.info("request %s failed in %s: %s (dead letter %s)", request.id, stage.value, error, letter.id)

    def shed(self, trip: Trip, stage: StageName, capacity: int) -> str:
        """A full queue refused the trip: a dead letter, and every waiter told at once. Returns its id."""
        waiters = self._close(trip)
        first = waiters[0].id if waiters else ""
        letter = self._dead_letters.add(
            first,
            trip.submission,
            stage,
            DeadLetterReason.queue_full,
            f"{stage.value} queue full ({capacity})",
            _job_of(waiters),
        )
        self._metrics.shed.labels(stage.value).inc()
        self._end_all(waiters, Outcome.shed, RequestShed(stage.value, capacity, letter.id))
        return letter.id

    def refuse(self, trip: Trip, error: RequestError) -> None:
        """The trip was not let in (rate limited, shutting down): every waiter fails, no dead letter."""
        self._end_all(self._close(trip), Outcome.failed, error)

    def abandon_all(self, error: RequestError) -> None:
        """Shutting down: every trip stops and its waiters end with `error` (no dead letters)."""
        for request in list(self._ledger.live.values()):
            self._ledger.end(request, Outcome.failed, self._time(), error)

    def answer_shared(self, trip: Trip, answer: Answer, *, cached: bool) -> None:
        """Another process answered: the shared cache held it (`cached`) or its flight just
        ended. No backend call of ours, so every waiter is a cache hit or coalesced."""
        for request in trip.waiters.values():
            if cached:
                request.cached = True
            else:
                request.coalesced = True
        trip.text, trip.usage, trip.finish_reason = answer.text, answer.usage, answer.finish_reason
        trip.worker, trip.model, trip.provenance = answer.worker, answer.model, answer.provenance
        self.complete(trip)

    def _close(self, trip: Trip, failure: str | None = None) -> list[Request]:
        """Stop `trip` and take its waiters (the trip no longer holds them). A trip still leading
        a flight shared with other processes tells them it failed, or that it let go (then
        one of them takes the flight over); `complete` tells its answer itself."""
        trip.stop()
        lead, trip.lead = trip.lead, None
        if lead is not None:
            if failure is not None:
                lead.fail(failure)
            else:
                lead.release()
        if trip.key is not None and self.flights.get(trip.key) is trip:
            del self.flights[trip.key]
        if trip.stage is StageName.inference:
            self.hooks.discard(trip)
        waiters = list(trip.waiters.values())
        trip.waiters.clear()
        trip.sinks.clear()
        for request in waiters:
            request.trip = None
        return waiters

    def _end_all(self, waiters: list[Request], outcome: Outcome, error: RequestError) -> None:
        now = self._time()
        for request in waiters:
            self._ledger.end(request, outcome, now, error)


def _job_of(waiters: list[Request]) -> str | None:
    """The task or background request a shared trip's dead letter names: the first waiter's that has one."""
    return next((request.job_id for request in waiters if request.job_id is not None), None)
