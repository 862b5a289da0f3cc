"""Backoff, Retry-After and the deadline rule, on their own (hypothesis for the bounds)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mcp_orchestrator.errors import CircuitOpen, StageTimeout, WorkerFailed
from mcp_orchestrator.models import Submission
from mcp_orchestrator.pipeline import Pipeline
from mcp_orchestrator.resilience.retry import RetryPolicy, Verdict, call_with_retries, plan_retry
from mcp_orchestrator.workers.base import WorkerError
from tests.conftest import make_config
from tests.support_faults_extra import FakeClock
from tests.support_workers import Scripted

policies = st.builds(
    lambda retries, base, factor: RetryPolicy(retries, base, base * factor),
    st.integers(0, 10),
    st.floats(0.001, 5),
    st.floats(1, 1000),
)
unit = st.floats(0, 1, exclude_max=True)


@given(policy=policies, retry=st.integers(0, 200), u=unit)
def test_backoff_is_full_jitter_under_a_capped_exponential(policy: RetryPolicy, retry: int, u: float) -> None:
    ceiling = policy.ceiling(retry)
    assert ceiling == pytest.approx(min(policy.max_s, policy.base_s * 2.0 ** min(retry, 64)))
    assert policy.base_s <= ceiling <= policy.max_s
    delay = policy.backoff(retry, lambda: u)
    assert 0 <= delay <= ceiling
    assert delay == pytest.approx(u * ceiling)


@given(policy=policies, retry=st.integers(0, 100))
def test_ceiling_grows_then_stays_at_max(policy: RetryPolicy, retry: int) -> None:
    assert policy.ceiling(retry) <= policy.ceiling(retry + 1)
    if policy.base_s * 2**retry >= policy.max_s:
        assert policy.ceiling(retry) == policy.max_s


@given(policy=policies, retry=st.integers(0, 20), after=st.floats(0, 600), u=unit)
def test_retry_after_is_a_floor(policy: RetryPolicy, retry: int, after: float, u: float) -> None:
    delay = policy.delay(retry, after, lambda: u)
    assert delay >= after
    assert delay <= max(after, policy.ceiling(retry))


@given(
    policy=policies,
    retry=st.integers(0, 12),
    retryable=st.booleans(),
    after=st.none() | st.floats(0, 120),
    now=st.floats(0, 1e6),
    remaining=st.floats(-1, 60),
    u=unit,
)
def test_plan_never_sleeps_to_the_deadline(
    policy: RetryPolicy, retry: int, retryable: bool, after: float | None, now: float, remaining: float, u: float
) -> None:
    deadline = now + remaining
    wait = plan_retry(policy, retry, Verdict(retryable, after), now, deadline, lambda: u)
    if not retryable or retry >= policy.retries:
        assert wait is None
    elif wait is not None:
        assert now + wait < deadline
        assert wait == policy.delay(retry, after, lambda: u)
    else:
        assert now + policy.delay(retry, after, lambda: u) >= deadline


@pytest.mark.parametrize("bad", [{"retries": -1}, {"base_s": 0}, {"base_s": 2, "max_s": 1}])
def test_bad_policy_is_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**bad)  # type: ignore[arg-type]


class Flaky(Exception):
    def __init__(self, retryable: bool = True, after: float | None = None) -> None:
        super().__init__(f"flaky retryable={retryable} after={after}")
        self.retryable = retryable
        self.after = after


def judge(exc: BaseException) -> Verdict | None:
    return Verdict(exc.retryable, exc.after) if isinstance(exc, Flaky) else None


pytestmark = pytest.mark.anyio


async def test_retries_until_success_and_counts_attempts() -> None:
    clock = FakeClock()
    calls: list[int] = []
    retries: list[tuple[int, float]] = []

    async def attempt(n: int) -> str:
        calls.append(n)
        if n < 2:
            raise Flaky()
        return "ok"

    result = await call_with_retries(
        attempt,
        policy=RetryPolicy(3, 0.1, 5),
        deadline=clock.now() + 60,
        clock=clock,
        judge=judge,
        on_retry=lambda n, exc, wait: retries.append((n, wait)),
        rand=lambda: 0.5,
    )
    assert result == "ok"
    assert calls == [0, 1, 2]
    assert clock.sleeps == [pytest.approx(0.05), pytest.approx(0.1)]
    assert [n for n, _ in retries] == [0, 1]


async def test_gives_up_after_the_retries_with_the_last_error() -> None:
    clock = FakeClock()
    errors = [Flaky(after=float(i)) for i in range(10)]

    async def attempt(n: int) -> str:
        raise errors[n]

    with pytest.raises(Flaky) as caught:
        await call_with_retries(
            attempt, policy=RetryPolicy(2, 0.1, 5), deadline=clock.now() + 600, clock=clock, judge=judge
        )
    assert caught.value is errors[2]
    assert len(clock.sleeps) == 2


async def test_permanent_errors_are_not_retried() -> None:
    clock = FakeClock()

    async def attempt(n: int) -> str:
        raise Flaky(retryable=False)

    with pytest.raises(Flaky):
        await call_with_retries(attempt, policy=RetryPolicy(5), deadline=clock.now() + 60, clock=clock, judge=judge)
    assert clock.sleeps == []


async def test_foreign_exceptions_propagate_untouched() -> None:
    clock = FakeClock()

    async def attempt(n: int) -> str:
        raise KeyError("bug")

    with pytest.raises(KeyError):
        await call_with_retries(attempt, policy=RetryPolicy(5), deadline=clock.now() + 60, clock=clock, judge=judge)
    assert clock.sleeps == []


async def test_retry_after_is_honoured_and_the_deadline_is_never_slept_past() -> None:
    clock = FakeClock()
    start = clock.now()
    calls = 0

    async def attempt(n: int) -> str:
        nonlocal calls
        calls += 1
        raise Flaky(after=2.0)

    with pytest.raises(Flaky):
        await call_with_retries(
            attempt, policy=RetryPolicy(10, 0.1, 1), deadline=start + 5, clock=clock, judge=judge, rand=lambda: 0.99
        )
    # Waits of 2 s each: 0 -> 2 -> 4; a third wait would end at 6 > 5, so it fails at once.
    assert clock.sleeps == [2.0, 2.0]
    assert calls == 3
    assert clock.now() - start == 4.0


@given(
    afters=st.lists(st.none() | st.floats(0, 3), min_size=1, max_size=12),
    budget=st.floats(0.01, 10),
    retries=st.integers(0, 10),
    u=unit,
)
async def test_total_sleep_stays_inside_the_deadline(
    afters: list[float | None], budget: float, retries: int, u: float
) -> None:
    clock = FakeClock()
    start = clock.now()
    deadline = start + budget

    async def attempt(n: int) -> str:
        assert clock.now() < deadline  # every attempt starts before the deadline
        raise Flaky(after=afters[n % len(afters)])

    with pytest.raises(Flaky):
        await call_with_retries(
            attempt,
            policy=RetryPolicy(retries, 0.05, 2),
            deadline=deadline,
            clock=clock,
            judge=judge,
            rand=lambda: u,
        )
    assert clock.now() < deadline
    assert len(clock.sleeps) <= retries
    for index, wait in enumerate(clock.sleeps):
        after = afters[index % len(afters)]
        assert wait >= (after or 0)


# ---------------------------------------------------------------------------- the retry loop inside the pipeline
# A worker that fails on command, for the loop's unit tests only; the user-visible
# behaviour is tested through the real HTTP workers in test_resilience_faults.py.


def busy(after: float | None = None) -> WorkerError:
    return WorkerError("scripted", "overloaded", retryable=True, status=503, retry_after_s=after)


@asynccontextmanager
async def pipeline_with(worker: Scripted, **resilience: Any) -> AsyncIterator[tuple[Pipeline, FakeClock]]:
    clock = FakeClock(follow_loop=True)
    config = make_config(resilience={"retry_base_ms": 100, "retry_max_ms": 1000, **resilience})
    async with Pipeline(config, worker, clock=clock) as pipeline:
        yield pipeline, clock
        assert pipeline.reconciles()


async def test_pipeline_retries_retryable_failures_and_reports_provenance() -> None:
    worker = Scripted(busy(), busy(0.5), "ok")
    async with pipeline_with(worker) as (pipeline, clock):
        result = await pipeline.infer(Submission(prompt="hi", cache=False, dedup=False))
    assert result.text == "hello world"
    assert worker.calls == 3
    assert result.attempts == 3
    assert result.provenance is not None
    assert result.provenance.retries == 2
    assert result.provenance.worker == "scripted"
    assert [hop.status for hop in result.provenance.fallbacks] == [503, 503]
    assert result.provenance.breaker == "closed"
    assert len(clock.sleeps) == 2
    assert 0 <= clock.sleeps[0] <= 0.1
    assert clock.sleeps[1] >= 0.5  # Retry-After is a floor


async def test_pipeline_does_not_retry_permanent_errors() -> None:
    worker = Scripted(WorkerError("scripted", "bad request", retryable=False, status=400), "ok")
    async with pipeline_with(worker) as (pipeline, clock):
        with pytest.raises(WorkerFailed, match="HTTP 400"):
            await pipeline.infer(Submission(prompt="hi", cache=False, dedup=False))
        assert pipeline.status().breakers[0].state == "closed"
        assert pipeline.status().breakers[0].consecutive_failures == 0
    assert worker.calls == 1
    assert clock.sleeps == []


async def test_pipeline_does_not_retry_a_stream_that_already_sent_text() -> None:
    worker = Scripted("partial", "ok")
    chunks: list[str] = []
    async with pipeline_with(worker) as (pipeline, _):
        with pytest.raises(WorkerFailed, match=r"not retried: 1 chunk\(s\) had already been streamed") as caught:
            await pipeline.infer(Submission(prompt="hi", cache=False, dedup=False), chunks.append)
    assert worker.calls == 1
    assert chunks == ["hello"]
    assert "connection reset mid-stream" in str(caught.value)


async def test_pipeline_retries_a_broken_stream_when_nothing_was_forwarded() -> None:
    worker = Scripted("partial", "ok")
    async with pipeline_with(worker) as (pipeline, _):
        result = await pipeline.infer(Submission(prompt="hi", cache=False, dedup=False))  # no chunk sink
    assert result.text == "hello world"
    assert result.attempts == 2


async def test_pipeline_gives_up_when_retry_after_passes_the_deadline() -> None:
    worker = Scripted(busy(30), "ok")
    async with pipeline_with(worker) as (pipeline, clock):
        with pytest.raises(
            WorkerFailed, match=r"gave up after 1 call\(s\): waiting to retry would pass the request's deadline"
        ):
            await pipeline.infer(Submission(prompt="hi", deadline_ms=10_000, cache=False, dedup=False))
    assert worker.calls == 1
    assert clock.sleeps == []


async def test_attempt_timeout_is_a_retryable_failure() -> None:
    worker = Scripted("stall", "ok")
    async with pipeline_with(worker, attempt_timeout_ms=50) as (pipeline, _):
        result = await pipeline.infer(Submission(prompt="hi", cache=False, dedup=False))
        status = pipeline.status().breakers[0]
    assert result.text == "hello world"
    assert result.attempts == 2
    assert result.provenance is not None
    assert "no complete answer within 50 ms" in result.provenance.fallbacks[0].error
    assert status.failures == 1  # the stall counted against the backend


async def test_stage_timeout_ends_the_stage_without_retrying() -> None:
    worker = Scripted("stall", "ok")
    config = make_config(stages={"inference": {"timeout_ms": 50}})
    async with Pipeline(config, worker, clock=FakeClock(follow_loop=True)) as pipeline:
        with pytest.raises(StageTimeout, match="inference stage timed out after 50 ms"):
            await pipeline.infer(Submission(prompt="hi", cache=False, dedup=False))
        assert pipeline.status().breakers[0].failures == 1
        assert pipeline.reconciles()
    assert worker.calls == 1


async def test_breaker_opens_then_fails_fast_without_calling_the_backend() -> None:
    worker = Scripted(busy())
    async with pipeline_with(worker, retry_attempts=0, circuit_breaker_threshold=3) as (pipeline, clock):
        for _ in range(3):
            with pytest.raises(WorkerFailed):
                await pipeline.infer(Submission(prompt="hi", cache=False, dedup=False))
        assert worker.calls == 3
        clock.advance(20)
        with pytest.raises(CircuitOpen, match=r"^backend scripted unavailable, circuit open, retry after 40 s$"):
            await pipeline.infer(Submission(prompt="hi", cache=False, dedup=False))
        assert worker.calls == 3
        status = pipeline.status().breakers[0]
        assert (status.state, status.rejected, status.times_opened) == ("open", 1, 1)
        worker.steps = ["ok"]
        clock.advance(40)
        result = await pipeline.infer(Submission(prompt="hi", cache=False, dedup=False))
        assert result.provenance is not None and result.provenance.breaker == "half_open"
        assert pipeline.status().breakers[0].state == "half_open"


async def test_pipeline_says_when_the_retries_are_used_up() -> None:
    worker = Scripted(busy())
    async with pipeline_with(worker, retry_attempts=2) as (pipeline, clock):
        with pytest.raises(WorkerFailed, match=r"gave up after 3 call\(s\): resilience.retry_attempts = 2 used up"):
            await pipeline.infer(Submission(prompt="hi", cache=False, dedup=False))
    assert worker.calls == 3
    assert len(clock.sleeps) == 2
