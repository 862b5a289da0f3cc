"""The circuit breaker on its own: state machine (hypothesis, against a small model) and examples."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, initialize, invariant, multiple, rule

from mcp_orchestrator.resilience.breaker import BreakerOpen, BreakerSettings, BreakerState, CircuitBreaker, Permit
from tests.support_faults_extra import FakeClock

# ---------------------------------------------------------------------------- examples


def make(
    threshold: int = 3, timeout_s: float = 10, success_rate: float = 0.8, probes: int = 5
) -> tuple[CircuitBreaker, FakeClock, list[tuple[BreakerState, BreakerState]]]:
    clock = FakeClock()
    changes: list[tuple[BreakerState, BreakerState]] = []
    breaker = CircuitBreaker(
        "backend-a",
        BreakerSettings(threshold, timeout_s, success_rate, probes),
        now=clock.now,
        on_change=lambda name, old, new: changes.append((old, new)),
    )
    return breaker, clock, changes


def fail_times(breaker: CircuitBreaker, n: int) -> None:
    for _ in range(n):
        breaker.acquire().failure()


def test_opens_after_threshold_consecutive_failures_and_fails_fast() -> None:
    breaker, clock, changes = make(threshold=3, timeout_s=10)
    fail_times(breaker, 2)
    assert breaker.state is BreakerState.closed
    fail_times(breaker, 1)
    assert breaker.state is BreakerState.open
    assert changes == [(BreakerState.closed, BreakerState.open)]
    clock.advance(4)
    with pytest.raises(BreakerOpen) as caught:
        breaker.acquire()
    assert str(caught.value) == "breaker 'backend-a' is open; retry after 6.000 s"  # generic: no product wording
    assert caught.value.retry_after_s == pytest.approx(6)
    assert not caught.value.probing
    assert breaker.snapshot().rejected == 1


def test_a_success_resets_the_consecutive_count() -> None:
    breaker, _, _ = make(threshold=3)
    fail_times(breaker, 2)
    breaker.acquire().success()
    fail_times(breaker, 2)
    assert breaker.state is BreakerState.closed
    assert breaker.snapshot().consecutive_failures == 2


def test_release_is_neutral_permanent_errors_do_not_trip() -> None:
    breaker, _, _ = make(threshold=2)
    for _ in range(50):
        breaker.acquire().release()
    breaker.acquire().failure()
    breaker.acquire().release()
    assert breaker.state is BreakerState.closed
    assert breaker.snapshot().consecutive_failures == 1


def test_half_open_after_timeout_then_closes_on_probe_successes() -> None:
    breaker, clock, changes = make(threshold=1, timeout_s=10, success_rate=0.8, probes=5)
    fail_times(breaker, 1)
    clock.advance(9.999)
    assert breaker.state is BreakerState.open
    clock.advance(0.001)
    assert breaker.state is BreakerState.half_open
    permits = [breaker.acquire() for _ in range(5)]
    with pytest.raises(BreakerOpen, match="half-open"):
        breaker.acquire()  # every probe slot is taken
    permits[0].failure()  # one failure of five still allows 80%
    assert breaker.state is BreakerState.half_open
    for permit in permits[1:4]:
        permit.success()
    assert breaker.state is BreakerState.half_open
    permits[4].success()
    assert breaker.state is BreakerState.closed
    assert changes[-2:] == [
        (BreakerState.open, BreakerState.half_open),
        (BreakerState.half_open, BreakerState.closed),
    ]


def test_half_open_reopens_once_the_rate_cannot_be_reached() -> None:
    breaker, clock, _ = make(threshold=1, timeout_s=10, success_rate=0.8, probes=5)
    fail_times(breaker, 1)
    clock.advance(10)
    first, second = breaker.acquire(), breaker.acquire()
    first.failure()
    second.failure()
    assert breaker.state is BreakerState.open
    assert breaker.retry_after_s() == pytest.approx(10)  # a fresh timeout from the reopening
    assert breaker.snapshot().times_opened == 2


def test_released_probe_frees_its_slot() -> None:
    breaker, clock, _ = make(threshold=1, timeout_s=1, probes=1, success_rate=1)
    fail_times(breaker, 1)
    clock.advance(1)
    probe = breaker.acquire()
    assert not breaker.available()
    probe.release()  # e.g. the caller gave up: no verdict
    assert breaker.available()
    breaker.acquire().success()
    assert breaker.state is BreakerState.closed


def test_stale_permits_do_not_vote_after_a_transition() -> None:
    breaker, clock, _ = make(threshold=2, timeout_s=5, probes=1, success_rate=1)
    slow = breaker.acquire()  # taken while closed, ends after the breaker opened
    fail_times(breaker, 2)
    slow.success()
    assert breaker.state is BreakerState.open
    clock.advance(5)
    probe = breaker.acquire()
    slow.failure()  # already ended: ignored
    probe.failure()
    assert breaker.state is BreakerState.open


def test_permit_ends_once() -> None:
    breaker, _, _ = make(threshold=2)
    permit = breaker.acquire()
    permit.failure()
    permit.failure()
    permit.success()
    assert breaker.snapshot().failures == 1
    assert breaker.snapshot().consecutive_failures == 1


def test_update_applies_new_threshold_and_keeps_state() -> None:
    breaker, _, _ = make(threshold=5)
    fail_times(breaker, 3)
    breaker.update(BreakerSettings(threshold=3, timeout_s=10))
    assert breaker.state is BreakerState.open


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("threshold", 0, "threshold must be at least 1"),
        ("timeout_s", 0, "timeout_s must be greater than 0"),
        ("success_rate", 1.5, "success_rate must be in"),
        ("probes", 0, "probes must be at least 1"),
    ],
)
def test_bad_settings_name_the_field(field: str, value: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BreakerSettings(**{field: value})  # type: ignore[arg-type]


@given(rate=st.floats(0.01, 1), probes=st.integers(1, 50))
def test_probes_needed_is_the_smallest_count_reaching_the_rate(rate: float, probes: int) -> None:
    needed = BreakerSettings(success_rate=rate, probes=probes).probes_needed
    assert 1 <= needed <= probes
    assert needed / probes >= rate - 1e-9
    assert needed == 1 or (needed - 1) / probes < rate - 1e-9


@given(failures=st.lists(st.booleans(), max_size=60), threshold=st.integers(1, 8))
def test_closed_opens_exactly_at_threshold_consecutive_failures(failures: list[bool], threshold: int) -> None:
    """Feed a closed breaker successes (False) and failures (True): it opens at the first run of `threshold`."""
    breaker, _, _ = make(threshold=threshold, timeout_s=1000)
    run = 0
    for failed in failures:
        permit = breaker.acquire()
        permit.failure() if failed else permit.success()
        run = run + 1 if failed else 0
        if run >= threshold:
            assert breaker.state is BreakerState.open
            return
        assert breaker.state is BreakerState.closed


# ---------------------------------------------------------------------------- the state machine


@dataclass
class Held:
    permit: Permit
    epoch: int
    probe: bool


class BreakerMachine(RuleBasedStateMachine):
    """Random acquire/success/failure/release/time steps, checked against a plain model."""

    permits = Bundle("permits")

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.breaker: CircuitBreaker | None = None
        # The model.
        self.state = BreakerState.closed
        self.epoch = 0
        self.opened_at = 0.0
        self.run = 0
        self.admitted = self.ok = self.bad = 0

    @initialize(
        threshold=st.integers(1, 4),
        timeout=st.sampled_from([1.0, 2.5, 10.0]),
        rate=st.sampled_from([0.5, 0.8, 1.0]),
        probes=st.integers(1, 4),
    )
    def configure(self, threshold: int, timeout: float, rate: float, probes: int) -> None:
        self.settings = BreakerSettings(threshold, timeout, rate, probes)
        self.breaker = CircuitBreaker("m", self.settings, now=self.clock.now)

    def _go(self, state: BreakerState) -> None:
        self.state = state
        self.epoch += 1
        self.admitted = self.ok = self.bad = 0
        if state is BreakerState.open:
            self.opened_at = self.clock.now()
        if state is BreakerState.closed:
            self.run = 0

    def _tick(self) -> None:
        if self.state is BreakerState.open and self.clock.now() >= self.opened_at + self.settings.timeout_s:
            self._go(BreakerState.half_open)

    def _judge(self) -> None:
        needed = self.settings.probes_needed
        if self.ok >= needed:
            self._go(BreakerState.closed)
        elif self.bad + needed > self.settings.probes:
            self._go(BreakerState.open)

    @rule(target=permits)
    def acquire(self) -> Held | object:
        assert self.breaker is not None
        self._tick()
        admits = self.state is BreakerState.closed or (
            self.state is BreakerState.half_open and self.admitted < self.settings.probes
        )
        if not admits:
            with pytest.raises(BreakerOpen):
                self.breaker.acquire()
            return multiple()
        permit = self.breaker.acquire()
        probe = self.state is BreakerState.half_open
        if probe:
            self.admitted += 1
        return Held(permit, self.epoch, probe)

    @rule(held=consumes(permits), outcome=st.sampled_from(["success", "failure", "release"]))
    def finish(self, held: Held, outcome: str) -> None:
        assert self.breaker is not None
        self._tick()
        getattr(held.permit, outcome)()
        if held.epoch != self.epoch:
            return
        if outcome == "release":
            if self.state is BreakerState.half_open and held.probe:
                self.admitted -= 1
        elif self.state is BreakerState.closed:
            self.run = 0 if outcome == "success" else self.run + 1
            if self.run >= self.settings.threshold:
                self._go(BreakerState.open)
        elif self.state is BreakerState.half_open and held.probe:
            if outcome == "success":
                self.ok += 1
            else:
                self.bad += 1
            self._judge()

    @rule(seconds=st.sampled_from([0.1, 0.5, 1.0, 2.5, 10.0]))
    def wait(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @invariant()
    def agrees_with_model(self) -> None:
        assert self.breaker is not None
        self._tick()
        snap = self.breaker.snapshot()
        assert snap.state == self.state.value
        assert self.breaker.available() == (
            self.state is BreakerState.closed
            or (self.state is BreakerState.half_open and self.admitted < self.settings.probes)
        )
        if self.state is BreakerState.open:
            expected = self.opened_at + self.settings.timeout_s - self.clock.now()
            assert snap.retry_after_s == pytest.approx(expected, abs=1e-3)
            assert 0 < snap.retry_after_s <= self.settings.timeout_s
        else:
            assert snap.retry_after_s == 0
        if self.state is BreakerState.closed:
            assert snap.consecutive_failures == self.run < self.settings.threshold
        if self.state is BreakerState.half_open:
            assert 0 <= snap.probes_in_flight <= self.settings.probes


TestBreakerMachine = BreakerMachine.TestCase
TestBreakerMachine.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
