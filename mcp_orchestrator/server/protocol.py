"""The HTTP/1.1 protocol the server runs: uvicorn's h11 protocol with two additions.

- **A response's head goes out with its body.** uvicorn writes the status line and headers
  the moment the app starts its response, and the body in a second write. The client wakes
  for the head, finds no body, and sleeps again; on a small machine the server may lose its
  core to it in between. Here a head is held until the next write (the body, in the same
  task step for every JSON answer) or the end of the event loop's turn, whichever is first,
  and both go out in one write: one wake-up and one syscall fewer per call.
- **A request can hear that its client left without a task waiting for it.** ASGI's only
  signal is an `http.disconnect` from `receive()`, which something must be awaiting; that
  is a task per request. This protocol puts a `ClientGone` in each request's scope
  (`client_gone(scope)`) and runs its callbacks when the connection drops before the
  response is complete. quiet_calls.py cancels an abandoned call with it.

Both are plain overrides of uvicorn's public protocol class, passed to `uvicorn.Config(http=...)`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, cast

from starlette.types import Scope
from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT
from uvicorn.protocols.http.h11_impl import H11Protocol

CLIENT_GONE = "mcp_orchestrator.client_gone"
"""The key of a request's ClientGone in `scope["extensions"]`."""
READ_AHEAD_LIMIT = HIGH_WATER_LIMIT
"""Bytes of a request body the protocol buffers before it stops reading the connection until
the app asks for more: after a larger body, a closed connection goes unseen until then."""


class ClientGone:
    """Callbacks to run when a request's client goes away before its response is complete."""

    def __init__(self) -> None:
        self._callbacks: list[Callable[[], None]] = []
        self.gone = False

    def add(self, callback: Callable[[], None]) -> None:
        """Run `callback` when the client goes; at once if it already has."""
        if self.gone:
            callback()
        else:
            self._callbacks.append(callback)

    def discard(self, callback: Callable[[], None]) -> None:
        if callback in self._callbacks:
            self._callbacks.remove(callback)

    def fire(self) -> None:
        self.gone = True
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()


def client_gone(scope: Scope) -> ClientGone | None:
    """The request's ClientGone, or None when the server running the app does not provide one
    (another ASGI server, an in-process test transport): then nothing will call it."""
    found = scope.get("extensions", {}).get(CLIENT_GONE)
    return found if isinstance(found, ClientGone) else None


class HeadWithBody(asyncio.Transport):
    """A transport that sends a response's head together with what is written next.

    A write that is exactly a response head (status line to the blank line) is held; the next
    write sends both, and a held head left alone is sent when the event loop's current turn
    ends, so nothing waits longer than that. Closing sends it first; aborting drops it."""

    def __init__(self, transport: asyncio.Transport) -> None:
        super().__init__()
        self._transport = transport
        self._held: bytes | None = None
        self._loop = asyncio.get_running_loop()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        held = self._held
        if held is not None:
            self._held = None
            self._transport.write(held + bytes(data))
        elif _is_response_head(data):
            self._held = bytes(data)
            self._loop.call_soon(self._flush)
        else:
            self._transport.write(data)

    def _flush(self) -> None:
        held = self._held
        if held is not None:
            self._held = None
            self._transport.write(held)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def abort(self) -> None:
        self._held = None
        self._transport.abort()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._transport.get_protocol()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + len(self._held or b"")

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def write_eof(self) -> None:
        self._flush()
        self._transport.write_eof()


def _is_response_head(data: bytes | bytearray | memoryview) -> bool:
    # h11 writes a head in one piece, nothing before or after it. A body that happens to look
    # like one is only held until the end of the loop's turn.
    return bytes(data[:7]) == b"HTTP/1." and bytes(data[-4:]) == b"\r\n\r\n"


class OrchestratorH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, with heads sent with their bodies and a ClientGone per request."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP transport has asyncio.Transport's methods without being its subclass.
        super().connection_made(HeadWithBody(cast("asyncio.Transport", transport)))

    def handle_events(self) -> None:
        before = self.cycle
        super().handle_events()
        cycle = self.cycle
        if cycle is not None and cycle is not before:  # a request began: give its scope a ClientGone
            scope: dict[str, Any] = cycle.scope  # type: ignore[assignment]
            scope.setdefault("extensions", {})[CLIENT_GONE] = ClientGone()

    def connection_lost(self, exc: Exception | None) -> None:
        cycle = self.cycle
        super().connection_lost(exc)  # marks the request disconnected first: its app may now end quietly
        if cycle is not None and not cycle.response_complete:
            gone = client_gone(cycle.scope)  # type: ignore[arg-type]
            if gone is not None:
                gone.fire()
