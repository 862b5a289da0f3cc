"""The transport edges of a shutdown drain (shutdown.py): which calls are in flight, and how
each transport stops taking work without cutting an answer.

HTTP (`DrainGate`, the outermost ASGI middleware): a request other than a GET is in flight
from the end of its body until its response is complete (for a tool call, the SSE stream that
carries its answer); a body still arriving owes no answer yet, and once drained it is cut
short with a 503. Once the drain begins, a request that belongs to no open MCP session
(a new client, a 2026-style sessionless POST, /healthz, /metrics) is answered 503, except a
sessionless `tools/list` or `ping`, which start no work; requests of open sessions are still
served. A client may need one (a tools/list to check a result against the tool's output
schema, which the SDK's client sends after the result when it has not listed the tools
yet; a cancellation) to finish a call in flight, and a new tool call of a session's gets
the pipeline's clear "server is shutting down" error. Once drained, open GET streams
(server-to-client messages, no answer owed) are ended as if their client had left, and
completed cleanly, so that uvicorn can stop at once. `Uvicorn` is uvicorn
without its own signal handlers: on SIGTERM they stop the server straight away (and
sse-starlette, seeing uvicorn exit, ends every SSE response, answers in flight included),
then re-raise the signal after serving, so the process dies of it instead of exiting 0.

stdio (`StdioEdge`): a JSON-RPC request read from stdin is in flight until its response has
been handed to the SDK's stdout writer, which writes and flushes it before it ends; a request
the client cancels is never answered and leaves at once. Once drained, stdin reads nothing
more: the SDK sees the end of input and closes the session as if the client had hung up,
after writing every answer. Reads wait until the descriptor is readable instead of blocking
a worker thread, which would keep the process alive, after everything else has stopped, for
as long as the client keeps stdin open.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
from collections.abc import Awaitable, Callable, Iterator
from contextlib import suppress
from functools import partial
from typing import Any, Self, TypeVar

import anyio
import anyio.to_thread
import uvicorn
from mcp.shared._stream_protocols import ReadStream, WriteStream
from mcp.shared.message import SessionMessage
from mcp.types import JSONRPCError, JSONRPCNotification, JSONRPCRequest, JSONRPCResponse
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mcp_orchestrator.server.bodies import read_body, replaying
from mcp_orchestrator.server.sessions import SESSION_HEADER, header, is_legacy
from mcp_orchestrator.shutdown import InFlight, Shutdown

T = TypeVar("T")

REFUSAL = JSONResponse(
    {"error": "server is shutting down: it takes no new requests"},
    status_code=503,
    headers={"Retry-After": "5", "Connection": "close"},
)
DISCONNECT: Message = {"type": "http.disconnect"}
SERVED_WHILE_DRAINING = frozenset({"tools/list", "ping"})
"""Sessionless requests still answered during a drain: they start no work (see the module docstring)."""
PEEK_BYTES = 16 * 1024
"""Most of a body read to see whether it is one of those (they are a few hundred bytes)."""
PEEK_TIMEOUT_S = 5.0
"""Longest wait for that body: a client that stalls it is refused."""
CANCELLED = "notifications/cancelled"


async def first_of(event: anyio.Event, call: Callable[[], Awaitable[T]]) -> T | None:
    """`await call()`, or None as soon as `event` is set (the call is then cancelled)."""
    if event.is_set():
        return None
    results: list[T] = []
    failure: Exception | None = None

    async def run(scope: anyio.CancelScope) -> None:
        nonlocal failure
        try:
            results.append(await call())
        except Exception as exc:  # raised again below, outside the task group (not as a group)
            failure = exc
        scope.cancel()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run, tg.cancel_scope)
        await event.wait()
        tg.cancel_scope.cancel()
    if failure is not None:
        raise failure
    return results[0] if results else None


# ---------------------------------------------------------------------------- HTTP


class Uvicorn(uvicorn.Server):
    """uvicorn.Server that leaves SIGTERM and SIGINT to shutdown.py (see the module docstring)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class DrainGate:
    """ASGI middleware, outside every other: counts requests in flight, refuses requests from
    outside the open sessions once the server is stopping, ends open GET streams once drained."""

    def __init__(self, app: ASGIApp, shutdown: Shutdown, path: str, limit: int) -> None:
        self.app = app
        self._shutdown = shutdown
        self._path = path
        self._limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # the lifespan: the session manager starts and stops with the server
            await self.app(scope, receive, send)
            return
        if self._shutdown.stopping and not in_session(scope, self._path):
            served = await self._workless(scope, receive)
            if served is None:
                await REFUSAL(scope, receive, send)
                return
            receive = served
        if scope["method"] == "GET":
            await self._stream(scope, receive, send)
            return
        await self._counted(scope, receive, send)

    async def _counted(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A request is in flight from the end of its body (or its response's start, if that
        comes first) to the end of its response: a body still arriving owes no answer yet, so
        a client sending one slowly does not hold the drain. Once drained, such a body is cut
        short (its client is told it left) instead of keeping the server up."""
        in_flight, drained = self._shutdown.in_flight, self._shutdown.drained
        key = object()
        counted = cut = started = False

        def count() -> None:
            nonlocal counted
            if not counted:
                counted = True
                in_flight.enter(key)

        async def body_then_watch() -> Message:
            nonlocal cut
            if counted:
                return await receive()
            if self._shutdown.stopping:  # only then: first_of costs a task per read
                message = await first_of(drained, receive)
                if message is None:
                    cut = True
                    return DISCONNECT
            else:
                message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                count()
            return message

        async def answering(message: Message) -> None:
            nonlocal started
            count()
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, body_then_watch, answering)
            if cut and not started:  # the app saw its client leave; the client is still there
                with suppress(OSError):
                    await REFUSAL(scope, receive, send)
        finally:
            if counted:
                in_flight.leave(key)

    async def _workless(self, scope: Scope, receive: Receive) -> Receive | None:
        """For a sessionless POST of one SERVED_WHILE_DRAINING message: a `receive` that replays
        its body. None for anything else. This runs before authentication, so the body read is
        small (such a message is), bounded in time, and anything odd is simply refused."""
        if scope["method"] != "POST" or scope["path"] != self._path:
            return None
        with anyio.move_on_after(PEEK_TIMEOUT_S):
            read, body = await read_body(receive, min(self._limit, PEEK_BYTES))
            try:
                message = json.loads(body) if body is not None else None
            except (ValueError, RecursionError):
                return None
            method = message.get("method") if isinstance(message, dict) else None
            if isinstance(method, str) and method in SERVED_WHILE_DRAINING:
                return replaying(read, receive)
        return None

    async def _stream(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A GET owes no answer (an SSE stream of server messages, /healthz, /metrics): once the
        server is drained it is told its client left, and its response is completed here if
        the app left it open."""
        drained = self._shutdown.drained
        started = complete = False

        async def until_drained() -> Message:
            message = await first_of(drained, receive)
            return DISCONNECT if message is None else message

        async def watched(message: Message) -> None:
            nonlocal started, complete
            if message["type"] == "http.response.start":
                started = True
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                complete = True
            await send(message)

        await self.app(scope, until_drained, watched)
        if started and not complete and drained.is_set():
            with suppress(OSError):  # the client may have gone as well
                await send({"type": "http.response.body", "body": b"", "more_body": False})


def in_session(scope: Scope, path: str) -> bool:
    """Whether the request belongs to an MCP session: a request to the MCP endpoint, of a
    protocol that has sessions, naming one (the SDK answers 404 when it is not open). A
    2026-07-28 request, or one to another path, is sessionless whatever header it carries."""
    return scope["path"] == path and is_legacy(scope) and header(scope, SESSION_HEADER) is not None


# ---------------------------------------------------------------------------- stdio


class StdioEdge:
    """The stdio side of a drain: requests owed an answer, and stdin ending once drained."""

    def __init__(self, shutdown: Shutdown) -> None:
        self._shutdown = shutdown

    def reader(self, fd: int, size: int) -> Callable[[], Awaitable[bytes]]:
        """Reads of up to `size` bytes from `fd`; b"" (the end of input) once the server is drained."""
        drained = self._shutdown.drained

        async def read() -> bytes:
            chunk = await first_of(drained, partial(read_when_ready, fd, size))
            return b"" if chunk is None or drained.is_set() else chunk

        return read

    def streams(
        self, read_stream: ReadStream[SessionMessage | Exception], write_stream: WriteStream[SessionMessage]
    ) -> tuple[ReadStream[SessionMessage | Exception], WriteStream[SessionMessage]]:
        """The SDK's session streams, counting each request in flight until its answer is written."""
        in_flight = self._shutdown.in_flight
        return Requests(read_stream, in_flight), Answers(write_stream, in_flight)


def call_key(request_id: int | str) -> str:
    """A request's key in `in_flight`: its id as text, because a client may cancel request 10
    as "10", and the SDK cancels it (the call is then never answered and must leave)."""
    return str(request_id)


async def read_when_ready(fd: int, size: int) -> bytes:
    try:
        await anyio.wait_readable(fd)
    except OSError:  # not pollable (a regular file, /dev/null): its reads never wait anyway
        return await anyio.to_thread.run_sync(os.read, fd, size)
    return os.read(fd, size)


class Requests:
    """The session's read stream: each request enters `in_flight`; one the client cancels leaves
    it (the SDK never answers a cancelled request)."""

    def __init__(self, inner: ReadStream[SessionMessage | Exception], in_flight: InFlight) -> None:
        self._inner = inner
        self._in_flight = in_flight

    @property
    def last_context(self) -> contextvars.Context | None:
        """The sender's context, which the SDK's dispatcher reads off its stream when there is one."""
        context: contextvars.Context | None = getattr(self._inner, "last_context", None)
        return context

    async def receive(self) -> SessionMessage | Exception:
        item = await self._inner.receive()
        if isinstance(item, SessionMessage):
            self._note(item.message)
        return item

    def _note(self, message: Any) -> None:
        if isinstance(message, JSONRPCRequest):
            self._in_flight.enter(call_key(message.id))
        elif isinstance(message, JSONRPCNotification) and message.method == CANCELLED:
            request_id = (message.params or {}).get("requestId")
            if isinstance(request_id, int | str):
                self._in_flight.leave(call_key(request_id))

    async def aclose(self) -> None:
        await self._inner.aclose()

    def __aiter__(self) -> Requests:
        return self

    async def __anext__(self) -> SessionMessage | Exception:
        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class Answers:
    """The session's write stream: a response or error leaves `in_flight` once the SDK's writer
    has taken it (it writes and flushes what it took before it ends)."""

    def __init__(self, inner: WriteStream[SessionMessage], in_flight: InFlight) -> None:
        self._inner = inner
        self._in_flight = in_flight

    async def send(self, item: SessionMessage, /) -> None:
        message = item.message
        try:
            await self._inner.send(item)
        finally:  # sent, or the session is over: nobody is waiting for it any more
            if isinstance(message, JSONRPCResponse | JSONRPCError) and message.id is not None:
                self._in_flight.leave(call_key(message.id))

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
