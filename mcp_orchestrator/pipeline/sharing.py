"""Admission with other processes: trips that share flights, answers, limits, breaker openings
and dead letters through Redis (mcp_orchestrator/distributed) when [distributed] redis_url is set.

Local state always comes first and stays the truth for this process: a request still
answers from the local cache or joins a local trip at once (admission.py). Only a new trip
asks Redis, in one round trip, whether another process already has the answer (the shared
cache), is getting it (then the trip follows that flight and its waiters answer
`coalesced: true`), or whether this trip leads. A leading trip passes the rate limits
(one shared bucket for every process) and runs the stages as usual; when it ends, its
outcome reaches the followers (coalesce.Trips tells its `Lead`, after its own waiters).

When Redis cannot answer in time (distributed/link.py), the trip goes on exactly as without
sharing: local flights, cache, limits. Nothing waits on Redis past its timeout.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import anyio

from mcp_orchestrator.config import Config
from mcp_orchestrator.distributed import RedisUnavailable, SharedState
from mcp_orchestrator.distributed.dead_letters import Letter
from mcp_orchestrator.distributed.ends import CachePut, Ending, Outcome
from mcp_orchestrator.distributed.flights import Joined, Watch
from mcp_orchestrator.errors import RateLimited, ReplayRefused, WorkerFailed
from mcp_orchestrator.models import DeadLetter, DeadLetterReason, GenerationParams, Message, Submission
from mcp_orchestrator.pipeline.answers import Answer, CachedAnswer
from mcp_orchestrator.pipeline.coalesce import answer_key
from mcp_orchestrator.pipeline.dead_letters import DeadLetterEntry, DeadLetterQueue
from mcp_orchestrator.pipeline.lease import WorkerLease
from mcp_orchestrator.pipeline.limits import GLOBAL, SESSION
from mcp_orchestrator.pipeline.request import Trip

if TYPE_CHECKING:
    from mcp_orchestrator.pipeline.admission import Admission
    from mcp_orchestrator.pipeline.breakers import Breakers

log = logging.getLogger(__name__)

LOCK_SLACK_S = 0.05
"""A follower joins again this long after the leader's lock would have expired."""
VOLATILE = frozenset({"in_flight", "requests", "failed", "api_key"})
"""describe() entries that change while a worker runs (or say whether a key is set): not its identity."""


# ---------------------------------------------------------------------------- answers on the wire


def encode(answer: Answer) -> str:
    """An answer as JSON (the cache's packed form: plain values, no secrets, no prompt)."""
    packed = CachedAnswer.pack(answer)
    return json.dumps(
        [packed.text, packed.finish_reason, packed.worker, packed.model, packed.tokens, packed.provenance]
    )


def decode(payload: str) -> Answer:
    text, finish_reason, worker, model, tokens, provenance = json.loads(payload)
    return CachedAnswer(
        text, finish_reason, worker, model, tuple(tokens) if tokens else None, tuple(provenance) if provenance else None
    ).unpack()


def worker_identity(lease: WorkerLease, config: Config) -> str:
    """What makes two processes' answers interchangeable: the worker as it describes itself
    (settings, no counters, no key), and the config that shapes the answer besides the
    request (post-processing, parameter defaults). A local key uses the swap generation
    instead, which means nothing to another process."""

    def stable(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: stable(item) for key, item in value.items() if key not in VOLATILE}
        if isinstance(value, list | tuple):
            return [stable(item) for item in value]
        return value

    inference = config.stages.inference
    shape = {
        "worker": stable(lease.worker.describe()),
        "post_process": config.stages.post_process.model_dump(mode="json"),
        "defaults": [inference.max_tokens, inference.temperature, inference.top_p, inference.seed, inference.stop],
    }
    return hashlib.sha256(json.dumps(shape, sort_keys=True, default=str).encode()).hexdigest()[:32]


# ---------------------------------------------------------------------------- leading a flight


@dataclass(eq=False)
class FlightLead:
    """This process calls the backend for every process waiting on `key` (a coalesce.Lead)."""

    sharing: Sharing
    key: str

    def finish(self, answer: Answer, cacheable: bool) -> None:
        cache = self.sharing.shared.cache

        def ending() -> tuple[Outcome, CachePut | None]:
            # Encoded when the end is sent (distributed/ends.py), not on the caller's path.
            payload = encode(answer)
            return Outcome("ok", answer=payload), cache.put_args(self.key, payload) if cacheable else None

        self._end(ending)

    def fail(self, error: str) -> None:
        outcome = Outcome("failed", error=error)
        self._end(lambda: (outcome, None))

    def release(self) -> None:
        self._end(lambda: (Outcome("released"), None))

    def _end(self, ending: Ending) -> None:
        self.sharing.leads.discard(self)
        self.sharing.shared.flights.ends.end(self.key, ending)


# ---------------------------------------------------------------------------- the pipeline's side


class Sharing:
    def __init__(self, shared: SharedState, *, lease: WorkerLease, config: Callable[[], Config]) -> None:
        self.shared = shared
        self._lease = lease
        self._config = config
        self._identity: tuple[int, int, str] | None = None
        """(lease generation, id of the config, identity) of the last worker identity computed."""
        self.admission: Admission | None = None
        """Set by the pipeline: where a trip goes on after sharing decided (limits, stages)."""
        self.leads: set[FlightLead] = set()
        """Flights this process leads now: their locks are renewed until they end."""
        self._renewing = False

    # ------------------------------------------------------------------ wiring

    def attach(self, breakers: Breakers, dead_letters: DeadLetterQueue) -> None:
        """Share breaker openings and dead letters both ways."""
        shared = self.shared
        breakers.on_open = lambda name, seconds: shared.soon(partial(shared.breakers.opened, name, seconds))
        shared.breakers.open_local = breakers.open_for
        dead_letters.id_prefix = f"dl-{shared.owner.rsplit('/', 1)[1]}-"
        dead_letters.on_add = self._letter_written
        shared.dead_letters.on_letter = partial(self._letter_read, dead_letters)

    def _letter_written(self, entry: DeadLetterEntry) -> None:
        payload = json.dumps(
            {"letter": entry.letter.model_dump(mode="json"), "submission": entry.submission.model_dump(mode="json")}
        )
        letters = self.shared.dead_letters
        letters.add(Letter(entry.letter.id, self.shared.owner, payload))
        self.shared.soon(letters.flush)

    @staticmethod
    def _letter_read(queue: DeadLetterQueue, letter: Letter) -> None:
        try:
            data = json.loads(letter.payload)
            queue.add_shared(DeadLetter.model_validate(data["letter"]), Submission.model_validate(data["submission"]))
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring a malformed dead letter %s from Redis: %s", letter.id, exc)

    # ------------------------------------------------------------------ admission

    def key(self, messages: tuple[Message, ...], params: GenerationParams) -> str:
        """The answer key other processes use too: the worker's identity instead of the local
        swap generation."""
        lease, config = self._lease, self._config()
        cached = self._identity
        if cached is None or cached[0] != lease.generation or cached[1] != id(config):
            cached = self._identity = (lease.generation, id(config), worker_identity(lease, config))
        worker = lease.worker
        return answer_key(f"{worker.kind}@{cached[2]}", worker.model, messages, params)

    async def share(self, trip: Trip, *, key: str, lead: bool) -> None:
        """Decide with the other processes: answer from the shared cache, follow their flight,
        or lead (then on to the rate limits and the stages). `lead`: identical requests may
        coalesce with this trip (dedup on); else the shared cache is only looked at."""
        flights = self.shared.flights
        joined: Joined | None = None
        outcome: Outcome | None = None
        was_following = False
        with anyio.CancelScope() as scope:  # trip.stop() cancels it: nobody waits any more
            trip.scope = scope
            try:
                with flights.watch(key) as watch:
                    while True:
                        joined = await self._join(key, look=trip.cacheable, lead=lead)
                        if joined is None or joined.verdict != "follow":
                            break
                        if not was_following:
                            was_following = True
                            flights.followed += 1
                        outcome = await self._follow(watch, joined)
                        if outcome is not None:
                            break
            finally:
                trip.scope = None
        leads = joined is not None and joined.verdict == "lead"
        if scope.cancelled_caught or trip.stopped:
            if leads:
                FlightLead(self, key).release()
            return
        if leads and was_following:
            flights.taken_over += 1
        self._go_on(trip, key, joined, outcome, leads)

    async def _join(self, key: str, *, look: bool, lead: bool) -> Joined | None:
        try:
            return await self.shared.flights.join(key, look=look, share=lead)
        except RedisUnavailable:
            self.shared.local_fallbacks += 1
            return None

    @staticmethod
    async def _follow(watch: Watch, joined: Joined) -> Outcome | None:
        """The leader's outcome, or None: join again (it released, or its lock should have expired)."""
        outcome = await watch.wait(joined.lock_ms / 1000 + LOCK_SLACK_S)
        return outcome if outcome is not None and outcome.status != "released" else None

    def _go_on(self, trip: Trip, key: str, joined: Joined | None, outcome: Outcome | None, leads: bool) -> None:
        assert self.admission is not None
        trips = self.admission.trips
        if outcome is not None:
            if outcome.status == "ok":
                trips.answer_shared(trip, decode(outcome.answer), cached=False)
            else:
                error = WorkerFailed(f"{outcome.error} (the identical request another orchestrator process ran)")
                trips.fail(trip, error, DeadLetterReason.worker_error)
            return
        if joined is not None and joined.verdict == "hit":
            self.shared.cache.hits += 1
            trips.answer_shared(trip, decode(joined.answer), cached=True)
            return
        if leads:
            flight = FlightLead(self, key)
            trip.lead = flight
            self.leads.add(flight)
            if not self._renewing:
                self._renewing = True
                self.shared.spawn(self._renew_leads)
        self.admission.pass_limits(trip, self.admission.now())

    async def _renew_leads(self) -> None:
        """Renew every lock we hold, every third of the lock's expiry, while the flights run (a
        leader that dies stops renewing: its locks expire and followers take over). One task
        for all flights, so a flight costs no task of its own."""
        flights = self.shared.flights
        while True:
            await anyio.sleep(flights.lock_ttl_ms / 3000)
            for lead in tuple(self.leads):
                if lead in self.leads and not await flights.renew(lead.key):
                    self.leads.discard(lead)  # lost (Redis unreachable, or we stalled past the expiry)

    # ------------------------------------------------------------------ rate limits

    async def pass_limits(self, trip: Trip) -> None:
        """Take a token from the shared buckets (the session's and the global one), waiting in
        line when the reservation is in the future; Redis unreachable: the local limiter."""
        admission = self.admission
        assert admission is not None
        section = admission.rate_limits
        buckets = self.shared.limits.buckets(
            rate=section.requests_per_second,
            burst=section.burst_capacity,
            session_id=trip.submission.session_id,
            session_rate=section.per_session_rps,
            session_burst=section.per_session_burst or section.burst_capacity,
        )
        refusal: RateLimited | None = None
        local = False
        with anyio.CancelScope() as scope:
            trip.scope = scope
            try:
                while True:
                    deadline = trip.deadline
                    budget = deadline - admission.now() - section.min_remaining_ms / 1000
                    try:
                        reservation = await self.shared.limits.reserve(buckets, budget)
                    except RedisUnavailable:
                        self.shared.local_fallbacks += 1
                        local = True
                        break
                    if reservation.granted:
                        await anyio.sleep(reservation.wait_s)
                        break
                    if trip.deadline > deadline:
                        continue  # a waiter with more time joined meanwhile: ask again for it
                    scope_name = SESSION if len(buckets) > 1 and reservation.bound == 0 else GLOBAL
                    rate, burst = (buckets[reservation.bound].rate, buckets[reservation.bound].burst)
                    refusal = RateLimited(scope_name, rate, burst, max(1, round(reservation.wait_s * 1000)))
                    break
            finally:
                trip.scope = None
        if scope.cancelled_caught or trip.stopped:
            return
        if local:
            admission.pass_local_limits(trip, admission.now())
        elif refusal is not None:
            admission.trips.refuse(trip, refusal)
        else:
            admission.entered_after_wait(trip)

    # ------------------------------------------------------------------ replays

    async def claim_replay(self, letter_id: str) -> str:
        """Claim the one replay of `letter_id` across every process: the claim's token.
        ReplayRefused if taken or if Redis cannot say (a replay that might run twice is not started)."""
        try:
            claim = await self.shared.dead_letters.claim(letter_id)
        except RedisUnavailable:
            raise ReplayRefused(
                letter_id,
                f"Redis at {self.shared.link.where} is unreachable, so the claim cannot be checked; try again",
            ) from None
        if claim.holder is not None:
            holder = claim.holder
            who = "this process" if holder == self.shared.owner else f"process {holder.rsplit('/', 1)[0]}"
            raise ReplayRefused(letter_id, f"already replayed by {who}")
        return claim.token

    async def release_replay(self, letter_id: str, token: str) -> None:
        """Give the claim back (the replay was refused before it ran). If Redis cannot be told,
        the letter stays claimed: it is never replayed twice."""
        try:
            await self.shared.dead_letters.release(letter_id, token)
        except RedisUnavailable:
            log.warning("dead letter %s stays claimed: Redis could not be told its replay never ran", letter_id)


def build_sharing(
    url: str,
    config: Config,
    current_config: Callable[[], Config],
    lease: WorkerLease,
    breakers: Breakers,
    dead_letters: DeadLetterQueue,
) -> Sharing:
    """Sharing through the Redis at `url`, wired to the pipeline's breakers and dead letters."""
    shared = SharedState(url, config.distributed, config.deduplication, config.pipeline.dead_letter_capacity)
    sharing = Sharing(shared, lease=lease, config=current_config)
    sharing.attach(breakers, dead_letters)
    return sharing
