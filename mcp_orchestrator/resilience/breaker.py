"""A circuit breaker: stop calling a backend that keeps failing, then probe it carefully.

    closed --(threshold consecutive failures)--> open --(timeout_s)--> half_open
    half_open --(probe success rate >= success_rate)--> closed
    half_open --(that rate can no longer be reached)--> open

Generic: it knows calls only as permits that end in success, failure or neither
(`release`, for outcomes that say nothing about the backend's health, such as a
rejected request or a caller that gave up). The clock is injected so tests can move
time without sleeping.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from mcp_orchestrator.models import BreakerStatus

Now = Callable[[], float]
StateListener = Callable[[str, "BreakerState", "BreakerState"], None]

# Guards `ceil(rate * probes)` against float noise (0.7 * 10 == 7.000000000000001).
_EPSILON = 1e-9


class BreakerState(StrEnum):
    closed = "closed"
    open = "open"
    half_open = "half_open"


@dataclass(frozen=True, slots=True)
class BreakerSettings:
    threshold: int = 5
    """Consecutive failures that open a closed breaker."""
    timeout_s: float = 60.0
    """How long an open breaker refuses calls before it lets probes through."""
    success_rate: float = 0.8
    """Share of successful probes needed to close again."""
    probes: int = 5
    """How many calls a half-open breaker lets through to judge the backend."""

    def __post_init__(self) -> None:
        if self.threshold < 1:
            raise ValueError(f"threshold must be at least 1 (got {self.threshold})")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be greater than 0 (got {self.timeout_s})")
        if not 0 < self.success_rate <= 1:
            raise ValueError(f"success_rate must be in (0, 1] (got {self.success_rate})")
        if self.probes < 1:
            raise ValueError(f"probes must be at least 1 (got {self.probes})")

    @property
    def probes_needed(self) -> int:
        """Successful probes that close the breaker."""
        return max(1, math.ceil(self.success_rate * self.probes - _EPSILON))


class BreakerOpen(Exception):
    """The breaker refused a call without letting it reach the backend."""

    def __init__(self, name: str, retry_after_s: float, *, probing: bool = False) -> None:
        self.name = name
        self.retry_after_s = retry_after_s
        self.probing = probing
        state = "half-open with every probe slot taken" if probing else "open"
        super().__init__(f"breaker {name!r} is {state}; retry after {retry_after_s:.3f} s")


class Permit:
    """One call's ticket through the breaker. End it exactly once; later ends are ignored."""

    __slots__ = ("_breaker", "_ended", "epoch", "probe")

    def __init__(self, breaker: CircuitBreaker, epoch: int, probe: bool) -> None:
        self._breaker = breaker
        self.epoch = epoch
        self.probe = probe
        self._ended = False

    @property
    def ended(self) -> bool:
        return self._ended

    def success(self) -> None:
        if self._end():
            self._breaker._on_success(self)

    def failure(self) -> None:
        if self._end():
            self._breaker._on_failure(self)

    def release(self) -> None:
        """End without a verdict: the outcome says nothing about the backend's health."""
        if self._end():
            self._breaker._on_release(self)

    def _end(self) -> bool:
        if self._ended:
            return False
        self._ended = True
        return True


class CircuitBreaker:
    def __init__(
        self,
        name: str,
        settings: BreakerSettings | None = None,
        *,
        now: Now = time.monotonic,
        on_change: StateListener | None = None,
    ) -> None:
        self.name = name
        self.settings = settings or BreakerSettings()
        self._now = now
        self._on_change = on_change
        self._state = BreakerState.closed
        # Bumped on every transition, so a permit taken in an earlier state cannot vote
        # in the current one (a slow call from before the breaker opened, say).
        self._epoch = 0
        self._opened_at = 0.0
        self._consecutive = 0
        self._probes_admitted = 0
        self._probe_successes = 0
        self._probe_failures = 0
        self.successes = 0
        self.failures = 0
        self.rejected = 0
        self.times_opened = 0

    # ------------------------------------------------------------------ reading

    @property
    def state(self) -> BreakerState:
        self._advance()
        return self._state

    def retry_after_s(self) -> float:
        """Seconds until an open breaker lets a probe through (0 unless open)."""
        self._advance()
        if self._state is not BreakerState.open:
            return 0.0
        return max(0.0, self._opened_at + self.settings.timeout_s - self._now())

    def available(self) -> bool:
        """Whether `acquire` would let a call through now (for pools choosing a member)."""
        self._advance()
        if self._state is BreakerState.closed:
            return True
        if self._state is BreakerState.half_open:
            return self._probes_admitted < self.settings.probes
        return False

    def snapshot(self) -> BreakerStatus:
        state = self.state
        return BreakerStatus(
            name=self.name,
            state=state.value,
            consecutive_failures=self._consecutive,
            successes=self.successes,
            failures=self.failures,
            rejected=self.rejected,
            times_opened=self.times_opened,
            retry_after_s=self._shown_retry_after(state),
            probes_in_flight=self._probes_admitted - self._probe_successes - self._probe_failures
            if state is BreakerState.half_open
            else 0,
        )

    def _shown_retry_after(self, state: BreakerState) -> float:
        """Milliseconds precision; an open breaker never shows 0 s left nor more than its timeout
        (float noise at either end of the open period)."""
        if state is not BreakerState.open:
            return 0.0
        return min(self.settings.timeout_s, max(0.001, round(self.retry_after_s(), 3)))

    # ------------------------------------------------------------------ calling

    def acquire(self) -> Permit:
        """A permit for one call, or BreakerOpen without touching the backend."""
        self._advance()
        if self._state is BreakerState.closed:
            return Permit(self, self._epoch, probe=False)
        if self._state is BreakerState.half_open and self._probes_admitted < self.settings.probes:
            self._probes_admitted += 1
            return Permit(self, self._epoch, probe=True)
        self.rejected += 1
        if self._state is BreakerState.half_open:
            # Every probe slot is taken: the verdict is pending, so ask for a short wait.
            raise BreakerOpen(self.name, 1.0, probing=True)
        raise BreakerOpen(self.name, self.retry_after_s())

    def force_open(self, for_s: float) -> None:
        """Open now and refuse calls for `for_s` seconds (at most the timeout): someone who
        shares this backend's health (another process) saw it fail. Never shortens an
        opening already under way."""
        for_s = min(for_s, self.settings.timeout_s)
        if for_s <= 0 or (self.state is BreakerState.open and self.retry_after_s() >= for_s):
            return
        if self._state is not BreakerState.open:
            self._transition(BreakerState.open)
        self._opened_at = self._now() - (self.settings.timeout_s - for_s)

    def update(self, settings: BreakerSettings) -> None:
        """New thresholds (config reload); the current state and counts are kept."""
        self.settings = settings
        if self._state is BreakerState.closed and self._consecutive >= settings.threshold:
            self._transition(BreakerState.open)
        elif self._state is BreakerState.half_open:
            self._judge_probes()

    # ------------------------------------------------------------------ permits report here

    def _on_success(self, permit: Permit) -> None:
        self.successes += 1
        if permit.epoch != self._epoch:
            return
        if self._state is BreakerState.closed:
            self._consecutive = 0
        elif self._state is BreakerState.half_open and permit.probe:
            self._probe_successes += 1
            self._judge_probes()

    def _on_failure(self, permit: Permit) -> None:
        self.failures += 1
        if permit.epoch != self._epoch:
            return
        if self._state is BreakerState.closed:
            self._consecutive += 1
            if self._consecutive >= self.settings.threshold:
                self._transition(BreakerState.open)
        elif self._state is BreakerState.half_open and permit.probe:
            self._probe_failures += 1
            self._judge_probes()

    def _on_release(self, permit: Permit) -> None:
        if permit.epoch == self._epoch and self._state is BreakerState.half_open and permit.probe:
            self._probes_admitted -= 1  # the slot goes to the next caller

    # ------------------------------------------------------------------ transitions

    def _judge_probes(self) -> None:
        needed = self.settings.probes_needed
        if self._probe_successes >= needed:
            self._transition(BreakerState.closed)
        elif self._probe_failures > self.settings.probes - needed:
            # Even if every remaining probe succeeded, the rate could not be reached.
            self._transition(BreakerState.open)

    def _advance(self) -> None:
        if self._state is BreakerState.open and self._now() >= self._opened_at + self.settings.timeout_s:
            self._transition(BreakerState.half_open)

    def _transition(self, new: BreakerState) -> None:
        old = self._state
        self._state = new
        self._epoch += 1
        if new is BreakerState.closed:
            self._consecutive = 0
        self._probes_admitted = self._probe_successes = self._probe_failures = 0
        if new is BreakerState.open:
            self._opened_at = self._now()
            self.times_opened += 1
        if self._on_change is not None and old is not new:
            self._on_change(self.name, old, new)
