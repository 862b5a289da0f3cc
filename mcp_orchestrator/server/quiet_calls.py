"""Quiet calls: a 2026-07-28 request that asked for no progress is answered without tasks.

For every request of protocol 2026-07-28, the SDK's streaming mode starts a task group with
two tasks (the handler, and a watcher that cancels it when the client leaves) and a stream
between them, so it can switch the response to SSE when a notification comes or 15 s pass.
Measured at one call at a time, that machinery was about 0.3 ms of each call (BENCHMARKS.md).
A request without a progress token in its `_meta` can receive no notification from this
server (progress is the only one its tools send), so for those:

- the SDK answers in its JSON mode, in the request's own task: the same `application/json`
  answer its streaming mode sends for a call that emitted nothing;
- the client leaving cancels the call through the HTTP protocol's ClientGone (protocol.py),
  so an abandoned call still stops its backend call, with no task waiting on `receive()`;
- a call still running after KEEPALIVE_S switches its response to SSE and sends a comment
  every KEEPALIVE_S, as the SDK's streaming mode does, so a proxy's idle timeout does not
  cut a long call; the answer then comes as the stream's one `message` event. Only such a
  call starts a task.

What a client sees is what the SDK's streaming mode would send it, apart from how long it
takes; in particular the SDK's own checks still answer first (a client that does not accept
`text/event-stream` gets its 406, as before). The SDK reads its `json_response` setting per
request (`handle_modern_request`); it is given a truth value that is true only inside a
request this middleware marked (a ContextVar, so concurrent requests never see each other's,
dropped at the call's first send). The SDK's own path, unchanged, serves everything else:
2025 (session) requests, calls with a progress token, notifications, `subscriptions/listen`,
a client that does not accept SSE, a body over the protocol's read-ahead limit, and every
request under a server without ClientGone.
"""

from __future__ import annotations

import asyncio
import json
from contextvars import ContextVar

import anyio
from mcp.server.streamable_http import check_accept_headers
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mcp_orchestrator.server.bodies import read_body, replaying
from mcp_orchestrator.server.protocol import READ_AHEAD_LIMIT, ClientGone, client_gone
from mcp_orchestrator.server.sessions import is_legacy

KEEPALIVE_S = 15.0
"""A quiet call running this long switches to SSE and sends a comment this often (the SDK's interval)."""
SSE_HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache, no-transform"),
    (b"connection", b"keep-alive"),
    (b"x-accel-buffering", b"no"),
]
PING = b": ping\r\n\r\n"
STREAMED_METHODS = frozenset({"subscriptions/listen"})
"""Requests whose answer is a stream by nature: never quiet."""

_ANSWER_AS_JSON: ContextVar[bool] = ContextVar("mcp_orchestrator_answer_as_json", default=False)


class PerRequestJsonResponse:
    """The SDK session manager's `json_response` setting, true only inside a quiet call."""

    def __bool__(self) -> bool:
        return _ANSWER_AS_JSON.get()


def answer_quiet_calls_as_json(manager: StreamableHTTPSessionManager) -> None:
    """Let `manager` answer the calls QuietCalls marks in JSON mode (all others as configured: streaming)."""
    manager.json_response = PerRequestJsonResponse()  # type: ignore[assignment]  # read for its truth per request


def is_quiet(body: bytes) -> bool:
    """A single JSON-RPC request (not a notification) that asked for no progress and whose
    answer is not a stream by nature."""
    try:
        message = json.loads(body)
    except ValueError:
        return False
    if not isinstance(message, dict) or "id" not in message or message.get("method") in STREAMED_METHODS:
        return False
    params = message.get("params")
    meta = params.get("_meta") if isinstance(params, dict) else None
    return not (isinstance(meta, dict) and meta.get("progressToken") is not None)


class QuietCalls:
    """ASGI middleware right in front of the SDK's app (see the module docstring)."""

    def __init__(self, app: ASGIApp, path: str, limit: int, keepalive_s: float | None = None) -> None:
        self.app = app
        self.path = path
        self.limit = limit
        self.keepalive_s = KEEPALIVE_S if keepalive_s is None else keepalive_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gone = client_gone(scope) if scope["type"] == "http" else None
        if gone is None or scope["method"] != "POST" or scope["path"] != self.path or is_legacy(scope):
            await self.app(scope, receive, send)
            return
        read, body = await read_body(receive, self.limit)
        replay = replaying(read, receive)
        # A body over uvicorn's read-ahead limit leaves reading paused until someone calls
        # receive() again, and then the client's leaving would go unseen: the SDK's path then.
        # A client that does not accept SSE gets the SDK's 406 there, as it always did.
        quiet = body is not None and len(body) <= READ_AHEAD_LIMIT and is_quiet(body)
        if not quiet or not check_accept_headers(Request(scope))[1]:
            await self.app(scope, replay, send)
            return
        await self._answer(scope, replay, send, gone)

    async def _answer(self, scope: Scope, receive: Receive, send: Send, gone: ClientGone) -> None:
        response = KeptAlive(send, self.keepalive_s)
        loop = asyncio.get_running_loop()
        token = _ANSWER_AS_JSON.set(True)
        try:
            async with anyio.create_task_group() as tg:
                leave = tg.cancel_scope.cancel
                gone.add(leave)
                # A timer, not a task: only a call that outlasts it starts one.
                timer = loop.call_later(self.keepalive_s, tg.start_soon, response.keep_alive)
                try:
                    await self.app(scope, receive, response.send)
                finally:
                    timer.cancel()
                    gone.discard(leave)
                    tg.cancel_scope.cancel()  # a keep-alive started meanwhile ends with the call
        finally:
            _ANSWER_AS_JSON.reset(token)


class KeptAlive:
    """A quiet call's `send`: passes the SDK's JSON answer through, unless the call ran long
    enough for `keep_alive` to have switched the response to SSE; then the answer's body is
    sent as the stream's `message` event."""

    def __init__(self, send: Send, interval_s: float) -> None:
        self._send = send
        self._interval_s = interval_s
        self._lock: anyio.Lock | None = None
        """Set once `keep_alive` runs: from then on the two send in turn."""
        self.started = False
        """The app began its response (before any keep-alive: nothing to switch)."""
        self.finished = False
        """The response is complete: no comment may follow it."""
        self.streaming = False
        """keep_alive sent the head of an SSE stream; the app's own head is dropped."""
        self._status = 200
        self._answer = b""

    async def send(self, message: Message) -> None:
        # The SDK read the mode long before it answers. Drop it now: uvicorn starts a pipelined
        # next request, or resumes reading, from inside this send, and either copies our context.
        _ANSWER_AS_JSON.set(False)
        if self._lock is None:
            self._passed(message)
            await self._send(message)
            return
        async with self._lock:
            if self.streaming:
                await self._streamed(message)
            else:
                self._passed(message)
                await self._send(message)

    def _passed(self, message: Message) -> None:
        self.started = True
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            self.finished = True

    async def _streamed(self, message: Message) -> None:
        """The app's response after the stream's head went out: its body becomes one event."""
        if message["type"] == "http.response.start":
            self._status = message["status"]
            return
        self._answer += message.get("body", b"")
        if message.get("more_body", False):
            return
        self.finished = True
        # A server error (500) carries no JSON-RPC answer: the stream ends without one (the SDK's
        # client then reports a stream that ended without a response, as for a cut stream).
        data = self._answer.decode("utf-8", "replace")
        event = f"event: message\r\ndata: {data}\r\n\r\n".encode() if self._status < 500 else b""
        await self._send({"type": "http.response.body", "body": event, "more_body": False})

    async def keep_alive(self) -> None:
        """Switch to SSE and send a comment every interval until the answer is sent (or cancelled)."""
        _ANSWER_AS_JSON.set(False)  # nothing this task starts is a quiet call
        lock = self._lock = anyio.Lock()
        async with lock:
            if self.started:
                return
            await self._send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
            self.streaming = True
        while True:
            async with lock:
                if self.finished:
                    return
                await self._send({"type": "http.response.body", "body": PING, "more_body": True})
            await anyio.sleep(self._interval_s)
