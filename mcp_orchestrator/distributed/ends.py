"""When a flight's end reaches Redis: at once when another process follows the flight, else
batched, at most END_DELAY_S after the flight ended.

A flight's end (the END script: drop the lock, store the answer in the shared cache, tell
the followers) is urgent only when another process follows the flight. Sent the moment
the answer was ready, it ran while the caller's next request arrived: this process and
Redis then competed with that request for the CPU. Measured with one call at a time, an
end sent 8 ms later cost Redis's added p50 as little as no end at all, about 0.2 ms less
than an end sent at once (BENCHMARKS.md, "Gateway, with flight ends queued"). So an end
is queued, and one task sends what the queue holds in one write (pipelined EVALSHAs)
END_DELAY_S after the first end was queued: under load one write carries several.

A follower does not wait for the delay. The join script that tells a process to follow a
flight publishes a `followed` notice the first time the flight gets a follower; the
leading process then sends that flight's end at once (or as soon as the flight ends).
A notice is heard from the moment our own join is sent (it can only come after our lock
was taken, but it can come before the join's reply). A process that joins a key whose own
end is still queued sends that end first, so it does not follow its own finished flight.

What the delay does cost: for up to END_DELAY_S the lock is still held, so another process
asking for the same answer follows the flight (the notice then ends it at once: a round
trip or two later than a cache hit would have answered), and a request with deduplication
off, which only looks at the cache, misses it and calls the backend. A process killed in
that window leaves its locks to expire, as a leader killed mid-call does.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import anyio
from redis.exceptions import ResponseError

from mcp_orchestrator.distributed.cache import PUT_FUNCTION
from mcp_orchestrator.distributed.keys import Keys
from mcp_orchestrator.distributed.lane import Argument, Call
from mcp_orchestrator.distributed.link import Link, RedisUnavailable

log = logging.getLogger(__name__)

END_DELAY_S = 0.01
"""How long an end nobody follows may wait in the queue (so it is sent while the process is
waiting on a backend, not while it admits the next request)."""

END = (
    PUT_FUNCTION
    + """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
if #KEYS > 2 then
  cache_put(KEYS[3], KEYS[4], KEYS[5], ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7]),
            tonumber(ARGV[8]))
end
if redis.call('DEL', KEYS[2]) == 1 then redis.call('PUBLISH', ARGV[2], ARGV[3]) end
return 1
"""
)
"""KEYS: lock, followed [, answer, index, sizes]. ARGV: owner, channel, message [, cache_put's
arguments]. Drops our lock, stores the answer when asked, then tells the waiting processes, if any."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a leader published: `status` ok (with `answer`), failed (with `error`) or released."""

    status: Literal["ok", "failed", "released"]
    answer: str = ""
    error: str = ""


CachePut = tuple[list[str], list[Argument]]
"""The answer's keys and cache_put's arguments (SharedCache.put_args)."""
Ending = Callable[[], tuple[Outcome, CachePut | None]]
"""Builds a flight's end when it is sent (encoding the answer is no caller's work)."""


@dataclass(slots=True)
class _Flight:
    """What this process knows of one flight it leads or is about to lead."""

    joining: int = 0
    """Joins of this key on their way (a notice may come before their reply)."""
    leading: bool = False
    followed: bool = False
    ending: Ending | None = None
    """Queued end, not sent yet."""


class FlightEnds:
    def __init__(self, link: Link, keys: Keys, owner: str, *, delay_s: float = END_DELAY_S) -> None:
        self._link = link
        self._keys = keys
        self._owner = owner
        self.delay_s = delay_s
        """How long an end nobody follows waits (tests lengthen it)."""
        self._script = link.client.register_script(END)
        self._flights: dict[str, _Flight] = {}
        self._queued = anyio.Event()
        self._urgent = anyio.Event()
        self.sent = 0
        """Ends sent (whether Redis took them or not)."""
        self.writes = 0
        """Writes that carried them."""
        self.refused = 0
        """Ends Redis answered with an error (the locks expire; followers take over)."""

    # ------------------------------------------------------------------ a flight's life

    async def joining(self, key: str) -> None:
        """A join that may lead `key` is about to be sent: our own queued end of it goes first."""
        flight = self._flights.get(key)
        if flight is not None and flight.ending is not None:
            await self._send([(key, self._unqueue(key, flight))])
        self._flights.setdefault(key, _Flight()).joining += 1

    def joined(self, key: str, *, leads: bool) -> None:
        """The join's reply came (or none will): whether this process leads the flight now."""
        flight = self._flights.get(key)
        if flight is None:
            return
        flight.joining -= 1
        flight.leading = flight.leading or leads
        self._tidy(key, flight)

    def end(self, key: str, ending: Ending) -> None:
        """The flight we lead is over: queue its end (sent at once when it is followed)."""
        flight = self._flights.setdefault(key, _Flight())
        flight.leading, flight.ending = False, ending
        self._queued.set()
        if flight.followed:
            self._urgent.set()

    def noticed(self, message: dict[str, Any]) -> None:
        """Another process follows a flight (the `followed` notice): if it is ours, end it at once."""
        flight = self._flights.get(str(message.get("k", "")))
        if flight is None:
            return
        flight.followed = True
        if flight.ending is not None:
            self._urgent.set()

    def busy(self, key: str) -> bool:
        """Whether this process is joining, leading or ending a flight of `key` right now."""
        return key in self._flights

    def followed(self, key: str) -> bool:
        """Whether another process follows our flight of `key` (as far as the notices told)."""
        flight = self._flights.get(key)
        return flight is not None and flight.followed

    def _unqueue(self, key: str, flight: _Flight) -> Ending:
        """Take `flight`'s queued end off the queue, to be sent now."""
        assert flight.ending is not None
        ending, flight.ending, flight.followed = flight.ending, None, False  # a next flight starts unfollowed
        self._tidy(key, flight)
        return ending

    def _tidy(self, key: str, flight: _Flight) -> None:
        if not flight.joining and not flight.leading and flight.ending is None:
            del self._flights[key]

    # ------------------------------------------------------------------ sending

    async def run(self) -> None:
        """Forever: once an end is queued, wait END_DELAY_S (less when one is followed), then
        send the queue in one write."""
        while True:
            await self._queued.wait()
            with anyio.move_on_after(self.delay_s):
                await self._urgent.wait()
            self._queued, self._urgent = anyio.Event(), anyio.Event()
            await self.flush()

    async def flush(self) -> None:
        """Send every queued end now (the task above, and shutdown)."""
        queued = [(key, flight) for key, flight in self._flights.items() if flight.ending is not None]
        if queued:
            await self._send([(key, self._unqueue(key, flight)) for key, flight in queued])

    async def send(self, key: str, outcome: Outcome, cache: CachePut | None) -> None:
        """One end, now."""
        await self._send([(key, lambda: (outcome, cache))])

    async def _send(self, batch: list[tuple[str, Ending]]) -> None:
        """Send `batch` in one write. Shielded (the link's timeout bounds it): these ends are off
        the queue, so a caller leaving, or shutdown cancelling the task, must not lose them."""
        calls: list[Call] = []
        for key, ending in batch:
            try:
                outcome, cache = ending()
            except Exception:  # a bug must not lose the lock: followers take the flight over
                log.exception("could not share the outcome of flight %s; releasing it", key)
                outcome, cache = Outcome("released"), None
            calls.append(self._call(key, outcome, cache))
        self.sent += len(calls)
        self.writes += 1
        try:
            with anyio.CancelScope(shield=True):
                replies = await self._link.script_many(self._script, calls)
        except RedisUnavailable:
            return  # logged by the link; the locks expire and followers take over
        refused = [reply for reply in replies if isinstance(reply, ResponseError)]
        if refused:  # one line per write, not per end (an out-of-memory Redis refuses them all)
            self.refused += len(refused)
            log.warning("Redis refused %d of %d flight ends: %s", len(refused), len(replies), refused[0])

    def _call(self, key: str, outcome: Outcome, cache: CachePut | None) -> Call:
        message = json.dumps({"t": "flight", "k": key, "s": outcome.status, "a": outcome.answer, "e": outcome.error})
        names: list[str] = [self._keys.lock(key), self._keys.followed(key)]
        args: list[Argument] = [self._owner, self._keys.events, message]
        if cache is not None:
            names += cache[0]
            args += cache[1]
        return names, args
