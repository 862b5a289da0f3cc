"""A small HTTP server that speaks the model server's wire format and misbehaves on command.

It runs in a background thread. What it does is chosen by the start of the URL path,
so every test (and every pool replica) gets its own behaviour without shared state:

    /proxy/<label>/...            relay to the real llama-server, byte for byte (a recording proxy)
    /hold/<label>/...             like proxy, but wait until `release(label)` first
    /flaky/<label>/<n>/...        the first n requests answer 503, then relay
    /disconnect/<label>/<n>/...   the first n requests get the connection closed without an answer, then relay
    /status/<code>/...            an error answer in the backend's error format; options:
        .../retry-after/<s>/...         with `Retry-After: <s>`
        .../retry-after-date/<s>/...    with `Retry-After: <HTTP date s seconds from now>`
    /reset/<n>/...                relay the first n SSE events of the real answer, then reset the connection
    /stall/<n>/...                relay n events, then send nothing more (the client's read timeout must fire)
    /truncate/<n>/...             relay n events, then end the response cleanly (no terminating event)
    /malformed/<n>/...            relay n events, then one whose data is not JSON
    /event-error/<n>/...          relay n events, then the backend's in-stream error event
    /html/...                     a 200 answer that is an HTML page, not an SSE stream

followed by the API path the worker uses (/v1/chat/completions, /chat/completions,
/v1/messages, /v1/models, /models, /health). Relayed answers are the real server's own
bytes; the synthetic error answers copy its header set and error body shape
(tests/test_workers_faults.py compares them with the real server's).
Every request is recorded (label, scenario, API path, headers, JSON body).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http import HTTPStatus
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.support_llama import LlamaServer

API_PATHS = ("/v1/chat/completions", "/chat/completions", "/v1/messages", "/v1/models", "/models", "/health")
HEAD_LIMIT = 64 * 1024
IO_TIMEOUT_S = 30.0
"""Upper bound on any single read of the fault server itself, so a test bug cannot hang it."""


@dataclass(frozen=True)
class Recorded:
    scenario: tuple[str, ...]
    api_path: str
    headers: dict[str, str]
    body: Any

    @property
    def label(self) -> str:
        return self.scenario[1] if len(self.scenario) > 1 else ""


@dataclass
class _Incoming:
    method: str
    scenario: tuple[str, ...]
    api_path: str
    headers: dict[str, str]
    body: bytes


class FaultServer:
    def __init__(self, upstream: str | None = None) -> None:
        self.upstream = upstream
        """http://127.0.0.1:PORT of the real llama-server, for the relaying scenarios."""
        self.requests: list[Recorded] = []
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._gates: dict[str, asyncio.Event] = {}
        self._flaky: dict[str, int] = {}
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fault-server", daemon=True)

    # ------------------------------------------------------------------ control (test thread)

    def start(self) -> FaultServer:
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("the fault server did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, *scenario: str | int) -> str:
        """Base URL for a llama_cpp / vllm / anthropic worker; add '/v1' for open_ai."""
        return f"{self.root}/{'/'.join(str(s) for s in scenario)}"

    def release(self, label: str) -> None:
        """Let the requests held at /hold/<label>/ (and later ones) through."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(lambda: self._gate(label).set())

    def recorded(self, label: str | None = None, api_path: str | None = None) -> list[Recorded]:
        return [
            r
            for r in list(self.requests)
            if (label is None or r.label == label) and (api_path is None or r.api_path == api_path)
        ]

    def count(self, label: str, api_suffix: str = "completions") -> int:
        """Generation requests (not health checks) that reached /<scenario>/<label>/."""
        return sum(1 for r in self.recorded(label) if r.api_path.endswith(api_suffix) or r.api_path == "/v1/messages")

    # ------------------------------------------------------------------ the server (its own thread)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0, limit=HEAD_LIMIT)
        self.port = server.sockets[0].getsockname()[1]
        self._started.set()
        await self._stop.wait()
        server.close()  # asyncio.run cancels handlers still running (stalled streams)

    def _gate(self, label: str) -> asyncio.Event:
        return self._gates.setdefault(label, asyncio.Event())

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            incoming = await asyncio.wait_for(_read_request(reader), IO_TIMEOUT_S)
            if incoming is None:
                return
            self.requests.append(
                Recorded(incoming.scenario, incoming.api_path, incoming.headers, _json_or_raw(incoming.body))
            )
            await self._respond(incoming, writer)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        except asyncio.CancelledError:
            return  # the server is stopping (a stalled stream was still open)
        finally:
            if not writer.transport.is_closing():
                writer.close()

    async def _respond(self, incoming: _Incoming, writer: asyncio.StreamWriter) -> None:
        name, *args = incoming.scenario or ("",)
        if name == "status":
            await _write_error(writer, incoming, int(args[0]), _options(args[1:]))
        elif name == "html":
            await _write_raw(writer, 200, "text/html", b"<html><body>captive portal</body></html>")
        elif name in ("proxy", "hold", "flaky", "disconnect"):
            if name == "hold":
                await self._gate(args[0]).wait()
            if name in ("flaky", "disconnect"):
                seen = self._flaky.get(args[0], 0)
                self._flaky[args[0]] = seen + 1
                if seen < int(args[1]) and name == "flaky":
                    await _write_error(writer, incoming, 503, {})
                    return
                if seen < int(args[1]):
                    writer.close()  # what a server closing a kept-alive connection looks like
                    return
            await self._relay(incoming, writer, _pass_through)
        elif name in ("reset", "stall", "truncate", "malformed", "event-error"):
            await self._relay(incoming, writer, _cut_after(name, int(args[0]), incoming.api_path))
        else:
            await _write_error(writer, incoming, 404, {})

    async def _relay(self, incoming: _Incoming, writer: asyncio.StreamWriter, policy: _Policy) -> None:
        """Send the request to the real server and pass its answer on, event by event,
        through `policy` (which may stop, corrupt or cut the stream)."""
        assert self.upstream is not None, "this scenario needs the real server (FaultServer(upstream=...))"
        up_reader, up_writer, head = await _forward_upstream(self.upstream, incoming)
        try:
            writer.write(_close_after(head))
            if b"transfer-encoding: chunked" not in head.lower():
                writer.write(await asyncio.wait_for(up_reader.read(), IO_TIMEOUT_S))
                await writer.drain()
                return
            splitter = _EventSplitter()
            index = 0
            async for data in _dechunk(up_reader):
                for event in splitter.feed(data):
                    action = policy(index, event)
                    index += 1
                    if action is None:
                        writer.write(_chunk(event))
                        await writer.drain()
                        continue
                    await action(writer)
                    return
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        finally:
            up_writer.close()


async def _forward_upstream(
    upstream_url: str, incoming: _Incoming
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """Send `incoming` to the real server; its reader, writer (the caller closes it) and response head."""
    upstream = urlsplit(upstream_url)
    reader, writer = await asyncio.open_connection(upstream.hostname, upstream.port, limit=HEAD_LIMIT)
    try:
        writer.write(_request_bytes(incoming, f"{upstream.hostname}:{upstream.port}"))
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IO_TIMEOUT_S)
    except BaseException:
        writer.close()
        raise
    return reader, writer, head


# ------------------------------------------------------------------ stream policies

_Action = Callable[[asyncio.StreamWriter], Any]
_Policy = Callable[[int, bytes], "_Action | None"]


def _pass_through(index: int, event: bytes) -> _Action | None:
    return None


def _cut_after(name: str, keep: int, api_path: str) -> _Policy:
    anthropic = api_path == "/v1/messages"

    def policy(index: int, event: bytes) -> _Action | None:
        if index < keep:
            return None
        if name == "reset":
            return _reset
        if name == "stall":
            return _stall
        if name == "truncate":
            return _end
        if name == "malformed":
            bad = b'event: content_block_delta\ndata: {"type": "content_block_delta", "delta\n\n'
            return _then_end(bad if anthropic else b'data: {"choices": [{"delta": {"content": "unterminated\n\n')
        error = (
            b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}\n\n'
            if anthropic
            else b'data: {"error":{"code":500,"message":"slot crashed","type":"server_error"}}\n\n'
        )
        return _then_end(error)

    return policy


async def _reset(writer: asyncio.StreamWriter) -> None:
    """Drop the connection with a TCP reset (SO_LINGER 0), as a crashed server or proxy would."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _stall(writer: asyncio.StreamWriter) -> None:
    await asyncio.sleep(3600)  # cancelled when the client hangs up... or when the server stops


async def _end(writer: asyncio.StreamWriter) -> None:
    writer.write(b"0\r\n\r\n")
    await writer.drain()


def _then_end(event: bytes) -> _Action:
    async def action(writer: asyncio.StreamWriter) -> None:
        writer.write(_chunk(event))
        await _end(writer)

    return action


# ------------------------------------------------------------------ HTTP/1.1 plumbing


async def _read_request(reader: asyncio.StreamReader) -> _Incoming | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            key, value = line.split(":", 1)
            headers[key.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    path = urlsplit(target).path
    api_path = next((p for p in API_PATHS if path.endswith(p)), path)
    scenario = tuple(part for part in path[: len(path) - len(api_path)].split("/") if part)
    return _Incoming(method, scenario, api_path, headers, body)


def _request_bytes(incoming: _Incoming, host: str) -> bytes:
    skip = {"host", "connection", "keep-alive", "content-length"}
    lines = [f"{incoming.method} {incoming.api_path} HTTP/1.1", f"Host: {host}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in incoming.headers.items() if k not in skip]
    lines.append(f"Content-Length: {len(incoming.body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + incoming.body


def _close_after(head: bytes) -> bytes:
    """The real server's response head, saying the connection closes after this answer."""
    lines = [
        line for line in head.split(b"\r\n") if line and not line.lower().startswith((b"keep-alive:", b"connection:"))
    ]
    return b"\r\n".join([*lines, b"Connection: close"]) + b"\r\n\r\n"


async def _dechunk(reader: asyncio.StreamReader) -> Any:
    """The payload pieces of a chunked body, as they arrive."""
    while True:
        size_line = await asyncio.wait_for(reader.readuntil(b"\r\n"), IO_TIMEOUT_S)
        size = int(size_line.split(b";")[0].strip(), 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return
        data = await asyncio.wait_for(reader.readexactly(size), IO_TIMEOUT_S)
        await reader.readexactly(2)
        yield data


def _chunk(data: bytes) -> bytes:
    return f"{len(data):X}\r\n".encode() + data + b"\r\n"


class _EventSplitter:
    """Bytes -> complete SSE events (each ends with a blank line)."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        events = []
        while b"\n\n" in self._buffer:
            event, self._buffer = self._buffer.split(b"\n\n", 1)
            events.append(event + b"\n\n")
        return events


def _options(args: list[str]) -> dict[str, str]:
    return {args[i]: args[i + 1] for i in range(0, len(args) - 1, 2)}


def error_body(status: int, api_path: str, received_key: str | None) -> bytes:
    """The error body a backend sends: llama.cpp/OpenAI shape, or Anthropic's on /v1/messages.

    Like some real proxies, the 401 message echoes the key it got: the worker must redact it.
    """
    kinds = {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        429: "rate_limit_error",
        500: "server_error",
        503: "unavailable_error",
        529: "overloaded_error",
    }
    kind = kinds.get(status, "server_error")
    message = {
        401: f"Invalid API Key: {received_key}" if received_key else "Missing API Key",
        404: "File Not Found",
        429: "Rate limit reached, slow down",
        503: "Loading model",
        529: "Overloaded",
    }.get(status, "Internal server error")
    if api_path == "/v1/messages":
        return json.dumps({"type": "error", "error": {"type": kind, "message": message}}).encode()
    return json.dumps({"error": {"code": status, "message": message, "type": kind}}, separators=(",", ":")).encode()


async def _write_error(writer: asyncio.StreamWriter, incoming: _Incoming, status: int, options: dict[str, str]) -> None:
    key = incoming.headers.get("x-api-key") or incoming.headers.get("authorization", "").removeprefix("Bearer ") or None
    extra = []
    if "retry-after" in options:
        extra.append(f"Retry-After: {options['retry-after']}")
    if "retry-after-date" in options:
        when = datetime.now(UTC) + timedelta(seconds=float(options["retry-after-date"]))
        extra.append(f"Retry-After: {format_datetime(when, usegmt=True)}")
    await _write_raw(
        writer, status, "application/json; charset=utf-8", error_body(status, incoming.api_path, key), extra
    )


async def _write_raw(
    writer: asyncio.StreamWriter, status: int, content_type: str, body: bytes, extra: list[str] | None = None
) -> None:
    """An answer with the real server's header set (Server, CORS, type, length, Connection)."""
    reason = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Unknown"
    lines = [
        f"HTTP/1.1 {status} {reason}",
        "Server: llama.cpp",
        "Access-Control-Allow-Origin: ",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *(extra or []),
    ]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
    with contextlib.suppress(ConnectionError):
        await writer.drain()


def _json_or_raw(body: bytes) -> Any:
    try:
        return json.loads(body) if body else None
    except ValueError:
        return body.decode("utf-8", "replace")


class _Shared:
    server: FaultServer | None = None
    users = 0


@pytest.fixture(scope="session")
def fault_server(llama: LlamaServer) -> Iterator[FaultServer]:
    """The session's fault server, relaying to the session's real model server."""
    if _Shared.server is None:
        _Shared.server = FaultServer(upstream=llama.root).start()
    _Shared.users += 1
    try:
        yield _Shared.server
    finally:
        _Shared.users -= 1
        if _Shared.users == 0:
            server, _Shared.server = _Shared.server, None
            server.stop()
