"""Retries with exponential backoff and full jitter, inside a deadline.

The n-th retry (n = 0, 1, ...) waits a uniformly random time in
[0, min(max_s, base_s * 2**n)] ("full jitter": concurrent callers that failed together
spread out instead of retrying in lock-step). A server's Retry-After is a floor: we
wait at least that long. A wait that would end at or after the deadline is not
started: the call fails at once with its last error, because sleeping until the
deadline only to fail then helps nobody.

Time comes from an injected `Clock`, so tests can measure waits without sleeping.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

import anyio

T = TypeVar("T")

# 2**64 times any sane base is beyond every cap; stops float overflow for huge retry counts.
_MAX_EXPONENT = 64


class Clock(Protocol):
    """Where resilience code reads the time and sleeps (injectable for tests)."""

    def now(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class AnyioClock:
    """The clock deadlines and cancel scopes use, read finely enough to time a request (see
    `loop_clock`)."""

    def now(self) -> float:
        return loop_clock()()

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(seconds)


def loop_clock() -> Callable[[], float]:
    """The event loop's monotonic clock as a plain function, for hot paths (anyio.current_time()
    looks the async backend up on every call).

    On asyncio that is time.monotonic itself: asyncio's own loop reads it, and uvloop reads the
    same clock (CLOCK_MONOTONIC) but only to the whole millisecond, cached once per loop turn,
    which would make every latency and stage time a whole number of milliseconds. Timers and
    cancel scopes on uvloop fire by its coarser, cached reading: a deadline computed from this
    clock fires late by at most that lag (a millisecond, or a loop turn under load), never early.
    Objects built before the loop starts (metrics) read it too, and agree once it runs."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        try:
            anyio.current_time()
        except anyio.NoEventLoopError:
            return time.monotonic  # no loop yet
        return anyio.current_time  # another anyio backend (trio): its own clock
    return time.monotonic


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    retries: int = 3
    """Retries after the first attempt (so at most retries + 1 calls)."""
    base_s: float = 0.1
    max_s: float = 5.0

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ValueError(f"retries must be 0 or more (got {self.retries})")
        if not 0 < self.base_s <= self.max_s:
            raise ValueError(f"need 0 < base_s <= max_s (got base_s={self.base_s}, max_s={self.max_s})")

    def ceiling(self, retry: int) -> float:
        """The longest backoff before retry number `retry` (0-based)."""
        return min(self.max_s, self.base_s * 2.0 ** min(retry, _MAX_EXPONENT))

    def backoff(self, retry: int, rand: Callable[[], float] = random.random) -> float:
        """Full jitter: uniform in [0, ceiling(retry)]."""
        return rand() * self.ceiling(retry)

    def delay(self, retry: int, retry_after_s: float | None, rand: Callable[[], float] = random.random) -> float:
        """The wait before retry `retry`: the jittered backoff, but never less than Retry-After."""
        jittered = self.backoff(retry, rand)
        if retry_after_s is None:
            return jittered
        return max(retry_after_s, jittered)


@dataclass(frozen=True, slots=True)
class Verdict:
    """How one failure is to be treated: retry it or not, and the server's Retry-After."""

    retryable: bool
    retry_after_s: float | None = None


def plan_retry(
    policy: RetryPolicy,
    retry: int,
    verdict: Verdict,
    now: float,
    deadline: float,
    rand: Callable[[], float] = random.random,
) -> float | None:
    """Seconds to wait before retry number `retry`, or None to give up now.

    Gives up when the failure is not retryable, the retries are spent, or the wait
    would end at or after `deadline` (compared as absolute times, so float rounding
    can never let a wait end exactly on the deadline).
    """
    if not verdict.retryable or retry >= policy.retries:
        return None
    wait = policy.delay(retry, verdict.retry_after_s, rand)
    if now + wait >= deadline:
        return None
    return wait


RetryListener = Callable[[int, BaseException, float], None]
"""Called before each retry's wait with (retry number, the failure, the wait in seconds)."""


async def call_with_retries(
    attempt: Callable[[int], Awaitable[T]],
    *,
    policy: RetryPolicy,
    deadline: float | Callable[[], float],
    clock: Clock,
    judge: Callable[[BaseException], Verdict | None],
    on_retry: RetryListener | None = None,
    rand: Callable[[], float] = random.random,
) -> T:
    """Run `attempt(0)`, `attempt(1)`, ... until one returns, a failure is final or time runs out.

    `judge` classifies an exception; None means "not ours, let it propagate" (it is
    re-raised untouched, like cancellation). The last failure is re-raised as it was.
    `deadline` is a `clock.now()` time, or a function giving it (read at each failure: a
    deadline that moves later while the calls run is honoured).
    """
    end = deadline if callable(deadline) else lambda: deadline
    retry = 0
    while True:
        try:
            return await attempt(retry)
        except Exception as exc:
            verdict = judge(exc)
            if verdict is None:
                raise
            wait = plan_retry(policy, retry, verdict, clock.now(), end(), rand)
            if wait is None:
                raise
            if on_retry is not None:
                on_retry(retry, exc, wait)
        # Outside the except block, so the failure's traceback is not kept alive while we sleep.
        await clock.sleep(wait)
        retry += 1
