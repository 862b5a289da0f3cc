"""A bounded priority queue for anyio tasks.

Order: priority class first, then arrival. To keep Low from starving, an item's sort key
is its arrival time plus `rank * aging_s`: a Low item that has waited three aging periods
competes with a Critical one that just arrived. Within one class the order is strictly
first come, first served.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from typing import Generic, TypeVar

import anyio

T = TypeVar("T")


class QueueFull(Exception):
    """Internal signal: the caller sheds the item."""


class PriorityQueue(Generic[T]):
    def __init__(self, capacity: int, aging_s: float) -> None:
        self.capacity = capacity
        self._aging_s = aging_s
        self._heap: list[tuple[float, int, T, float, int]] = []
        """(sort key, arrival number, item, arrival time, rank)."""
        self._tiebreak = itertools.count()
        self._getters: deque[anyio.Event] = deque()

    def __len__(self) -> int:
        return len(self._heap)

    @property
    def aging_s(self) -> float:
        return self._aging_s

    @aging_s.setter
    def aging_s(self, value: float) -> None:
        """New aging (a config reload): the items already waiting are re-ordered by it too."""
        self._aging_s = value
        self._heap = [(at + rank * value, n, item, at, rank) for _, n, item, at, rank in self._heap]
        heapq.heapify(self._heap)

    def put_nowait(self, item: T, rank: int, arrived_at: float) -> None:
        """Queue `item`; raise QueueFull when at capacity (the caller sheds it)."""
        if len(self._heap) >= self.capacity:
            raise QueueFull
        heapq.heappush(self._heap, (arrived_at + rank * self._aging_s, next(self._tiebreak), item, arrived_at, rank))
        if self._getters:
            self._getters.popleft().set()

    async def get(self) -> T:
        while not self._heap:
            wakeup = anyio.Event()
            self._getters.append(wakeup)
            try:
                await wakeup.wait()
            except BaseException:
                # Cancelled: if we had been woken, hand the wake-up on so no item is stranded.
                if wakeup.is_set():
                    if self._getters:
                        self._getters.popleft().set()
                else:
                    self._getters.remove(wakeup)
                raise
        return heapq.heappop(self._heap)[2]

    def position(self, item: T) -> int | None:
        """Where `item` waits: 1 is next out; None when it is not waiting. O(n), for status reads."""
        for sort_key, tiebreak, queued, _, _ in self._heap:
            if queued is item:
                return 1 + sum(1 for entry in self._heap if (entry[0], entry[1]) < (sort_key, tiebreak))
        return None

    def discard(self, item: T) -> bool:
        """Remove `item` if it is still waiting (it ended while queued); O(n). Returns whether it was there."""
        for index, entry in enumerate(self._heap):
            if entry[2] is item:
                last = self._heap.pop()
                if index < len(self._heap):
                    self._heap[index] = last
                    heapq.heapify(self._heap)
                return True
        return False

    def promote(self, item: T, ranks: int) -> bool:
        """Move `item` forward as if it had arrived `ranks` classes higher (keeping its arrival
        time); O(n), for the rare item whose class is raised while it waits. Returns whether
        it was there."""
        for index, (_, tiebreak, queued, arrived_at, rank) in enumerate(self._heap):
            if queued is item:
                rank = max(0, rank - ranks)
                self._heap[index] = (arrived_at + rank * self._aging_s, tiebreak, queued, arrived_at, rank)
                heapq.heapify(self._heap)
                return True
        return False
