"""The worker in service, and swapping it while requests run.

A swap is atomic for new requests: the new worker is health-checked first (nothing
changes if that fails), then every new backend call goes to it, while calls already
running finish on the old one, which is closed once its last call ends. Every backend
sits behind its circuit breaker (breakers.py); a swap bumps the generation, which is
part of every answer key, so answers never cross workers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import anyio

from mcp_orchestrator.metrics import Metrics
from mcp_orchestrator.pipeline.breakers import Breakers
from mcp_orchestrator.workers.base import Worker

log = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 10.0
CLOSE_TIMEOUT_S = 10.0


@dataclass
class Lease:
    """How many calls run on one worker, and whether it has been swapped out."""

    worker: Worker
    guarded: Worker
    """The same worker with each backend behind its circuit breaker: what calls use."""
    active: int = 0
    retired: bool = False


class WorkerLease:
    def __init__(self, worker: Worker, breakers: Breakers, metrics: Metrics) -> None:
        self._breakers = breakers
        self._metrics = metrics
        self.current = Lease(worker, breakers.guard(worker, None))
        self.generation = 0
        """Bumped by each swap and part of every answer key."""
        self._swap_lock = anyio.Lock()
        self._close_later: Callable[[Worker], None] = lambda worker: None

    @property
    def worker(self) -> Worker:
        return self.current.worker

    def start(self, close_later: Callable[[Worker], None]) -> None:
        """Running: retired workers are closed through `close_later` (a task of the pipeline)."""
        self._close_later = close_later

    def take(self) -> Lease:
        lease = self.current
        lease.active += 1
        return lease

    def give_back(self, lease: Lease) -> None:
        lease.active -= 1
        if lease.retired and lease.active == 0:
            self._close_later(lease.worker)

    async def swap(self, worker: Worker, on_swapped: Callable[[], None]) -> Worker:
        """Make `worker` serve new calls; returns the one it replaced. The new worker is
        health-checked first (WorkerError or TimeoutError: nothing changed)."""
        async with self._swap_lock:
            with anyio.fail_after(HEALTH_TIMEOUT_S):
                await worker.health()
            old = self.current
            self.current = Lease(worker, self._breakers.guard(worker, old.guarded))
            self.generation += 1
            old.retired = True
            self._metrics.worker_swaps.inc()
            on_swapped()
            if old.active == 0:
                self._close_later(old.worker)
            return old.worker

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_TIMEOUT_S):
            await self.current.worker.aclose()


async def close_quietly(worker: Worker) -> None:
    """Close a retired worker, never for long and never raising (it served its last call)."""
    with anyio.move_on_after(CLOSE_TIMEOUT_S):
        try:
            await worker.aclose()
        except Exception as exc:
            log.warning("closing the retired worker %s failed: %r", worker.kind, exc)
