"""The stdio transport with a guard in front of the SDK's reader: every line is checked first.

Why: the SDK's stdio reader (`mcp.server.stdio`) reads each line whole, however long, and a
line that is not a valid JSON-RPC message only reaches the server as an exception it logs at
debug level. A caller whose request had a wrong "jsonrpc", an id of the wrong type, params
that are not an object or a lone surrogate waited forever, and a 200 MB line without a newline
was held in memory. The SDK offers no hook for either, so stdin is read here instead:

- in chunks, holding at most `max_message_bytes` of one line: a longer line is answered as
  soon as it passes the cap and the rest of it is read and dropped up to its newline;
- each line is checked as JSON-RPC 2.0 (with MCP's rule that an id is a string or an integer)
  and a bad one is answered with the error JSON-RPC gives for it (-32700 parse error, -32600
  invalid request, -32602 invalid params), with the message's id when it has a usable one and
  null otherwise, and logged as a warning;
- only lines the SDK will accept are handed to it. The SDK still owns stdout (its writer, its
  diversion of fd 1 to stderr) and the session, so our answers go out through its writer.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from functools import partial
from typing import TYPE_CHECKING, Final, cast

import anyio
import anyio.to_thread
from mcp.server.mcpserver import MCPServer
from mcp.server.stdio import stdio_server
from mcp.server.transport_security import DEFAULT_MAX_REQUEST_BODY_SIZE
from mcp.shared._stream_protocols import ReadStream, WriteStream
from mcp.shared.message import SessionMessage

from mcp_orchestrator.server.messages import INVALID_REQUEST, Rejection, check, shown

if sys.platform != "win32":
    import fcntl

if TYPE_CHECKING:
    from mcp_orchestrator.server.draining import StdioEdge

log = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES: Final = DEFAULT_MAX_REQUEST_BODY_SIZE
"""4 MiB: the SDK's cap on an HTTP request body, so both transports take the same messages."""
READ_CHUNK_BYTES: Final = 64 * 1024


# ---------------------------------------------------------------------------- reading stdin


async def bounded_lines(read_chunk: Callable[[], Awaitable[bytes]], limit: int) -> AsyncIterator[bytes | None]:
    """Each line of the stream without its newline, or None for a line longer than `limit` bytes.

    None comes as soon as a line passes the limit; the rest of that line is read and dropped
    up to its newline, so at most `limit` bytes of it are ever held. A last line without a
    newline counts as a line."""
    parts: list[bytes] = []
    size = 0
    dropping = False
    while chunk := await read_chunk():
        start = 0
        while (end := chunk.find(b"\n", start)) != -1:
            if not dropping:
                piece = chunk[start:end]
                yield None if size + len(piece) > limit else b"".join([*parts, piece])
            parts, size, dropping = [], 0, False
            start = end + 1
        if dropping or start == len(chunk):
            continue
        size += len(chunk) - start
        if size > limit:
            parts, dropping = [], True
            yield None
        else:
            parts.append(chunk[start:])
    if parts and not dropping:
        yield b"".join(parts)


class GuardedLines:
    """What the SDK's stdio reader iterates instead of stdin: only the lines it will accept.

    Every other line is answered here, through the SDK's own write stream (`answer_on`)."""

    def __init__(self, read_chunk: Callable[[], Awaitable[bytes]], limit: int) -> None:
        self._read_chunk = read_chunk
        self._limit = limit
        self._answers: WriteStream[SessionMessage] | None = None
        self._ready = anyio.Event()

    def answer_on(self, answers: WriteStream[SessionMessage]) -> None:
        self._answers = answers
        self._ready.set()

    def __aiter__(self) -> AsyncIterator[str]:
        return self._valid_lines()

    async def _valid_lines(self) -> AsyncIterator[str]:
        async for line in bounded_lines(self._read_chunk, self._limit):
            if line is None:
                reason = f"message larger than {self._limit} bytes ([server] max_message_bytes); discarded unparsed"
                await self._reject(Rejection(INVALID_REQUEST, reason))
                continue
            text = line.decode("utf-8", errors="replace")  # as the SDK's reader decodes
            if not text.strip():
                continue  # a blank line is no message: nothing to answer
            rejection = check(text)
            if rejection is None:
                yield text
            else:
                await self._reject(rejection)

    async def _reject(self, rejection: Rejection) -> None:
        shown_id = "null" if rejection.id is None else shown(rejection.id)
        if not rejection.answered:
            log.warning("dropped a message from the client (id %s): %s", shown_id, rejection.message)
            return
        log.warning("answered a message with error %d (id %s): %s", rejection.code, shown_id, rejection.message)
        # Set right after the SDK's transport starts, before its reader can ask for a line.
        await self._ready.wait()
        assert self._answers is not None
        try:
            # No timeout, as for every other answer: a client not reading stdout stops us
            # reading stdin, which is the back-pressure it asked for.
            await self._answers.send(SessionMessage(rejection.answer()))
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            log.debug("stdio: the session ended before a rejection could be answered")


# ---------------------------------------------------------------------------- the transport


def _divert_stdin() -> int | None:
    """A private descriptor for the wire, with fd 0 pointed at the null device (as the SDK
    does when it reads stdin itself): nothing else in the process, nor a child it starts, can
    take bytes meant for the session. None where that cannot be done: fd 0 is read in place."""
    if sys.platform == "win32":
        return None  # the SDK rebinds Windows std handles too; reading in place is enough here
    try:
        wire = fcntl.fcntl(0, fcntl.F_DUPFD_CLOEXEC, 3)
    except OSError:
        return None
    try:
        null = os.open(os.devnull, os.O_RDONLY)
        try:
            os.dup2(null, 0)
        finally:
            os.close(null)
    except OSError:
        os.close(wire)
        return None
    return wire


@contextmanager
def _stdin_wire() -> Iterator[int]:
    wire = _divert_stdin()
    try:
        yield 0 if wire is None else wire
    finally:
        if wire is not None:  # never closed: an abandoned reader thread may still block on it
            with suppress(OSError):
                os.dup2(wire, 0)


@asynccontextmanager
async def guarded_stdio(
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, edge: StdioEdge | None = None
) -> AsyncIterator[tuple[ReadStream[SessionMessage | Exception], WriteStream[SessionMessage]]]:
    """The SDK's `stdio_server()` streams, fed only with checked lines read from fd 0. With a
    shutdown `edge` (server/draining.py), stdin ends once the server is drained, and the
    streams count the requests not yet answered."""
    with _stdin_wire() as fd:
        # abandon_on_cancel: a read blocked on a silent client must not hold up shutdown.
        read_chunk: Callable[[], Awaitable[bytes]]
        read_chunk = partial(anyio.to_thread.run_sync, os.read, fd, READ_CHUNK_BYTES, abandon_on_cancel=True)
        if edge is not None:
            read_chunk = edge.reader(fd, READ_CHUNK_BYTES)
        lines = GuardedLines(read_chunk, max_message_bytes)
        # The SDK's reader only iterates its `stdin` (`async for line in stdin`).
        async with stdio_server(stdin=cast("anyio.AsyncFile[str]", lines)) as (read_stream, write_stream):
            lines.answer_on(write_stream)
            yield (read_stream, write_stream) if edge is None else edge.streams(read_stream, write_stream)


async def serve_stdio(
    server: MCPServer, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, edge: StdioEdge | None = None
) -> None:
    """`server.run_stdio_async()`, with the guarded reader in front of the SDK's."""
    # MCPServer has no public "serve these streams"; mcp.Client reaches the same attribute.
    lowlevel = server._lowlevel_server
    async with guarded_stdio(max_message_bytes, edge) as (read_stream, write_stream):
        await lowlevel.run(read_stream, write_stream, lowlevel.create_initialization_options())
