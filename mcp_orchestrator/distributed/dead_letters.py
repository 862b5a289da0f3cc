"""Dead letters in a capped Redis stream: they outlive a restart, and any process lists and replays them.

Each process keeps its own in-memory ring (pipeline/dead_letters.py) as the view its tools
read, and this module keeps the rings in step: a letter written here is appended to the
stream (`XADD MAXLEN capacity`, so the stream never grows past the ring's size) and
announced on the events channel; every process then reads the stream from where it last
read (a plain XRANGE, no blocking read) and adds the other processes' letters to its ring.
A process that starts, or reconnects after an outage, reads what it missed the same way.
Letters written while Redis is unreachable wait in a bounded local backlog and are
appended when it is back, so none is lost to an outage.

A replay is claimed with `SET NX` on the letter's id before it runs: of two replays of the
same letter, in one process or two, exactly one runs.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from mcp_orchestrator.distributed.keys import Keys
from mcp_orchestrator.distributed.link import Link, RedisUnavailable

log = logging.getLogger(__name__)

READ_BATCH = 500
CLAIM_TTL_MS = 7 * 24 * 3600 * 1000
"""A replayed letter stays claimed for a week (far longer than a capped stream keeps it)."""
RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
"""KEYS: the claim. ARGV: our token. Drops the claim only if it is still ours."""


@dataclass(frozen=True, slots=True)
class Claim:
    """A replay claim: `holder` None when we got it (`token` is ours), else who has it."""

    token: str
    holder: str | None


@dataclass(frozen=True, slots=True)
class Letter:
    id: str
    node: str
    payload: str
    """The letter and its submission, encoded by the pipeline (pipeline/sharing.py)."""


class SharedDeadLetters:
    def __init__(self, link: Link, keys: Keys, owner: str, capacity: int) -> None:
        self._link = link
        self._keys = keys
        self._owner = owner
        self._release = link.client.register_script(RELEASE)
        self.capacity = capacity
        self.backlog: deque[Letter] = deque(maxlen=capacity)
        """Our letters not yet in the stream (Redis was unreachable); the oldest go first past capacity."""
        self._last_id = "0-0"
        """The stream entry we read last."""
        self.on_letter: Callable[[Letter], None] = lambda letter: None
        """Set by the pipeline: adds another process's letter to the local ring."""
        self.appended = 0
        self.received = 0

    def add(self, letter: Letter) -> None:
        """Queue one of our letters for the stream (sent by `flush`)."""
        self.backlog.append(letter)

    async def flush(self) -> None:
        """Append the backlog to the stream, oldest first. RedisUnavailable leaves the rest queued."""
        while self.backlog:
            batch = list(self.backlog)[:READ_BATCH]
            await self._append(batch)
            for _ in batch:
                self.backlog.popleft()
            self.appended += len(batch)

    async def _append(self, batch: list[Letter]) -> None:
        stream, channel, capacity = self._keys.dead_letters, self._keys.events, self.capacity
        notice = json.dumps({"t": "letters", "o": self._owner})

        async def run(client: Redis) -> Any:
            async with client.pipeline(transaction=False) as pipe:
                for letter in batch:
                    fields = {"id": letter.id, "node": letter.node, "payload": letter.payload}
                    pipe.xadd(stream, fields, maxlen=capacity, approximate=False)  # type: ignore[arg-type]
                pipe.publish(channel, notice)
                return await pipe.execute()

        await self._link.call(run)

    async def catch_up(self) -> None:
        """Read the stream from where we stopped; other processes' letters go to the local ring.
        RedisUnavailable."""
        stream = self._keys.dead_letters
        while True:
            start = "-" if self._last_id == "0-0" else f"({self._last_id}"

            async def run(client: Redis, start: str = start) -> Any:
                return await client.xrange(stream, min=start, max="+", count=READ_BATCH)

            entries = await self._link.call(run)
            for entry_id, fields in entries:
                self._last_id = _text(entry_id)
                letter = Letter(_field(fields, "id"), _field(fields, "node"), _field(fields, "payload"))
                if letter.node != self._owner:
                    self.received += 1
                    self.on_letter(letter)
            if len(entries) < READ_BATCH:
                return

    def restarted(self) -> None:
        """Redis came back, perhaps empty (a restart without persistence): read from the start
        again (letters already held are recognised by id and not added twice)."""
        self._last_id = "0-0"

    async def claim(self, letter_id: str) -> Claim:
        """Claim the replay of `letter_id` (see Claim). RedisUnavailable when Redis cannot say
        (then nobody may replay: it could run twice)."""
        key = self._keys.replay_claim(letter_id)
        # A token of this claim's own: a command retried after a broken connection finds its own
        # claim (ours), and two replays in this process still tell each other apart.
        token = f"{self._owner}/{secrets.token_hex(4)}"

        async def run(client: Redis) -> Any:
            async with client.pipeline(transaction=False) as pipe:
                pipe.set(key, token, nx=True, px=CLAIM_TTL_MS)
                pipe.get(key)
                return await pipe.execute()

        _, holder = await self._link.call(run)
        holder_text = _text(holder or b"another process")
        return Claim(token, None if holder_text == token else holder_text.rsplit("/", 1)[0])

    async def release(self, letter_id: str, token: str) -> None:
        """Give back a claim whose replay never ran (it was refused before it started), so the
        letter can be replayed later. RedisUnavailable when Redis cannot be told."""
        key = self._keys.replay_claim(letter_id)
        await self._link.call(lambda client: self._release(keys=(key,), args=(token,)))


def _field(fields: dict[Any, Any], name: str) -> str:
    value = fields.get(name.encode(), fields.get(name, b""))
    return _text(value)


def _text(value: Any) -> str:
    return value.decode("utf-8", "surrogatepass") if isinstance(value, bytes) else str(value)


__all__ = ["Letter", "RedisUnavailable", "SharedDeadLetters"]
