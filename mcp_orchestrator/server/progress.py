"""Progress notifications: an answer's chunks as they stream, and a heartbeat while a call waits.

A caller asks for progress by putting a progress token in the request's `_meta` (the SDK
clients do it when given a progress callback; an in-process `mcp.Client(server)` caller
passes `meta={"progressToken": ...}` along with its callback). Without one, nothing is
sent and nothing is set up for it: most tool calls never ask.

Why the heartbeat: hosts give up on a tool call after a fixed time, and some reset that
timer on every progress notification. A call that waits (in a queue, for a slow model, for
a background request) with no chunk to forward sends one every `HEARTBEAT_S` saying where
the work is, so such a host keeps waiting.

Progress is best effort: a slow client loses chunks (a bounded buffer), never the answer;
and whether anyone asked decides whether a broken stream may be retried (a caller who
saw half an answer must not see it again).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream
from mcp.server.mcpserver import Context

from mcp_orchestrator.errors import OrchestratorError

PROGRESS_BUFFER = 256
PROGRESS_DRAIN_S = 5.0
"""Longest wait, once the answer is there, for the chunks still queued to reach the client."""
HEARTBEAT_S = 5.0
"""A call with nothing else to report says where its work is this often."""

T = TypeVar("T")
ChunkSink = Callable[[str], None]
Describe = Callable[[], str]


def progress_requested(ctx: Context[Any, Any]) -> bool:
    """Whether the caller passed a progress token with this request."""
    meta = ctx.request_context.meta
    return meta is not None and meta.get("progress_token") is not None


class Reporter:
    """One call's progress notifications: `progress` strictly increases, as the protocol asks."""

    def __init__(self, ctx: Context[Any, Any], total: float | None = None) -> None:
        self._ctx = ctx
        self.total = total
        self.progress = 0.0
        self.items = 0
        """With a total: items done as last reported (heartbeats count from there)."""
        self.beats = 0
        self.last_sent = anyio.current_time()

    async def send(self, message: str, progress: float | None = None) -> None:
        """Send `message`; `progress` (items done, with a total) or the next step."""
        if progress is not None and progress > self.progress:
            self.items, self.beats = int(progress), 0
        else:
            progress = self._next_step()
        self.progress = progress
        self.last_sent = anyio.current_time()
        await self._ctx.report_progress(progress, self.total, message)

    def _next_step(self) -> float:
        if self.total is None:
            return self.progress + 1
        # With a total, progress counts items: the n-th heartbeat since the last item done is
        # items + n/(n+1), always below the next item (and the total), and always increasing.
        self.beats += 1
        return self.items + self.beats / (self.beats + 1)

    async def heartbeat(self, describe: Describe) -> None:
        """Until cancelled: say where the work is whenever nothing was sent for HEARTBEAT_S."""
        while True:
            await anyio.sleep(max(0.0, self.last_sent + HEARTBEAT_S - anyio.current_time()))
            if anyio.current_time() - self.last_sent >= HEARTBEAT_S:
                await self.send(describe())


async def with_progress(
    ctx: Context[Any, Any], run: Callable[[ChunkSink | None], Awaitable[T]], describe: Describe | None = None
) -> T:
    """`run(on_chunk)`, forwarding each chunk as a progress notification when the caller
    asked, and a heartbeat from `describe` while no chunk comes."""
    if not progress_requested(ctx):
        return await run(None)
    send, receive = anyio.create_memory_object_stream[str](PROGRESS_BUFFER)

    def on_chunk(text: str) -> None:
        try:
            send.send_nowait(text)
        except (anyio.WouldBlock, anyio.ClosedResourceError, anyio.BrokenResourceError):
            pass  # best effort: a slow client loses chunks, never the answer

    reporter = Reporter(ctx)
    forwarded = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(_forward, receive, reporter, forwarded)
        if describe is not None:
            tg.start_soon(reporter.heartbeat, describe)
        with send:
            outcome = await _caught(run(on_chunk))
        # Let the queued chunks reach the client before the result, but never wait forever.
        with anyio.move_on_after(PROGRESS_DRAIN_S):
            await forwarded.wait()
        tg.cancel_scope.cancel()
    return _unwrapped(outcome)


async def with_heartbeat(
    ctx: Context[Any, Any], run: Callable[[Reporter | None], Awaitable[T]], describe: Describe, total: float | None
) -> T:
    """`run(reporter)` with a heartbeat from `describe` while it runs, when the caller asked
    for progress (`run` may send its own through the reporter: items done of `total`)."""
    if not progress_requested(ctx):
        return await run(None)
    reporter = Reporter(ctx, total)
    async with anyio.create_task_group() as tg:
        tg.start_soon(reporter.heartbeat, describe)
        outcome = await _caught(run(reporter))
        tg.cancel_scope.cancel()
    return _unwrapped(outcome)


async def _caught(work: Awaitable[T]) -> T | OrchestratorError:
    """`work`'s result, or the OrchestratorError it raised, returned: raised inside a task
    group's body it would come out wrapped in an exception group; `_unwrapped` raises it after."""
    try:
        return await work
    except OrchestratorError as exc:
        return exc


def _unwrapped(outcome: T | OrchestratorError) -> T:
    if isinstance(outcome, OrchestratorError):
        raise outcome
    return outcome


async def _forward(receive: MemoryObjectReceiveStream[str], reporter: Reporter, done: anyio.Event) -> None:
    try:
        async with receive:
            async for text in receive:
                await reporter.send(text)
    finally:
        done.set()
