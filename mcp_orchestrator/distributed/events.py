"""The one subscription each process holds: flight outcomes, breaker openings, new dead letters.

Pub/sub delivers at most once and only to connected subscribers, so nothing here is the
only copy of anything: a lost flight outcome is recovered when the follower joins again at
the lock's expiry, breaker openings and dead letters are also kept in keys and a stream
that a reconnecting process reads (see `on_connected`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import anyio
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from mcp_orchestrator.distributed.link import Link

log = logging.getLogger(__name__)

READ_WAIT_S = 1.0
"""How long one read waits for a message before looping (it sees cancellation at once anyway)."""
RETRY_S = 0.5

Handler = Callable[[dict[str, Any]], None]


class Events:
    def __init__(self, link: Link, channel: str) -> None:
        self._link = link
        self._channel = channel
        self._handlers: dict[str, Handler] = {}
        self.connected = False
        self.on_connected: Callable[[], None] = lambda: None
        """Called each time the subscription is (re)established: time to catch up."""

    def handle(self, kind: str, handler: Handler) -> None:
        self._handlers[kind] = handler

    async def run(self) -> None:
        """Forever: subscribe, hand each message to its handler; resubscribe after any failure."""
        while True:
            if not self._link.healthy:
                await anyio.sleep(RETRY_S)
                continue
            pubsub = self._link.client.pubsub(ignore_subscribe_messages=True)
            try:
                with anyio.fail_after(self._link.timeout_s * 10):
                    await pubsub.subscribe(self._channel)
                self.connected = True
                self.on_connected()
                await self._read(pubsub)
            except (TimeoutError, RedisError, OSError) as exc:
                self._link.failed(exc)
            finally:
                self.connected = False
                with anyio.move_on_after(1.0, shield=True):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await anyio.sleep(RETRY_S)

    async def _read(self, pubsub: PubSub) -> None:
        while True:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=READ_WAIT_S)
            if message is None or message.get("type") != "message":
                if not self._link.healthy:
                    return  # commands fail elsewhere: reconnect once Redis is back
                continue
            try:
                data = json.loads(message["data"])
            except (ValueError, TypeError):
                continue
            handler = self._handlers.get(str(data.get("t"))) if isinstance(data, dict) else None
            if handler is not None:
                try:
                    handler(data)
                except Exception:  # one bad message must not end the subscription
                    log.exception("handling a Redis event failed")
