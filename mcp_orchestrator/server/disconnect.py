"""Cancel a request of a legacy (session) HTTP connection whose client closed its response stream.

Why: on a stateful streamable-HTTP session (protocol 2025-11-25 and earlier, what the SDK's
`initialize` handshake negotiates) the SDK hands each POSTed request to the session's own task
group and answers on that POST's SSE stream. When the client goes away mid-call the SDK only
stops writing to the stream: the tool call, and its backend call, run to completion for nobody
and count as completed. (The other ways a request can lose its caller already cancel it: the
2026 single-exchange POST and stateless mode run the call in the POST's own task, and a deleted
or expired session cancels its task group.)

How: the protocol's own way to stop a request is `notifications/cancelled`, which the SDK
applies by cancelling the handler. When a session POST carrying a request ends without the
final body of its response (ASGI `more_body: False`, sent only after the JSON-RPC answer), the
client disconnected, and this piece posts that notification into the same session, exactly as
the client could have, through the same ASGI app (so the same session, Host and token checks
apply, and the session's idle clock counts it like any request).

Safe because this server configures no event store: a client cannot resume a closed stream
(Last-Event-ID), so an answer nobody is reading can never be delivered.
"""

from __future__ import annotations

import json
import logging

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mcp_orchestrator.server.bodies import read_body, replaying
from mcp_orchestrator.server.messages import RequestId, is_request_id
from mcp_orchestrator.server.sessions import SESSION_HEADER, header, is_legacy

log = logging.getLogger(__name__)

CANCEL_TIMEOUT_S = 5.0
"""Bound on delivering the cancellation (it only queues a notification in the session)."""
REPLACED_HEADERS = frozenset({b"content-type", b"content-length", b"accept", b"transfer-encoding"})


class CancelOnDisconnect:
    """ASGI middleware on the MCP path (see the module docstring)."""

    def __init__(self, app: ASGIApp, path: str, limit: int) -> None:
        self.app = app
        self.path = path
        self.limit = limit
        """The body cap ([server] max_message_bytes): a larger body is refused before it is dispatched."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self._is_session_post(scope):
            await self.app(scope, receive, send)
            return
        entry_scope = dict(scope)  # before the router adds its keys
        head, body = await read_body(receive, self.limit)
        request_id = cancellable_id(body or b"")
        replay = replaying(head, receive)
        if request_id is None:
            await self.app(scope, replay, send)
            return
        answered = False

        async def watch(message: Message) -> None:
            nonlocal answered
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                answered = True
            await send(message)

        try:
            await self.app(scope, replay, watch)
        finally:
            if not answered:
                with anyio.move_on_after(CANCEL_TIMEOUT_S, shield=True):
                    await self._cancel(entry_scope, request_id)

    def _is_session_post(self, scope: Scope) -> bool:
        return (
            scope["type"] == "http"
            and scope["method"] == "POST"
            and scope["path"] == self.path
            and header(scope, SESSION_HEADER) is not None
            and is_legacy(scope)
        )

    async def _cancel(self, scope: Scope, request_id: RequestId) -> None:
        """Post `notifications/cancelled` for `request_id` into the session `scope` names."""
        notification = {
            "jsonrpc": "2.0",
            "method": "notifications/cancelled",
            "params": {"requestId": request_id, "reason": "the client closed the response stream"},
        }
        body = json.dumps(notification).encode()
        headers = [(key, value) for key, value in scope["headers"] if key.lower() not in REPLACED_HEADERS]
        headers += [
            (b"content-type", b"application/json"),
            (b"accept", b"application/json, text/event-stream"),
            (b"content-length", str(len(body)).encode()),
        ]
        status: int | None = None
        messages: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> Message:
            return messages.pop() if messages else {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]

        try:
            await self.app(dict(scope, headers=headers), receive, send)
        except Exception:  # the session manager is shutting down: its sessions end anyway
            log.debug("could not cancel request %r of a closed stream", request_id, exc_info=True)
            return
        log.debug("cancelled request %r of a closed stream: %s", request_id, status)


def cancellable_id(body: bytes) -> RequestId | None:
    """The id of the JSON-RPC request in `body`; None for notifications, responses, batches,
    `initialize` (it makes the session) and anything unparsable."""
    try:
        message = json.loads(body)
    except ValueError:
        return None
    if not isinstance(message, dict) or not isinstance(message.get("method"), str):
        return None
    request_id = message.get("id")
    if not is_request_id(request_id) or message["method"] == "initialize":
        return None
    return request_id
