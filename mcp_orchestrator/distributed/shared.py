"""Everything one process shares through Redis, and the tasks that keep it in step.

`SharedState` owns the link (link.py), the events subscription (events.py) and the shared
parts (flights, cache, limits, breakers, dead letters). `run()` holds its background tasks
in one task group: the link's prober, the subscription, the sender of flights' ends
(ends.py), and the short jobs that hooks called from synchronous code start (a breaker
opening, new dead letters).
Every job is one or two Redis commands under the link's timeout, so none outlives it.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import anyio
from anyio.abc import TaskGroup

from mcp_orchestrator.config import DeduplicationSection, DistributedSection
from mcp_orchestrator.distributed.breakers import SharedBreakers
from mcp_orchestrator.distributed.cache import SharedCache
from mcp_orchestrator.distributed.dead_letters import SharedDeadLetters
from mcp_orchestrator.distributed.events import Events
from mcp_orchestrator.distributed.flights import Flights
from mcp_orchestrator.distributed.jobs import SharedJobs
from mcp_orchestrator.distributed.keys import Keys
from mcp_orchestrator.distributed.limits import SharedLimits
from mcp_orchestrator.distributed.link import Link, RedisUnavailable
from mcp_orchestrator.models import DistributedStatus

log = logging.getLogger(__name__)


def default_node_id() -> str:
    return f"{socket.gethostname()[:40]}-{os.getpid()}"


class SharedState:
    def __init__(
        self, url: str, section: DistributedSection, dedup: DeduplicationSection, dead_letter_capacity: int
    ) -> None:
        self.section = section
        self.node = section.node_id or default_node_id()
        self.owner = f"{self.node}/{secrets.token_hex(4)}"
        """Lock and claim owner: the node plus a random part, so a restarted process (same host
        and pid, in a container) never mistakes an old lock for its own."""
        self.keys = Keys(section.key_prefix)
        self.link = Link(url, db=section.db, timeout_s=section.timeout_ms / 1000)
        self.flights = Flights(self.link, self.keys, self.owner, section.lock_ttl_ms)
        self.cache = SharedCache(
            self.keys, ttl_s=dedup.window_s, max_entries=dedup.max_entries, max_bytes=dedup.max_bytes
        )
        self.limits = SharedLimits(self.link, self.keys)
        self.breakers = SharedBreakers(self.link, self.keys, self.owner)
        self.dead_letters = SharedDeadLetters(self.link, self.keys, self.owner, dead_letter_capacity)
        self.events = Events(self.link, self.keys.events)
        self.jobs = SharedJobs(self.link, self.keys, self.node)
        self.events.handle("job-cancel", self.jobs.delivered)
        self.events.handle("flight", self.flights.delivered)
        self.events.handle("followed", self.flights.ends.noticed)
        self.events.handle("breaker", self.breakers.delivered)
        self.events.handle("letters", lambda message: self.soon(self._catch_up_letters))
        self.events.on_connected = self._connected
        self.link.on_recovered(self._recovered)
        self.local_fallbacks = 0
        """Requests that used local state because Redis could not answer."""
        self._task_group: TaskGroup | None = None

    @asynccontextmanager
    async def running(self) -> AsyncIterator[SharedState]:
        log.info("sharing state through Redis at %s (prefix %r, node %s)", self.link.where, self.keys.prefix, self.node)
        try:
            async with anyio.create_task_group() as tg:
                self._task_group = tg
                await self.link.warm()
                tg.start_soon(self.link.run, name="redis:probe")
                tg.start_soon(self.events.run, name="redis:events")
                tg.start_soon(self.flights.ends.run, name="redis:flight-ends")
                try:
                    yield self
                finally:
                    self._task_group = None
                    # Flights ended and letters written during the last moments (shutdown)
                    # still reach Redis.
                    with anyio.move_on_after(self.link.timeout_s * 5, shield=True):
                        await self.flights.ends.flush()
                        await self._flush_letters()
                    tg.cancel_scope.cancel()
        finally:
            await self.link.aclose()

    def soon(self, job: Callable[[], Awaitable[None]]) -> None:
        """Run `job` in the background (from synchronous code); dropped when not running."""
        if self._task_group is not None:
            self._task_group.start_soon(self._quietly, job)

    def spawn(self, work: Callable[..., Coroutine[Any, Any, None]], *args: Any) -> None:
        if self._task_group is not None:
            self._task_group.start_soon(work, *args)

    @staticmethod
    async def _quietly(job: Callable[[], Awaitable[None]]) -> None:
        try:
            await job()
        except RedisUnavailable:
            pass  # the link logged it once; the next recovery catches up

    # ------------------------------------------------------------------ catching up

    def _connected(self) -> None:
        self.flights.wake_all()
        self.soon(self._catch_up)

    def _recovered(self) -> None:
        """Redis answers again (perhaps restarted empty): catch up whether or not the
        subscription broke meanwhile (a notice published while we were cut off is lost)."""
        self.dead_letters.restarted()
        self.flights.release_unsure()
        self.soon(self._catch_up)

    async def _catch_up(self) -> None:
        await self.breakers.catch_up()
        await self._flush_letters()
        await self._catch_up_letters()

    async def _flush_letters(self) -> None:
        try:
            await self.dead_letters.flush()
        except RedisUnavailable:
            pass

    async def _catch_up_letters(self) -> None:
        await self.dead_letters.catch_up()

    # ------------------------------------------------------------------ reading the state

    def status(self) -> DistributedStatus:
        link = self.link
        return DistributedStatus(
            redis=link.where,
            state="ok" if link.healthy else "degraded",
            node_id=self.node,
            key_prefix=self.keys.prefix,
            subscribed=self.events.connected,
            degraded_since=link.degraded_since,
            last_error=link.last_error or None,
            redis_errors=link.failures,
            transitions=link.transitions,
            local_fallbacks=self.local_fallbacks,
            flights_led=self.flights.led,
            flights_followed=self.flights.followed,
            flights_taken_over=self.flights.taken_over,
            flight_ends_sent=self.flights.ends.sent,
            flight_end_writes=self.flights.ends.writes,
            flight_ends_refused=self.flights.ends.refused,
            shared_cache_hits=self.cache.hits,
            shared_cache_stored=self.cache.stored,
            limit_reservations=self.limits.granted,
            limit_refusals=self.limits.refused,
            breaker_openings_shared=self.breakers.shared,
            breaker_openings_received=self.breakers.received,
            dead_letters_backlog=len(self.dead_letters.backlog),
            dead_letters_received=self.dead_letters.received,
        )
