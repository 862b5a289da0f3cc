"""The connection to Redis: a short timeout on every command, and whether Redis is usable now.

Every command goes through `Link.call`, bounded by `timeout_ms`. The first failure (refused,
reset, too slow) marks the link degraded and logs one warning; while degraded, commands fail
at once without touching the network (the pipeline carries on with local state), and one
background task pings Redis until it answers again, logs that, and tells the parts that
keep state to resynchronise. So a Redis that is down or hung costs each request at most one
timeout, once, and sharing resumes by itself.

The URL's password never reaches a log line or a status page: they show `where` only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

import anyio
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from mcp_orchestrator.distributed.lane import Argument, Call, Lane

log = logging.getLogger(__name__)

T = TypeVar("T")

PROBE_INTERVAL_S = 0.5
"""How often a degraded link pings Redis (a cheap PING; recovery is noticed within this)."""
MAX_CONNECTIONS = 16
"""Pooled connections per process, and as many again on the lane (lane.py). Commands take a
fraction of a millisecond, so a burst queues for a connection (briefly) instead of opening
dozens at once: opening one takes round trips, and a burst of openings on a busy machine is
what made commands miss their timeout."""
WARM_CONNECTIONS = 4
"""Connections opened at start, so the first requests do not pay for them."""


class RedisUnavailable(Exception):
    """Redis could not serve the command now (down, slow, or degraded): use local state."""


def where(url: str, db: int | None) -> str:
    """host:port/db of `url`, never its user or password (what logs and status show)."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return f"unix:{parts.path}"
    host = parts.hostname or "localhost"
    port = parts.port or 6379
    chosen = db if db is not None else (parts.path.strip("/") or "0")
    return f"{parts.scheme}://{host}:{port}/{chosen}"


class Link:
    def __init__(self, url: str, *, db: int | None, timeout_s: float) -> None:
        self.where = where(url, db)
        self.timeout_s = timeout_s
        # One retry inside redis-py, on a broken connection only: after Redis restarts, every
        # pooled connection is dead and the first command on each would fail for nothing.
        # Timeouts are not retried (our own timeout bounds the whole call anyway).
        pool = BlockingConnectionPool.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            max_connections=MAX_CONNECTIONS,
            timeout=timeout_s,
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        )
        if db is not None:  # the URL's /db would win over a keyword; the config's key wins here
            pool.connection_kwargs["db"] = db
        self.client = Redis(connection_pool=pool)
        self.lane = Lane(pool, MAX_CONNECTIONS)
        """Connections of their own for the scripts every new request runs (lane.py)."""
        self.healthy = True
        """Optimistic at start: the first command tells (a warning if Redis is not there)."""
        self.degraded_since: float | None = None
        """Wall-clock time it went degraded (None while healthy)."""
        self.last_error = ""
        self.failures = 0
        """Commands that failed (timed out, refused, reset) since start."""
        self.transitions = 0
        self._down = anyio.Event()
        self._listeners: list[Callable[[], None]] = []

    def on_recovered(self, listener: Callable[[], None]) -> None:
        """Call `listener` each time Redis answers again after being unreachable."""
        self._listeners.append(listener)

    async def call(self, command: Callable[[Redis], Awaitable[T]]) -> T:
        """Run `command` within the timeout; RedisUnavailable when it cannot (and the link degrades)."""
        if not self.healthy:
            raise RedisUnavailable(self.last_error)
        try:
            with anyio.fail_after(self.timeout_s):
                return await command(self.client)
        except (TimeoutError, RedisError, OSError) as exc:
            self.failed(exc)
            raise RedisUnavailable(self.last_error) from None

    async def script(self, script: AsyncScript, keys: Sequence[str], args: Sequence[Argument]) -> Any:
        """`script` (made by `client.register_script`) on the fast lane; like `call` otherwise."""
        return await self.call(lambda _client: self.lane.evalsha(script, keys, args))

    async def script_many(self, script: AsyncScript, calls: Sequence[Call]) -> list[Any]:
        """`script` once per call, in one write on the fast lane (Lane.evalsha_many); like `call` otherwise."""
        return await self.call(lambda _client: self.lane.evalsha_many(script, calls))

    def failed(self, exc: BaseException) -> None:
        """A command failed: degrade (one warning), and let the prober find when Redis is back."""
        self.failures += 1
        self.last_error = _describe(exc, self.timeout_s)
        if self.healthy:
            self.healthy = False
            self.transitions += 1
            self.degraded_since = time.time()
            self._down.set()
            log.warning(
                "Redis at %s unreachable (%s): sharing paused, requests carry on with this process's own "
                "cache, flights, limits and breakers; retrying every %g s",
                self.where,
                self.last_error,
                PROBE_INTERVAL_S,
            )

    async def warm(self) -> None:
        """Open a few connections before the first requests need them (a failure degrades the link)."""

        async def ping() -> None:
            try:
                await self.call(lambda client: client.ping())
            except RedisUnavailable:
                pass

        async def open_lane() -> None:
            try:
                await self.call(lambda _client: self.lane.open_one())
            except RedisUnavailable:
                pass

        async with anyio.create_task_group() as tg:  # in parallel, each within the timeout
            for _ in range(WARM_CONNECTIONS):
                tg.start_soon(ping)
                tg.start_soon(open_lane)

    async def run(self) -> None:
        """Forever: wait for the link to degrade, then ping until Redis answers again."""
        while True:
            await self._down.wait()
            while True:  # a fixed pace: a PING every PROBE_INTERVAL_S costs Redis nothing
                if await self._ping():
                    break
                await anyio.sleep(PROBE_INTERVAL_S)
            self._down = anyio.Event()
            await self.lane.drop_idle()  # its idle connections went with the outage
            self.healthy = True
            self.transitions += 1
            outage = time.time() - (self.degraded_since or time.time())
            self.degraded_since = None
            log.warning("Redis at %s reachable again after %.1f s: sharing resumed", self.where, outage)
            for listener in self._listeners:
                listener()

    async def _ping(self) -> bool:
        try:
            with anyio.fail_after(self.timeout_s):
                await self.client.ping()
            return True
        except (TimeoutError, RedisError, OSError) as exc:
            self.last_error = _describe(exc, self.timeout_s)
            return False

    async def aclose(self) -> None:
        with anyio.move_on_after(1.0, shield=True):
            await self.lane.aclose()
            await self.client.aclose()


def _describe(exc: BaseException, timeout_s: float) -> str:
    """A short reason without any connection string (redis-py messages name host:port only)."""
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout_s * 1000:g} ms"
    text = str(exc).strip() or type(exc).__name__
    return text[:200]
