"""A bounded time-to-live cache of results (cachetools' TTLCache with an injectable clock).

Entries live `ttl_s` seconds after they were stored; when `max_entries` are held,
storing one more evicts the least recently used. Generic: keys are strings, values
anything; it knows nothing of what it stores.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Generic, TypeVar

from cachetools import TTLCache

V = TypeVar("V")


class ResultCache(Generic[V]):
    def __init__(self, max_entries: int, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1 (got {max_entries!r})")
        if not ttl_s > 0:
            raise ValueError(f"ttl_s must be greater than 0 (got {ttl_s!r})")
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._entries: TTLCache[str, V] = TTLCache(maxsize=max_entries, ttl=ttl_s, timer=clock)
        self.hits = 0
        self.misses = 0
        self.stored = 0

    def get(self, key: str) -> V | None:
        value = self._entries.get(key)
        if value is None:
            self.misses += 1
        else:
            self.hits += 1
        return value

    def put(self, key: str, value: V) -> None:
        self._entries[key] = value
        self.stored += 1

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        """Live entries (expired ones are dropped first)."""
        self._entries.expire()
        return len(self._entries)
