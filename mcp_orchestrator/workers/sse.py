"""Server-sent events, parsed incrementally on the bytes of a response as they arrive.

Why here and not httpx2's EventSource: that one decodes text, then lines, then events, each
in its own async generator, which cost more per chunk than everything else a worker does
with it (see BENCHMARKS.md, backend overhead).
"""

from __future__ import annotations

from typing import NamedTuple

MAX_EVENT_BYTES = 1024 * 1024

BOM = b"\xef\xbb\xbf"
"""UTF-8 byte order mark: allowed at the start of an SSE stream, and not part of it."""


class SSEEvent(NamedTuple):
    """One server-sent event: its type (`message` unless the server named one) and data."""

    event: str
    data: str


class SSEFramingError(ValueError):
    """The stream broke the SSE framing rules we enforce (an event over the size bound)."""


class SSEDecoder:
    """Incremental SSE parser (the WHATWG rules) working on bytes as they arrive.

    Lines end with LF, CRLF or CR, also when split across reads; `data` lines of one
    event are joined with LF; comments, `id` and `retry` are ignored (nothing here uses
    them); an event without data is not dispatched; a last event without its blank line
    is dropped, as the spec says. Each event, including a line still being received, is
    bounded by `max_event_bytes`."""

    __slots__ = ("_data", "_event", "_max", "_parts", "_parts_size", "_size", "_skip_lf", "_started")

    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self._max = max_event_bytes
        self._parts: list[bytes] = []
        """The line being received (not ended yet), in pieces."""
        self._parts_size = 0
        self._skip_lf = False
        """The last read ended with CR: an LF opening the next one belongs to it."""
        self._started = False
        self._event = b""
        self._data: list[bytes] = []
        self._size = 0

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """The events completed by `chunk` (often none, sometimes several)."""
        if not self._started:
            if self._parts:
                chunk = b"".join(self._parts) + chunk
                self._parts.clear()
            if len(chunk) < len(BOM) and BOM.startswith(chunk):
                if chunk:
                    self._parts.append(chunk)  # maybe a byte order mark split across reads: wait
                return []
            self._started = True
            chunk = chunk.removeprefix(BOM)
        if self._skip_lf:
            self._skip_lf = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        if b"\r" in chunk:
            self._skip_lf = chunk[-1:] == b"\r"
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if b"\n" not in chunk:
            if chunk:
                self._parts.append(chunk)
                self._parts_size += len(chunk)
                self._check(self._parts_size)
            return []
        if self._parts:
            self._parts.append(chunk)
            chunk = b"".join(self._parts)
            self._parts.clear()
            self._parts_size = 0
        lines = chunk.split(b"\n")
        rest = lines.pop()
        events: list[SSEEvent] = []
        for line in lines:
            if line:
                self._line(line)
            elif self._data:
                data = self._data[0] if len(self._data) == 1 else b"\n".join(self._data)
                event = self._event.decode("utf-8", "replace") if self._event else "message"
                events.append(SSEEvent(event, data.decode("utf-8", "replace")))
                self._data = []
                self._event = b""
                self._size = 0
            else:
                self._event = b""
                self._size = 0
        if rest:
            self._parts.append(rest)
            self._parts_size = len(rest)
            self._check(len(rest))
        return events

    def _line(self, line: bytes) -> None:
        if line[:1] == b":":
            return  # a comment (keep-alive pings)
        self._size += len(line)
        self._check(0)
        name, _, value = line.partition(b":")
        if value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            self._data.append(value)
        elif name == b"event":
            self._event = value

    def _check(self, pending: int) -> None:
        if self._size + pending > self._max:
            raise SSEFramingError(f"a server-sent event exceeded the {self._max} byte limit")
