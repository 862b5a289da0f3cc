"""Global rate limits: one GCRA bucket in Redis for all processes, and one per session.

The same algorithm and bound as resilience/ratelimit.TokenBucket: a bucket's whole state
is its theoretical arrival time (TAT); the emission interval is rounded *up* to a whole
microsecond (Lua numbers are doubles: microseconds since the epoch are exact in them,
nanoseconds are not), so in every window of length T at most `rate * T + burst` requests
pass, across all processes together. Time is Redis's own clock (TIME), one clock for all.

One script reserves a token in the session's bucket and the global one atomically: both
at the earliest time both allow, or neither. A reservation in the future is a place in
line: the caller sleeps until then and passes (no retry race between processes). A caller
whose place would come after its budget reserves nothing and is refused with the wait.
Across processes callers are served in order of arrival at Redis (the priority order of
the local limiter holds within a process only while Redis is unreachable).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

from mcp_orchestrator.distributed.keys import Keys
from mcp_orchestrator.distributed.link import Link

US_PER_S = 1_000_000

RESERVE = """
local now = redis.call('TIME')
local now_us = tonumber(now[1]) * 1000000 + tonumber(now[2])
local budget = tonumber(ARGV[1])
local at = now_us
local bound = #KEYS
local tats = {}
for i = 1, #KEYS do
  local interval, burst = tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1])
  local tat = tonumber(redis.call('GET', KEYS[i]) or '0')
  if tat < now_us then tat = now_us end
  tats[i] = tat
  local earliest = tat - (burst - 1) * interval
  if earliest > at then at = earliest; bound = i end
end
local wait = at - now_us
if wait > budget then return {0, wait, bound - 1} end
for i = 1, #KEYS do
  local interval = tonumber(ARGV[2 * i])
  local tat = tats[i]
  if tat < at then tat = at end
  tat = tat + interval
  redis.call('SET', KEYS[i], string.format('%.0f', tat), 'PX', math.ceil((tat - now_us) / 1000) + 1000)
end
return {1, wait, bound - 1}
"""
"""KEYS: the buckets. ARGV: budget us, then interval us and burst of each bucket.
Returns {1, wait us, b} (reserved: pass after the wait) or {0, wait us, b} (nothing reserved),
b being the index of the bucket that set the wait (0-based)."""


def interval_us(rate: float) -> int:
    """Microseconds between two tokens, rounded up so the real rate never exceeds `rate`."""
    return math.ceil(Fraction(US_PER_S) / Fraction(rate))


@dataclass(frozen=True, slots=True)
class Bucket:
    key: str
    rate: float
    burst: int


@dataclass(frozen=True, slots=True)
class Reservation:
    granted: bool
    wait_s: float
    """Granted: sleep this long, then pass. Refused: the wait it would have needed."""
    bound: int
    """Index (in the buckets given) of the bucket that set the wait."""


class SharedLimits:
    def __init__(self, link: Link, keys: Keys) -> None:
        self._link = link
        self._keys = keys
        self.granted = 0
        self._reserve = link.client.register_script(RESERVE)
        self.refused = 0

    def buckets(
        self, *, rate: float, burst: int, session_id: str | None, session_rate: float | None, session_burst: int
    ) -> list[Bucket]:
        """The session's bucket (when per-session limits are on) and the global one."""
        buckets = []
        if session_id is not None and session_rate is not None:
            buckets.append(Bucket(self._keys.session_bucket(session_id), session_rate, session_burst))
        buckets.append(Bucket(self._keys.bucket("global"), rate, burst))
        return buckets

    async def reserve(self, buckets: list[Bucket], budget_s: float) -> Reservation:
        """A token from every bucket, within `budget_s`; RedisUnavailable when Redis cannot say."""
        args: list[int] = [max(0, math.floor(budget_s * US_PER_S))]
        for bucket in buckets:
            args += [interval_us(bucket.rate), bucket.burst]
        names = [bucket.key for bucket in buckets]

        granted, wait_us, bound = await self._link.script(self._reserve, names, args)
        if granted:
            self.granted += 1
        else:
            self.refused += 1
        return Reservation(bool(granted), int(wait_us) / US_PER_S, int(bound))
