"""Rate limits: the global token bucket and one bucket per session.

A request needs a token from its session's bucket (when per-session limits are on and
it has a session_id) and then one from the global bucket. Waiting happens in that
order, so a noisy session queues behind its own bucket and reaches the global one at
its own rate only: it cannot take the tokens other sessions need (as long as
per_session_rps is below requests_per_second).

Both waits are priority-ordered with aging (see resilience/ratelimit.PriorityGate) and
bounded by the request's remaining time; a request that cannot get its tokens in time
is refused with RateLimited carrying retry_after_ms.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from mcp_orchestrator.config import RateLimitsSection
from mcp_orchestrator.errors import RateLimited
from mcp_orchestrator.models import RateLimitStatus
from mcp_orchestrator.resilience.ratelimit import PriorityGate, TokenBucket, TokenUnavailable, to_ns

SWEEP_AT_LEAST = 1024
"""Idle session buckets are swept when the table grows past this (then past twice its live size)."""

GLOBAL = "global"
SESSION = "per-session"


class RateLimits:
    def __init__(
        self, section: RateLimitsSection, *, aging_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.section = section
        self.enabled = section.enabled
        self.aging_s = aging_s
        self.clock = clock
        self.global_gate = PriorityGate(
            TokenBucket(section.requests_per_second, section.burst_capacity), aging_s=aging_s, clock=clock
        )
        self.session_rps = section.per_session_rps
        self.session_burst = section.per_session_burst or section.burst_capacity
        self._sessions: dict[str, PriorityGate] = {}
        self._sweep_at = SWEEP_AT_LEAST
        self.refused = 0

    # ------------------------------------------------------------------ deciding

    def admit_now(self, rank: int, session_id: str | None, budget_s: float) -> bool:
        """Take the tokens now if both buckets have one and nobody waits; else say whether
        waiting can work: False means "wait with `admit`", RateLimited means it cannot."""
        if not self.enabled:
            return True
        session = self._session_gate(session_id)
        took_session = session is not None and session.try_take()
        if (session is None or took_session) and self.global_gate.try_take():
            return True
        if took_session:
            # The global bucket said no: give the session token back and queue for both,
            # in order, like any waiter.
            assert session is not None
            session.bucket.refund()
        for scope, gate in ((SESSION, session), (GLOBAL, self.global_gate)):
            if gate is not None and gate.eta_s(rank) > budget_s:
                raise self._refusal(scope, gate.eta_s(rank))
        return False

    async def admit(self, rank: int, session_id: str | None, budget_s: float) -> None:
        """Wait for the tokens, at most `budget_s` seconds; raise RateLimited when they do not come."""
        if not self.enabled:
            return
        started = self.clock()
        session = self._session_gate(session_id)
        if session is not None:
            try:
                await session.acquire(rank, budget_s)
            except TokenUnavailable as exc:
                raise self._refusal(SESSION, exc.retry_after_s) from None
        try:
            await self.global_gate.acquire(rank, budget_s - (self.clock() - started))
        except TokenUnavailable as exc:
            if session is not None:
                session.bucket.refund()
            raise self._refusal(GLOBAL, exc.retry_after_s) from None
        except BaseException:
            if session is not None:
                session.bucket.refund()
            raise

    def replaced(self, section: RateLimitsSection, aging_s: float) -> RateLimits:
        """Limits with new settings (a config reload) whose buckets start as full as these are
        now, so a reload never lets a fresh burst through. Requests already waiting finish
        their wait on these buckets."""
        new = RateLimits(section, aging_s=aging_s, clock=self.clock)
        new.refused = self.refused
        new.carry_over(self)
        return new

    def carry_over(self, old: RateLimits) -> None:
        """Start every bucket at the level of the bucket it replaces."""
        if not (self.enabled and old.enabled):
            return
        now = to_ns(self.clock())
        self.global_gate.bucket.start_at_level_of(old.global_gate.bucket, now)
        for session_id, gate in old._sessions.items():
            replacement = self._session_gate(session_id)
            if replacement is not None:
                replacement.bucket.start_at_level_of(gate.bucket, now)

    def clock_advanced(self) -> None:
        """Tell every waiter to look at its bucket again (fake clocks in tests)."""
        self.global_gate.wake()
        for gate in tuple(self._sessions.values()):
            gate.wake()

    # ------------------------------------------------------------------ state

    def tokens(self, session_id: str | None = None) -> float | None:
        """Tokens in the global bucket, or in `session_id`'s (None when that limit is off)."""
        if not self.enabled:
            return None
        if session_id is None:
            return self.global_gate.tokens()
        gate = self._sessions.get(session_id)
        if gate is None:
            return float(self.session_burst) if self.session_rps is not None else None
        return gate.tokens()

    def waiting(self) -> int:
        return self.global_gate.waiting + sum(gate.waiting for gate in self._sessions.values())

    def status(self) -> RateLimitStatus:
        section = self.section
        return RateLimitStatus(
            enabled=self.enabled,
            requests_per_second=section.requests_per_second,
            burst_capacity=section.burst_capacity,
            tokens_available=round(self.global_gate.tokens(), 3) if self.enabled else None,
            waiting=self.waiting(),
            refused=self.refused,
            per_session_rps=self.session_rps,
            per_session_burst=self.session_burst if self.session_rps is not None else None,
            sessions_tracked=len(self._sessions),
        )

    # ------------------------------------------------------------------ internals

    def _session_gate(self, session_id: str | None) -> PriorityGate | None:
        if session_id is None or self.session_rps is None:
            return None
        gate = self._sessions.get(session_id)
        if gate is None:
            if len(self._sessions) >= self._sweep_at:
                self._sweep()
            gate = PriorityGate(
                TokenBucket(self.session_rps, self.session_burst), aging_s=self.aging_s, clock=self.clock
            )
            self._sessions[session_id] = gate
        return gate

    def _sweep(self) -> None:
        """Forget idle sessions: a full bucket with no waiter is exactly a new bucket, so
        this changes no decision, and memory stays bounded by the sessions active lately."""
        self._sessions = {sid: gate for sid, gate in self._sessions.items() if not gate.is_idle()}
        self._sweep_at = max(SWEEP_AT_LEAST, 2 * len(self._sessions))

    def _refusal(self, scope: str, retry_after_s: float) -> RateLimited:
        self.refused += 1
        if scope == SESSION:
            assert self.session_rps is not None
            rate, burst = self.session_rps, self.session_burst
        else:
            rate, burst = self.section.requests_per_second, self.section.burst_capacity
        return RateLimited(scope, rate, burst, max(1, math.ceil(retry_after_s * 1000)))
