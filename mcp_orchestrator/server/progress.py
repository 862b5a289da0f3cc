"""Streaming an answer's chunks to the caller as MCP progress notifications.

A caller asks for progress by putting a progress token in the request's `_meta` (the SDK
clients do it when given a progress callback; an in-process `mcp.Client(server)` caller
passes `meta={"progressToken": ...}` along with its callback). Without one, no chunk is
forwarded and nothing is set up for it: most tool calls never ask.

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

T = TypeVar("T")
ChunkSink = Callable[[str], None]


def progress_requested(ctx: Context[Any, Any]) -> bool:
    """Whether the caller passed a progress token with this request."""
    meta = ctx.request_context.meta
    return meta is not None and meta.get("progress_token") is not None


async def with_progress(ctx: Context[Any, Any], run: Callable[[ChunkSink | None], Awaitable[T]]) -> T:
    """`run(on_chunk)`, forwarding each chunk as a progress notification when the caller asked."""
    if not progress_requested(ctx):
        return await run(None)
    send, receive = anyio.create_memory_object_stream[str](PROGRESS_BUFFER)

    def on_chunk(text: str) -> None:
        try:
            send.send_nowait(text)
        except (anyio.WouldBlock, anyio.ClosedResourceError, anyio.BrokenResourceError):
            pass  # best effort: a slow client loses chunks, never the answer

    outcome: T | OrchestratorError
    forwarded = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(_forward, receive, ctx, forwarded)
        try:
            outcome = await run(on_chunk)
        except OrchestratorError as exc:
            outcome = exc
        finally:
            send.close()
        # Let the queued chunks reach the client before the result, but never wait forever.
        with anyio.move_on_after(PROGRESS_DRAIN_S):
            await forwarded.wait()
        tg.cancel_scope.cancel()
    if isinstance(outcome, OrchestratorError):
        raise outcome
    return outcome


async def _forward(receive: MemoryObjectReceiveStream[str], ctx: Context[Any, Any], done: anyio.Event) -> None:
    count = 0
    try:
        async with receive:
            async for text in receive:
                count += 1
                await ctx.report_progress(count, None, text)
    finally:
        done.set()
