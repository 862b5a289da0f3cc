"""The shared result cache: answers by key, with the local cache's bounds.

An answer lives `ttl` after it was stored (PX). As in resilience/cache.py, at most
`max_entries` answers and `max_bytes` bytes are held: an index (sorted set by time stored)
and a size table let one Lua script drop expired entries and then the oldest until both
bounds hold, atomically with the put. One difference: the local cache evicts the least
recently *used*, this one the least recently *stored* (refreshing an index on every read
would turn each cache hit into a write). A value larger than `max_bytes` is not stored.
Lookups are part of the flight's join script and puts part of its end script (flights.py):
one round trip each.
"""

from __future__ import annotations

from mcp_orchestrator.distributed.keys import Keys

PUT_FUNCTION = """
local function cache_put(answer, index, sizes, value, ttl, max_entries, max_bytes, size)
  local now = redis.call('TIME')
  local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
  local function drop(member)
    local held = tonumber(redis.call('HGET', sizes, member) or '0')
    redis.call('HDEL', sizes, member)
    redis.call('HINCRBY', sizes, '#bytes', -held)
    redis.call('ZREM', index, member)
    redis.call('DEL', member)
  end
  -- Expired entries first (Redis already dropped their values; forget their sizes).
  for _, member in ipairs(redis.call('ZRANGEBYSCORE', index, '-inf', now_ms - ttl)) do drop(member) end
  if redis.call('ZSCORE', index, answer) then drop(answer) end
  redis.call('SET', answer, value, 'PX', ttl)
  redis.call('ZADD', index, now_ms, answer)
  redis.call('HSET', sizes, answer, size)
  local bytes = redis.call('HINCRBY', sizes, '#bytes', size)
  while redis.call('ZCARD', index) > max_entries or bytes > max_bytes do
    local oldest = redis.call('ZRANGE', index, 0, 0)[1]
    if oldest == answer then break end
    drop(oldest)
    bytes = tonumber(redis.call('HGET', sizes, '#bytes'))
  end
  redis.call('PEXPIRE', index, ttl)
  redis.call('PEXPIRE', sizes, ttl)
end
"""
"""A Lua function for scripts that store an answer (flights.py ends a flight with one)."""


class SharedCache:
    def __init__(self, keys: Keys, *, ttl_s: float, max_entries: int, max_bytes: int) -> None:
        self._keys = keys
        self.ttl_ms = max(1, round(ttl_s * 1000))
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.stored = 0
        self.too_large = 0
        self.hits = 0
        """Answers this process took from the shared cache (its local tier missed)."""

    def put_args(self, key: str, value: str) -> tuple[list[str], list[str | int]] | None:
        """Keys and arguments of `cache_put` for storing `value` (None: too large to store)."""
        size = len(value.encode("utf-8", "surrogatepass"))
        if size > self.max_bytes:
            self.too_large += 1
            return None
        keys = self._keys
        self.stored += 1
        return [keys.answer(key), keys.answer_index, keys.answer_sizes], [
            value,
            self.ttl_ms,
            self.max_entries,
            self.max_bytes,
            size,
        ]
