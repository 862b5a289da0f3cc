"""A bounded time-to-live cache of results (cachetools' TTLCache with an injectable clock).

Entries live `ttl_s` seconds after they were stored. Two bounds hold at once: at most
`max_entries` entries and at most `max_bytes` bytes as `size_of` counts them; storing one
more entry evicts the least recently used until both hold. A value larger than `max_bytes`
on its own is not stored. Generic: keys are strings, values anything; it knows nothing of
what it stores except, through `size_of`, how big it is.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Generic, TypeVar

from cachetools import TTLCache

V = TypeVar("V")


class ResultCache(Generic[V]):
    def __init__(
        self,
        max_entries: int,
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
        *,
        max_bytes: int | None = None,
        size_of: Callable[[V], int] | None = None,
    ) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1 (got {max_entries!r})")
        if not ttl_s > 0:
            raise ValueError(f"ttl_s must be greater than 0 (got {ttl_s!r})")
        if (max_bytes is None) != (size_of is None):
            raise ValueError("max_bytes and size_of go together")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"max_bytes must be at least 1 (got {max_bytes!r})")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        # cachetools keeps the byte total itself (currsize) when it is given getsizeof; the
        # entry bound is then ours.
        bound = max_entries if max_bytes is None else max_bytes
        self._entries: TTLCache[str, V] = TTLCache(maxsize=bound, ttl=ttl_s, timer=clock, getsizeof=size_of)
        self.hits = 0
        self.misses = 0
        self.stored = 0
        self.too_large = 0
        """Values not stored because each alone was over `max_bytes`."""

    def get(self, key: str) -> V | None:
        value = self._entries.get(key)
        if value is None:
            self.misses += 1
        else:
            self.hits += 1
        return value

    def put(self, key: str, value: V) -> None:
        try:
            self._entries[key] = value
        except ValueError:  # cachetools: the value alone is over maxsize
            self.too_large += 1
            return
        self.stored += 1
        while len(self._entries) > self.max_entries:
            self._entries.popitem()  # the least recently used

    def clear(self) -> None:
        self._entries.clear()

    @property
    def held_bytes(self) -> int:
        """Bytes held, as `size_of` counts them (0 when the cache has no byte bound)."""
        return int(self._entries.currsize) if self.max_bytes is not None else 0

    def __len__(self) -> int:
        """Live entries (expired ones are dropped first)."""
        self._entries.expire()
        return len(self._entries)
