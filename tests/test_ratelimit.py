"""The token bucket and its priority-ordered gate, on a hand-moved clock.

The bound is checked with hypothesis over arbitrary arrival patterns, in exact
arithmetic: in every window of length T, admitted <= rate * T + burst; and under steady
overload the admitted count reaches that bound (less than one token short)."""

from __future__ import annotations

from fractions import Fraction
from functools import partial

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mcp_orchestrator.config import config_from_mapping
from mcp_orchestrator.errors import ConfigError
from mcp_orchestrator.resilience.ratelimit import NS_PER_S, PriorityGate, TokenBucket, TokenUnavailable
from tests.conftest import wait_for
from tests.support_admission import ManualClock

RATES = st.one_of(
    st.sampled_from([0.5, 1, 3, 7, 10, 33.3, 100, 1000]),
    st.floats(min_value=0.01, max_value=5000, allow_nan=False, allow_infinity=False),
)


def admitted_times(rate: float, burst: int, arrivals_us: list[int]) -> list[int]:
    """Offer one request at each arrival (microseconds); return the admitted times in ns."""
    bucket = TokenBucket(rate, burst)
    return [t * 1000 for t in arrivals_us if bucket.take(t * 1000)]


def max_in_window_violation(times_ns: list[int], rate: float, burst: int) -> tuple[int, int, int] | None:
    """Any window [times[i], times[j]] holding more than rate * T + burst admissions (exact)."""
    exact_rate = Fraction(rate)
    for i in range(len(times_ns)):
        for j in range(i, len(times_ns)):
            window = Fraction(times_ns[j] - times_ns[i], NS_PER_S)
            if j - i + 1 > exact_rate * window + burst:
                return i, j, j - i + 1
    return None


@st.composite
def arrival_patterns(draw: st.DrawFn) -> tuple[float, int, list[int]]:
    """A rate, a burst and arrival times (µs): random gaps mixed with gaps a hair either side
    of whole token intervals, where an off-by-a-little limiter would let one too many through."""
    rate = draw(RATES)
    burst = draw(st.one_of(st.integers(min_value=1, max_value=3), st.integers(min_value=1, max_value=40)))
    interval_us = 1_000_000 / rate
    near_interval = st.builds(lambda k, d: max(0, round(k * interval_us) + d), st.integers(0, 3), st.integers(-3, 3))
    gaps = draw(st.lists(st.one_of(st.integers(0, 400_000), near_interval), min_size=1, max_size=160))
    arrivals, t = [], 1_000_000
    for gap in gaps:
        t += gap
        arrivals.append(t)
    return rate, burst, arrivals


@settings(max_examples=400, deadline=None)
@given(arrival_patterns())
def test_no_window_admits_more_than_rate_times_length_plus_burst(pattern: tuple[float, int, list[int]]) -> None:
    rate, burst, arrivals = pattern
    times = admitted_times(rate, burst, arrivals)
    assert max_in_window_violation(times, rate, burst) is None


@settings(max_examples=100, deadline=None)
@given(
    rate=st.sampled_from([1, 5, 20, 100, 250]),
    burst=st.integers(min_value=1, max_value=50),
    seconds=st.integers(min_value=1, max_value=20),
    overload=st.sampled_from([2, 4, 10]),
)
def test_steady_overload_gets_the_whole_bound(rate: int, burst: int, seconds: int, overload: int) -> None:
    """Offered `overload` x the rate for `seconds`, opening with a burst's worth at once (the
    overload was already there when the window opened): admitted is the bound, to the token."""
    step_us = 1_000_000 // (rate * overload)
    arrivals = [0] * burst + list(range(0, seconds * 1_000_000 + 1, step_us))
    times = admitted_times(rate, burst, arrivals)
    bound = rate * Fraction(arrivals[-1], 1_000_000) + burst
    assert bound - 1 < len(times) <= bound
    assert len(times) / bound >= Fraction(98, 100)


def test_bucket_reports_tokens_and_waits() -> None:
    bucket = TokenBucket(10, 3)  # one token per 100 ms
    now = 5 * NS_PER_S
    assert bucket.tokens(now) == 3
    assert all(bucket.take(now) for _ in range(3))
    assert not bucket.take(now)
    assert bucket.tokens(now) == 0
    assert bucket.wait_ns(now) == NS_PER_S // 10
    assert bucket.wait_ns(now, tokens=3) == 3 * NS_PER_S // 10
    assert bucket.tokens(now + NS_PER_S // 20) == pytest.approx(0.5)
    bucket.refund()
    assert bucket.take(now)
    assert bucket.is_full(now + 3 * NS_PER_S // 10) and not bucket.is_full(now)


@pytest.mark.parametrize(("rate", "burst", "message"), [(0, 1, "rate"), (float("inf"), 1, "rate"), (1, 0, "burst")])
def test_bucket_rejects_bad_settings(rate: float, burst: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TokenBucket(rate, burst)


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ({"per_session_burst": 5}, "per_session_burst needs per_session_rps"),
        ({"requests_per_second": 0}, "rate_limits.requests_per_second"),
        ({"per_session_rps": float("inf")}, "rate_limits.per_session_rps: Input should be a finite number"),
        ({"burst_capacity": 0}, "rate_limits.burst_capacity"),
        ({"burst_capacty": 5}, "did you mean 'burst_capacity'"),
    ],
)
def test_rate_limit_config_errors_name_the_key(section: dict[str, object], expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        config_from_mapping({"rate_limits": section})


# ---------------------------------------------------------------------------- the gate


def empty_gate(rate: float = 1, burst: int = 1, aging_s: float = 10) -> tuple[PriorityGate, ManualClock]:
    clock = ManualClock()
    gate = PriorityGate(TokenBucket(rate, burst), aging_s=aging_s, clock=clock.now)
    for _ in range(burst):
        assert gate.try_take()
    return gate, clock


def has_waiting(gate: PriorityGate, count: int) -> bool:
    return gate.waiting == count


async def release_one(gate: PriorityGate, clock: ManualClock, admitted: list[str]) -> None:
    """Move time by one token's worth and let the head waiter take it."""
    before = len(admitted)
    clock.advance(gate.bucket.interval_ns / NS_PER_S)
    gate.wake()
    await wait_for(lambda: len(admitted) == before + 1)


@pytest.mark.anyio
async def test_gate_serves_waiters_by_priority_then_arrival() -> None:
    gate, clock = empty_gate()
    admitted: list[str] = []

    async def wait(name: str, rank: int) -> None:
        await gate.acquire(rank, budget_s=100)
        admitted.append(name)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for count, (name, rank) in enumerate(
                [("low", 3), ("normal-1", 2), ("high", 1), ("normal-2", 2), ("critical", 0)], start=1
            ):
                tg.start_soon(wait, name, rank)
                await wait_for(partial(has_waiting, gate, count))
            for _ in range(5):
                await release_one(gate, clock, admitted)
    assert admitted == ["critical", "high", "normal-1", "normal-2", "low"]
    assert gate.waiting == 0


@pytest.mark.anyio
async def test_gate_ages_low_priority_so_it_cannot_starve() -> None:
    """Aging 10 s per level: a low request (rank 3) that has waited 35 s goes before a critical
    one that just arrived (30 < 35), but not before one that arrived 6 s after it (30 > 6)."""
    gate, clock = empty_gate(rate=0.01, aging_s=10)
    admitted: list[str] = []

    async def wait(name: str, rank: int) -> None:
        await gate.acquire(rank, budget_s=10_000)
        admitted.append(name)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(wait, "early-critical", 0)
            await wait_for(lambda: gate.waiting == 1)
            clock.advance(6)
            tg.start_soon(wait, "low", 3)
            await wait_for(lambda: gate.waiting == 2)
            clock.advance(35)
            tg.start_soon(wait, "late-critical", 0)
            await wait_for(lambda: gate.waiting == 3)
            for _ in range(3):
                await release_one(gate, clock, admitted)
    assert admitted == ["early-critical", "low", "late-critical"]


@pytest.mark.anyio
async def test_gate_refuses_at_once_when_the_token_cannot_come_in_time() -> None:
    gate, clock = empty_gate(rate=2, burst=1)  # next token in 0.5 s
    with pytest.raises(TokenUnavailable) as refused:
        await gate.acquire(2, budget_s=0.4)
    assert refused.value.retry_after_s == pytest.approx(0.5)
    assert gate.waiting == 0
    assert clock.now() == 10_000.0  # no time passed: refused without waiting


@pytest.mark.anyio
async def test_gate_refuses_a_waiter_whose_budget_runs_out() -> None:
    """Critical arrivals may push a waiting low request past its budget: it is refused then."""
    gate, clock = empty_gate(rate=1, burst=1)
    outcome: list[object] = []

    async def low() -> None:
        try:
            await gate.acquire(3, budget_s=1.5)
            outcome.append("admitted")
        except TokenUnavailable as exc:
            outcome.append(exc)

    async def critical() -> None:
        await gate.acquire(0, budget_s=100)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(low)
            await wait_for(lambda: gate.waiting == 1)
            tg.start_soon(critical)
            tg.start_soon(critical)
            await wait_for(lambda: gate.waiting == 3)
            clock.advance(1)
            gate.wake()
            await wait_for(lambda: gate.waiting == 2)  # the first critical went
            clock.advance(0.6)  # past the low one's budget
            gate.wake()
            await wait_for(lambda: len(outcome) == 1)
            clock.advance(0.4)
            gate.wake()
    assert isinstance(outcome[0], TokenUnavailable)
    assert gate.waiting == 0


@pytest.mark.anyio
async def test_a_cancelled_waiter_hands_its_place_to_the_next() -> None:
    gate, clock = empty_gate()
    admitted: list[str] = []
    first = anyio.CancelScope()

    async def wait(name: str, rank: int, scope: anyio.CancelScope) -> None:
        with scope:
            await gate.acquire(rank, budget_s=100)
            admitted.append(name)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(wait, "first", 0, first)
            await wait_for(lambda: gate.waiting == 1)
            tg.start_soon(wait, "second", 2, anyio.CancelScope())
            await wait_for(lambda: gate.waiting == 2)
            first.cancel()
            await wait_for(lambda: gate.waiting == 1)
            await release_one(gate, clock, admitted)
    assert admitted == ["second"]
