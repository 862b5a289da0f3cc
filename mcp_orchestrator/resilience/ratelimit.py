"""Token-bucket rate limiting with an exact bound and priority-ordered waiting.

`TokenBucket` is the GCRA form of a token bucket (`burst` tokens, refilled at `rate`
per second). Its whole state is one number, the theoretical arrival time (TAT): the
moment the bucket would be full again. Times are whole nanoseconds and the emission
interval is rounded *up*, so the arithmetic is exact and errs only on the safe side:
in every window of length T at most `rate * T + burst` takes succeed.

`PriorityGate` queues the callers that found the bucket empty and hands out tokens
in priority order as they refill; see its docstring for the order and aging rule.

Why not aiolimiter: configured as `AsyncLimiter(burst, burst / rate)` it is the same
bucket and meets the bound, but it orders its waiters by requested amount (not by
priority), cannot say when the next token will be free (needed to refuse at once,
with a retry-after, a request whose deadline comes first), reads the asyncio loop
clock (no fake clock for property tests) and runs only on asyncio.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction

import anyio

Clock = Callable[[], float]

NS_PER_S = 1_000_000_000
_ALWAYS_FULL = -(1 << 62)
"""A TAT far in the past: a new bucket starts full."""


def to_ns(seconds: float) -> int:
    return round(seconds * NS_PER_S)


class TokenBucket:
    """`burst` tokens refilled at `rate` per second; times are integer nanoseconds.

    Not thread-safe; made for one event loop.
    """

    __slots__ = ("_interval", "_tat", "_tolerance", "burst", "rate")

    def __init__(self, rate: float, burst: int) -> None:
        if not (math.isfinite(rate) and rate > 0):
            raise ValueError(f"rate must be a finite number greater than 0 (got {rate!r})")
        if burst < 1:
            raise ValueError(f"burst must be at least 1 (got {burst!r})")
        self.rate = rate
        self.burst = burst
        # Exact: NS_PER_S / rate in floats can round below the true interval (rate 1/3 gives
        # 3e9 ns, one short), which would let a request through a nanosecond early.
        self._interval = math.ceil(Fraction(NS_PER_S) / Fraction(rate))
        """Nanoseconds between two tokens, rounded up so the real rate never exceeds `rate`."""
        self._tolerance = (burst - 1) * self._interval
        self._tat = _ALWAYS_FULL

    @property
    def interval_ns(self) -> int:
        return self._interval

    def wait_ns(self, now_ns: int, tokens: int = 1) -> int:
        """Nanoseconds from `now_ns` until `tokens` tokens can be taken (0: now)."""
        return max(0, max(self._tat, now_ns) + (tokens - 1) * self._interval - self._tolerance - now_ns)

    def take(self, now_ns: int) -> bool:
        """Take one token if there is one; returns whether it did."""
        if self._tat - self._tolerance > now_ns:
            return False
        self._tat = max(self._tat, now_ns) + self._interval
        return True

    def refund(self) -> None:
        """Give back the last token taken (a caller that took one but could not use it).

        Never lets more through than without that take: the TAT stays at or above
        where it would have been.
        """
        self._tat -= self._interval

    def tokens(self, now_ns: int) -> float:
        """Tokens available at `now_ns` (fractional while one refills)."""
        debt = max(0, self._tat - now_ns)
        return max(0.0, self.burst - debt / self._interval)

    def start_at_level_of(self, other: TokenBucket, now_ns: int) -> None:
        """Hold what `other` holds now (at most this bucket's burst), not a full bucket: a
        bucket that replaces another (new limits on reload) must not hand out a fresh burst."""
        tokens = min(float(self.burst), other.tokens(now_ns))
        self._tat = now_ns + math.ceil((self.burst - tokens) * self._interval)

    def is_full(self, now_ns: int) -> bool:
        """A full bucket behaves exactly like a new one, so it may be dropped and recreated."""
        return self._tat <= now_ns


class TokenUnavailable(Exception):
    """No token could be had within the caller's time budget."""

    def __init__(self, retry_after_s: float) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(f"no token within the time budget; retry after {retry_after_s:.3f} s")


@dataclass(eq=False, slots=True)
class _Waiter:
    rank: int
    wakeup: anyio.Event = field(default_factory=anyio.Event)
    gone: bool = False
    """Admitted or given up; left in the heap and dropped when it reaches the top (lazy delete)."""


class PriorityGate:
    """Hands out a bucket's tokens to waiting callers in priority order.

    Order: smaller rank first (0 = most urgent), first come first served within a
    rank. Aging, as in pipeline/priority.py: a waiter's sort key is its arrival time
    plus `rank * aging_s`, so a rank-3 waiter that has waited three aging periods
    goes before a rank-0 one that just arrived; nothing starves.

    The waiter at the head of the queue sleeps until its token is due; the others
    sleep until they become head or their budget runs out. A caller whose token
    cannot be due within its budget, even counting only the waiters that are
    certainly ahead of it, is refused at once (no pointless wait).
    """

    def __init__(self, bucket: TokenBucket, *, aging_s: float, clock: Clock = time.monotonic, ranks: int = 4) -> None:
        self.bucket = bucket
        self.aging_s = aging_s
        self.clock = clock
        self._heap: list[tuple[float, int, _Waiter]] = []
        self._tiebreak = itertools.count()
        self._waiting_by_rank = [0] * ranks

    @property
    def waiting(self) -> int:
        return sum(self._waiting_by_rank)

    def tokens(self) -> float:
        return self.bucket.tokens(to_ns(self.clock()))

    def is_idle(self) -> bool:
        """No waiter and a full bucket: dropping this gate changes nothing."""
        return not self.waiting and self.bucket.is_full(to_ns(self.clock()))

    def try_take(self) -> bool:
        """Take a token now if nobody is queued before us and one is there."""
        return not self.waiting and self.bucket.take(to_ns(self.clock()))

    def eta_s(self, rank: int) -> float:
        """A lower bound on the wait of a new caller of `rank`: only the waiters of its
        rank or better are counted (older, aged waiters of worse ranks may also go first)."""
        ahead = sum(self._waiting_by_rank[: rank + 1])
        return self.bucket.wait_ns(to_ns(self.clock()), ahead + 1) / NS_PER_S

    async def acquire(self, rank: int, budget_s: float) -> None:
        """Wait for a token for at most `budget_s` seconds; raise TokenUnavailable if none comes.

        Cancellation leaves the queue consistent (the waiter is dropped, the next one woken).
        """
        now = self.clock()
        if self.try_take():
            return
        eta = self.eta_s(rank)
        if eta > budget_s:
            raise TokenUnavailable(eta)
        deadline = now + budget_s
        waiter = _Waiter(rank)
        heapq.heappush(self._heap, (now + rank * self.aging_s, next(self._tiebreak), waiter))
        self._waiting_by_rank[rank] += 1
        try:
            while True:
                now = self.clock()
                pause = math.inf
                if self._head() is waiter:
                    due_ns = self.bucket.wait_ns(to_ns(now))
                    if due_ns == 0 and self.bucket.take(to_ns(now)):
                        return
                    pause = due_ns / NS_PER_S
                if now >= deadline:
                    raise TokenUnavailable(self.eta_s(rank))
                waiter.wakeup = anyio.Event()
                with anyio.move_on_after(min(pause, deadline - now)):
                    await waiter.wakeup.wait()
        finally:
            # Admitted, refused or cancelled: leave the queue and let the next head look.
            waiter.gone = True
            self._waiting_by_rank[rank] -= 1
            self.wake()

    def wake(self) -> None:
        """Make the head waiter look at the bucket again.

        Called after every departure. A fake clock in tests calls it after moving time
        (the real clock needs no call: the head sleeps until its token is due).
        """
        head = self._head()
        if head is not None:
            head.wakeup.set()

    def _head(self) -> _Waiter | None:
        heap = self._heap
        while heap and heap[0][2].gone:
            heapq.heappop(heap)
        return heap[0][2] if heap else None
