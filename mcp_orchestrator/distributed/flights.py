"""Single flight across processes: one process calls the backend for a key, the others wait.

    join(key)  ->  hit (a cached answer)  |  lead (we hold the lock)  |  follow (someone else does)

`join` is one Lua script, so "is there an answer, else take the lock, else who holds it" is
atomic. The leader's lock (`SET NX PX lock_ttl`) is renewed every third of its expiry while
its call runs; when the call ends, one script (ends.py, which also says when it is sent)
drops the lock and, if some process follows the flight, publishes the outcome (the answer
itself, a failure, or "released": nobody waits for it here any more) on the events
channel. A follower's join marks the flight followed in the same script that tells it to
follow (the first follower's join also publishes a `followed` notice, so the leader ends
the flight at once), and the leader's end reads and drops that mark in the script that
drops the lock: so a flight nobody follows (the common case: distinct prompts) publishes
nothing and costs no process any message to read, and a follower that joined before the
end is always told. Followers wait for that message
without polling: each process has one subscription (events.py) that hands it to the local
watcher of that key. A follower registers before it joins, so a message published after
its join cannot be missed; if the message never comes (the leader died, or the
subscription was down), the follower joins again when the lock would have expired: then
the lock is gone and one follower takes it over. Nobody waits past its own deadline: the caller's cancel scope bounds it.
A caller that leaves while its join is on the wire waits for the reply (within the link's
timeout): a lock the join took is then released at once, not left to expire. A join whose
reply never came (a timeout) may still have run: when Redis answers again, this process gives
back any such lock that is still its own.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
from redis.asyncio import Redis

from mcp_orchestrator.distributed.ends import FlightEnds, Outcome
from mcp_orchestrator.distributed.keys import Keys
from mcp_orchestrator.distributed.link import Link, RedisUnavailable

log = logging.getLogger(__name__)

JOIN = """
if ARGV[3] == '1' then
  local answer = redis.call('GET', KEYS[1])
  if answer then return {'hit', answer} end
end
if ARGV[4] == '0' then return {'alone', ''} end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {'lead', ''} end
local left = redis.call('PTTL', KEYS[2])
local first = redis.call('EXISTS', KEYS[3]) == 0
redis.call('SET', KEYS[3], '1', 'PX', math.max(left, 0) + 2 * tonumber(ARGV[2]))
if first then redis.call('PUBLISH', ARGV[5], cjson.encode({t = 'followed', k = ARGV[6]})) end
return {'follow', tostring(left)}
"""
"""KEYS: answer, lock, followed. ARGV: owner, lock ttl ms, look in the cache (1/0), may lead or
follow (1/0), events channel, the flight's key. A follower joins again when the leader's lock
would expire (its `left`), so a mark that lasts longer than that (by twice this process's expiry)
stays while a follower waits, even when the leader's lock_ttl_ms is another one (a rolling change
of it), and outlives none by long. The first follower's join tells the leader (ends.py)."""

RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
"""KEYS: lock. ARGV: owner, ttl ms. Extends the lock only while we still hold it."""

Verdict = Literal["hit", "lead", "follow", "alone"]
MAX_UNSURE = 10_000
"""Keys remembered from joins that got no reply (past it, their locks just expire)."""


@dataclass(frozen=True, slots=True)
class Joined:
    verdict: Verdict
    answer: str = ""
    """The cached answer's payload (verdict "hit")."""
    lock_ms: int = 0
    """Milliseconds left on the leader's lock (verdict "follow")."""


@dataclass(eq=False)
class Watch:
    """A local follower of one key, woken by the events subscription."""

    key: str
    arrived: anyio.Event = field(default_factory=anyio.Event)
    outcome: Outcome | None = None

    def deliver(self, outcome: Outcome) -> None:
        self.outcome = outcome
        self.arrived.set()

    async def wait(self, seconds: float) -> Outcome | None:
        """The next outcome published for the key, or None after `seconds`."""
        with anyio.move_on_after(max(0.0, seconds)):
            await self.arrived.wait()
        outcome, self.outcome = self.outcome, None
        self.arrived = anyio.Event()
        return outcome


class Flights:
    def __init__(self, link: Link, keys: Keys, owner: str, lock_ttl_ms: int) -> None:
        self._link = link
        self._keys = keys
        self.owner = owner
        self.lock_ttl_ms = lock_ttl_ms
        self._watches: dict[str, set[Watch]] = {}
        # EVALSHA for the per-request scripts: the script's text is not resent each time.
        self._join = link.client.register_script(JOIN)
        self._renew = link.client.register_script(RENEW)
        self.led = 0
        """Flights this process led (it called the backend for every process)."""
        self.followed = 0
        """Trips of this process that waited on another process's flight (counted by the pipeline)."""
        self.taken_over = 0
        """Flights this process led after the previous leader's lock expired."""
        self.ends = FlightEnds(link, keys, owner)
        """When the flights this process leads end in Redis (ends.py)."""
        self._unsure: set[str] = set()
        """Keys whose join got no reply (a timeout): Redis may still have run it and taken the lock."""

    async def join(self, key: str, *, look: bool, share: bool) -> Joined:
        """Cached answer, lock, or the lock's holder (see the module docstring). RedisUnavailable."""
        keys = self._keys
        args = (self.owner, self.lock_ttl_ms, "1" if look else "0", "1" if share else "0", keys.events, key)
        names = (keys.answer(key), keys.lock(key), keys.followed(key))
        if share:  # it may lead: our own end of the key goes first, and a notice may come before the reply
            await self.ends.joining(key)
        verdict = ""
        sent = self._link.healthy  # else the link refuses at once and nothing reaches Redis
        try:
            # Shielded (the link's timeout bounds it): once written, the script runs even if our
            # caller leaves, and only its reply says whether it took a lock we must give back.
            with anyio.CancelScope(shield=True):
                reply, detail = await self._link.script(self._join, names, args)
            verdict = _text(reply)
        except RedisUnavailable:
            if share and sent and len(self._unsure) < MAX_UNSURE:
                self._unsure.add(key)  # Redis may have run it late: the lock may be ours (release_unsure)
            raise
        finally:
            if share:
                self.ends.joined(key, leads=verdict == "lead")
        if verdict == "hit":
            return Joined("hit", answer=_text(detail))
        if verdict == "follow":
            return Joined("follow", lock_ms=max(0, int(_text(detail))))
        if verdict == "lead":
            self.led += 1
        return Joined(verdict)  # type: ignore[arg-type]

    @contextmanager
    def watch(self, key: str) -> Iterator[Watch]:
        """Receive the outcomes published for `key` while the block runs (enter it before joining)."""
        watch = Watch(key)
        self._watches.setdefault(key, set()).add(watch)
        try:
            yield watch
        finally:
            watchers = self._watches.get(key)
            if watchers is not None:
                watchers.discard(watch)
                if not watchers:
                    del self._watches[key]

    def delivered(self, message: dict[str, Any]) -> None:
        """An outcome from the events channel: wake the local followers of its key."""
        watchers = self._watches.get(str(message.get("k", "")))
        if not watchers:
            return
        outcome = Outcome(message.get("s", "released"), str(message.get("a", "")), str(message.get("e", "")))
        for watch in tuple(watchers):
            watch.deliver(outcome)

    def release_unsure(self) -> None:
        """Redis answers again: give back the locks our unanswered joins may have taken, so that
        other processes do not follow a flight nobody runs until the lock expires. The end drops
        a lock only if it is ours (and tells its followers, who join again); a key this process
        is joining or leading again is left alone (its own end will come)."""
        unsure, self._unsure = self._unsure, set()
        for key in unsure:
            if not self.ends.busy(key):
                self.ends.end(key, _released)

    def wake_all(self) -> None:
        """The subscription was re-established: messages may have been lost, so every follower
        joins again at once instead of at its lock's expiry."""
        for watchers in tuple(self._watches.values()):
            for watch in tuple(watchers):
                watch.deliver(Outcome("released"))

    async def renew(self, key: str) -> bool:
        """Extend our lock; False when it is no longer ours (or Redis is unreachable)."""
        lock = self._keys.lock(key)

        async def run(client: Redis) -> Any:
            return await self._renew(keys=(lock,), args=(self.owner, self.lock_ttl_ms))

        try:
            return bool(await self._link.call(run))
        except RedisUnavailable:
            return False


def _released() -> tuple[Outcome, None]:
    return Outcome("released"), None


def _text(value: Any) -> str:
    return value.decode("utf-8", "surrogatepass") if isinstance(value, bytes) else str(value)
