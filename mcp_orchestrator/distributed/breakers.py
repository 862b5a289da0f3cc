"""Shared breaker openings: once one process opens a backend's breaker, the others do too.

The opening process writes a key that lives as long as its breaker stays open (PX the
breaker's timeout) and publishes the opening on the events channel; every other process
opens its own breaker for that backend for the time left, so it stops calling the backend
as soon as the message arrives (a millisecond on a LAN, well within one request). A
process that starts, or reconnects after an outage, reads the keys to catch up. Only
openings are shared: each process probes a half-open backend itself, which is what the
probes are for. Backend names are key-free (pipeline/guard.backend_name) and hashed in
key names.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis

from mcp_orchestrator.distributed.keys import Keys
from mcp_orchestrator.distributed.link import Link

MAX_KEYS_READ = 1000
"""Breaker keys read when catching up (more backends than this would be unusual)."""

Opener = Callable[[str, float], None]
"""Opens the local breaker of a backend (by name) for so many seconds."""


class SharedBreakers:
    def __init__(self, link: Link, keys: Keys, owner: str) -> None:
        self._link = link
        self._keys = keys
        self._owner = owner
        self.open_local: Opener = lambda name, seconds: None
        """Set by the pipeline: how a remote opening reaches this process's breaker."""
        self.shared = 0
        """Openings this process told the others about."""
        self.received = 0
        """Openings by other processes applied here."""

    async def opened(self, name: str, seconds: float) -> None:
        """Our breaker for `name` opened for `seconds`: tell every process. RedisUnavailable."""
        message = json.dumps({"t": "breaker", "n": name, "s": seconds, "o": self._owner})
        key, channel = self._keys.breaker(name), self._keys.events
        record = json.dumps({"n": name, "o": self._owner})

        async def run(client: Redis) -> Any:
            async with client.pipeline(transaction=False) as pipe:
                pipe.set(key, record, px=max(1, math.ceil(seconds * 1000)))
                pipe.publish(channel, message)
                return await pipe.execute()

        await self._link.call(run)
        self.shared += 1

    def delivered(self, message: dict[str, Any]) -> None:
        """An opening from the events channel (our own messages come back too: skipped)."""
        if message.get("o") == self._owner:
            return
        name, seconds = message.get("n"), message.get("s")
        if isinstance(name, str) and isinstance(seconds, int | float) and seconds > 0:
            self.received += 1
            self.open_local(name, float(seconds))

    async def catch_up(self) -> None:
        """Open locally every breaker another process holds open now. RedisUnavailable."""
        pattern = self._keys.breaker_pattern

        async def run(client: Redis) -> list[tuple[Any, int]]:
            names = [name async for name in client.scan_iter(match=pattern, count=100)][:MAX_KEYS_READ]
            if not names:
                return []
            async with client.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.get(name)
                    pipe.pttl(name)
                found = await pipe.execute()
            return list(zip(found[::2], found[1::2], strict=True))

        for record, pttl in await self._link.call(run):
            if record is None or pttl is None or pttl <= 0:
                continue
            data = json.loads(record)
            if data.get("o") != self._owner and isinstance(data.get("n"), str):
                self.open_local(data["n"], pttl / 1000)
