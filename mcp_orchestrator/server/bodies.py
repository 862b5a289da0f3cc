"""Reading an HTTP request's body in ASGI middleware and handing it on unchanged.

Two guards in front of the MCP endpoint need the body before the SDK does (messages are
checked as JSON-RPC in http.py; disconnect.py needs the request's id). Each reads it with
`read_body`, bounded, and gives the app behind a `receive` that replays the same messages and
then the client's own (so a disconnect still reaches whoever watches for it).
"""

from __future__ import annotations

from starlette.types import Message, Receive


async def read_body(receive: Receive, limit: int) -> tuple[list[Message], bytes | None]:
    """The messages read, and the body: None when it passed `limit` bytes (reading stopped
    there) or the client went away before it ended."""
    messages: list[Message] = []
    body = b""
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            return messages, None
        body += message.get("body", b"")
        if len(body) > limit:
            return messages, None
        if not message.get("more_body", False):
            return messages, body


def replaying(messages: list[Message], receive: Receive) -> Receive:
    """`receive` that first hands out `messages` again, then the client's own."""
    pending = list(messages)

    async def replay() -> Message:
        return pending.pop(0) if pending else await receive()

    return replay
