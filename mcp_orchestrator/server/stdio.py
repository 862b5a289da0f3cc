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

import json
import logging
import os
import re
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Final, cast

import anyio
import anyio.to_thread
import mcp_types as types
from mcp.server.mcpserver import MCPServer
from mcp.server.stdio import stdio_server
from mcp.server.transport_security import DEFAULT_MAX_REQUEST_BODY_SIZE
from mcp.shared._stream_protocols import ReadStream, WriteStream
from mcp.shared.message import SessionMessage
from pydantic import ValidationError

if sys.platform != "win32":
    import fcntl

if TYPE_CHECKING:
    from mcp_orchestrator.server.draining import StdioEdge

log = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES: Final = DEFAULT_MAX_REQUEST_BODY_SIZE
"""4 MiB: the SDK's cap on an HTTP request body, so both transports take the same messages."""
MAX_NESTING: Final = 128
"""Deepest nesting of arrays and objects in a message (the message itself is level 1). The
SDK's JSON parser gives up near 200 levels; far below that, no tool argument needs more."""
READ_CHUNK_BYTES: Final = 64 * 1024

PARSE_ERROR: Final = types.PARSE_ERROR
INVALID_REQUEST: Final = types.INVALID_REQUEST
INVALID_PARAMS: Final = types.INVALID_PARAMS
TITLES: Final = {PARSE_ERROR: "Parse error", INVALID_REQUEST: "Invalid Request", INVALID_PARAMS: "Invalid params"}
TOO_DEEP: Final = f"nesting deeper than {MAX_NESTING} levels"

# A lone surrogate can only come from a \uD800-\uDFFF escape: the UTF-8 decoder turns encoded
# surrogates into U+FFFD. Lines without such an escape skip the walk that looks for them.
SURROGATE_ESCAPE: Final = re.compile(r"\\u[dD][89a-fA-F]")
LONE_SURROGATE: Final = re.compile("[\ud800-\udfff]")

RequestId = int | str


# ---------------------------------------------------------------------------- checking one line


@dataclass(frozen=True)
class Rejection:
    """Why a line is not handed to the SDK, and the error that answers it."""

    code: int
    reason: str
    id: RequestId | None = None
    answered: bool = True
    """False for a bad response from the client: JSON-RPC never answers a response."""

    @property
    def message(self) -> str:
        """The standard title of the code, then what is wrong."""
        return f"{TITLES.get(self.code, 'Error')}: {self.reason}"

    def answer(self) -> types.JSONRPCError:
        error = types.ErrorData(code=self.code, message=self.message)
        return types.JSONRPCError(jsonrpc="2.0", id=self.id, error=error)


def check(line: str) -> Rejection | None:
    """None when `line` is a JSON-RPC message the SDK accepts; otherwise how to answer it."""
    try:
        message = json.loads(line)
    except RecursionError:  # deeper than Python's own parser goes: no id can be read
        return Rejection(INVALID_REQUEST, TOO_DEEP)
    except ValueError as exc:
        return Rejection(PARSE_ERROR, f"not valid JSON ({exc})")
    if not isinstance(message, dict):
        return Rejection(INVALID_REQUEST, _not_an_object(message))
    if "method" not in message and ("result" in message or "error" in message):
        return _check_response(line)
    return _check_request(line, message)


def _check_request(line: str, message: dict[str, Any]) -> Rejection | None:
    if "id" in message:
        problem = _id_problem(message["id"])
        if problem is not None:
            return Rejection(INVALID_REQUEST, problem)  # id null: the id itself is what is wrong
    answer_id: RequestId | None = message.get("id")
    found = _envelope_problem(message) or _structure_problem(line, message) or _sdk_problem(line)
    return None if found is None else Rejection(found[0], found[1], answer_id)


def _check_response(line: str) -> Rejection | None:
    problem = _sdk_problem(line)
    return None if problem is None else Rejection(problem[0], f"invalid response dropped: {problem[1]}", answered=False)


def _not_an_object(message: object) -> str:
    if isinstance(message, list):
        return "batches (JSON arrays) are not supported: send one message per line"
    return f"a message must be a JSON object, got {_json_type(message)}"


def _id_problem(value: object) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | str):
        return f'"id" must be a string or an integer, got {_json_type(value)}'
    if isinstance(value, str) and LONE_SURROGATE.search(value):
        return '"id" holds a lone surrogate (\\ud800-\\udfff): strings must be valid Unicode'
    return None


def _envelope_problem(message: dict[str, Any]) -> tuple[int, str] | None:
    """What JSON-RPC 2.0 requires of a request or notification, apart from its id."""
    if "jsonrpc" not in message:
        return INVALID_REQUEST, '"jsonrpc" is missing; it must be "2.0"'
    if message["jsonrpc"] != "2.0":
        return INVALID_REQUEST, f'"jsonrpc" must be "2.0", got {_shown(message["jsonrpc"])}'
    if "method" not in message:
        return INVALID_REQUEST, '"method" is missing'
    if not isinstance(message["method"], str):
        return INVALID_REQUEST, f'"method" must be a string, got {_json_type(message["method"])}'
    params = message.get("params")
    if params is not None and not isinstance(params, dict):  # MCP takes named params only
        return INVALID_PARAMS, f'"params" must be an object, got {_json_type(params)}'
    return None


def _structure_problem(line: str, message: dict[str, Any]) -> tuple[int, str] | None:
    """Nesting deeper than MAX_NESTING, or a lone surrogate in any string or key."""
    # Cheap tests on the text first: brackets inside strings only make the count larger.
    may_be_deep = line.count("[") + line.count("{") > MAX_NESTING
    if not may_be_deep and SURROGATE_ESCAPE.search(line) is None:
        return None
    stack: list[tuple[object, int, str]] = [(message, 1, "")]
    while stack:
        value, depth, path = stack.pop()
        if isinstance(value, str):
            if LONE_SURROGATE.search(value):
                return _surrogate_at(path)
            continue
        if not isinstance(value, dict | list):
            continue
        if depth > MAX_NESTING:
            return INVALID_REQUEST, TOO_DEEP
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            where = f"{path}.{_printable(key)}" if path else _printable(key)
            if isinstance(key, str) and LONE_SURROGATE.search(key):
                return _surrogate_at(where)
            stack.append((item, depth + 1, where))
    return None


def _surrogate_at(path: str) -> tuple[int, str]:
    code = INVALID_PARAMS if path == "params" or path.startswith("params.") else INVALID_REQUEST
    return code, f"lone surrogate (\\ud800-\\udfff) in {path}: strings must be valid Unicode"


def _sdk_problem(line: str) -> tuple[int, str] | None:
    """The SDK's own parse of the line, so that nothing it would drop is handed to it."""
    try:
        types.jsonrpc_message_adapter.validate_json(line, by_name=False)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(part) for part in first["loc"])
        return INVALID_REQUEST, f"not a valid JSON-RPC message ({where}: {first['msg']})"
    return None


def _json_type(value: object) -> str:
    match value:
        case None:
            return "null"
        case bool():
            return "a boolean"
        case int() | float():
            return "a number"
        case str():
            return "a string"
        case list():
            return "an array"
        case _:
            return "an object"


def _shown(value: object) -> str:
    """A short, printable rendering of a client's value for a message or a log line: strings and
    integers as they are (JSON-escaped), anything else by its type."""
    verbatim = isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))
    text = json.dumps(value) if verbatim else _json_type(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _printable(key: object) -> str:
    text = str(key).encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= 40 else text[:37] + "..."


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
        shown_id = "null" if rejection.id is None else _shown(rejection.id)
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
