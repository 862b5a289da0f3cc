"""The fast lane: the scripts every new request runs (a flight's join and end, a rate-limit
reservation) on connections this process keeps for them alone.

Through redis-py's pooled client a command costs 0.1-0.4 ms of Python around a round trip
of 30-100 µs (the pool's locks and health read, event dispatch, metrics hooks, the retry
wrapper), and that was most of what Redis added to a call (BENCHMARKS.md, "Gateway, after
cheaper Redis and header checks"). Here a command takes an idle connection from a stack, sends EVALSHA, reads the
reply and puts the connection back: the library still connects, packs and parses; only the
pool's bookkeeping is skipped.

A command cut short (timeout, cancellation, a broken connection) may leave its reply on
the wire, so its connection is closed, never reused; and a command is never sent twice (see
`evalsha`). At most `size` commands run at once; the others wait for a connection, as they
would for the pool's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import anyio
from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, ResponseError
from redis.typing import EncodableT

Argument = str | int
Call = tuple[Sequence[str], Sequence[Argument]]
"""One run of a script: its keys and its arguments."""


class Lane:
    def __init__(self, pool: ConnectionPool, size: int) -> None:
        # No socket timeout of the library's own: the link's deadline bounds the whole command.
        self._settings = {**pool.connection_kwargs, "socket_timeout": None}
        self._connection_class = pool.connection_class
        self._idle: list[AbstractConnection] = []
        self._slots = anyio.Semaphore(size)
        self._closed = False

    async def evalsha(self, script: AsyncScript, keys: Sequence[str], args: Sequence[Argument]) -> Any:
        """Run `script`; its reply, or the library's exception (ResponseError: Redis refused it).
        Never sent twice: a script that ran but whose reply was lost must not run again (a
        join would find its own lock, a reservation would take two tokens)."""
        (reply,) = await self.evalsha_many(script, [(keys, args)])
        if isinstance(reply, ResponseError):  # read whole: its connection went back in step
            raise reply
        return reply

    async def evalsha_many(self, script: AsyncScript, calls: Sequence[Call]) -> list[Any]:
        """Run `script` once per call, all sent in one write; each call's reply, or the
        ResponseError Redis answered it with (the others still ran). Never sent twice, as above."""
        async with self._slots:
            connection = await self._take()
            try:
                replies = await _run_many(connection, script, calls)
            except BaseException:
                await _close(connection)
                raise
            await self._give_back(connection)
            return replies

    async def _take(self) -> AbstractConnection:
        """An idle connection still in step, else a new one. An idle connection that saw Redis
        go away (a restart closes every connection) or holds stray bytes is closed here,
        before anything is sent on it, so no command needs to be sent again."""
        while self._idle:
            connection = self._idle.pop()
            try:
                if not await connection.can_read():  # in memory only: EOF seen, or bytes buffered
                    return connection
            except Exception:  # whatever it is, the connection is not trusted with a command
                pass
            await _close(connection)
        return self._connection_class(**self._settings)

    async def _give_back(self, connection: AbstractConnection) -> None:
        if self._closed:
            await _close(connection)
        else:
            self._idle.append(connection)

    async def open_one(self) -> None:
        """Open one idle connection now, so a first request does not pay for it. The library's
        exception when Redis is not there."""
        connection = self._connection_class(**self._settings)
        try:
            await connection.connect()  # type: ignore[no-untyped-call]
        except BaseException:
            await _close(connection)
            raise
        await self._give_back(connection)

    async def drop_idle(self) -> None:
        """Close the idle connections (after an outage they are dead anyway)."""
        idle, self._idle = self._idle, []
        for connection in idle:
            await _close(connection)

    async def aclose(self) -> None:
        """Close the idle connections, and each busy one as its command ends."""
        self._closed = True
        await self.drop_idle()


async def _run_many(connection: AbstractConnection, script: AsyncScript, calls: Sequence[Call]) -> list[Any]:
    replies = await _pipelined(connection, [("EVALSHA", script.sha, len(keys), *keys, *args) for keys, args in calls])
    unknown = [index for index, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
    if unknown:  # Redis restarted empty: those did not run; EVAL sends the text and caches it again
        again = [calls[index] for index in unknown]
        texts = await _pipelined(connection, [("EVAL", script.script, len(keys), *keys, *args) for keys, args in again])
        for index, reply in zip(unknown, texts, strict=True):
            replies[index] = reply
    return replies


async def _pipelined(connection: AbstractConnection, commands: list[tuple[EncodableT, ...]]) -> list[Any]:
    """Send `commands` in one write and read one reply for each (an error reply is a value here:
    it was read whole, so the connection stays in step)."""
    await connection.send_packed_command(connection.pack_commands(commands))
    replies: list[Any] = []
    for _ in commands:
        try:
            replies.append(await connection.read_response())
        except ResponseError as exc:
            replies.append(exc)
    return replies


async def _close(connection: AbstractConnection) -> None:
    with anyio.CancelScope(shield=True), anyio.move_on_after(1.0):
        await connection.disconnect(nowait=True)
