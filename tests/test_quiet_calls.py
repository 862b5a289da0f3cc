"""Quiet calls (server/quiet_calls.py) and the server's HTTP protocol (server/protocol.py).

A 2026-07-28 call without a progress token is answered by the SDK's JSON mode in the
request's own task. The answer a client gets is the same either way, so the tests see which
path a request took by what the SDK read as its `json_response` setting (`modes`, a spy on
the per-request truth value), and what each path must still do by its effects: progress
sent, a call cancelled when its client leaves, keep-alive comments. The server runs in this
process with the CLI's app and protocol (tests/support_served.py), so the tests can hold the
backend call and see it cancelled.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.lowlevel
import httpx2
import pytest

from mcp_orchestrator import Orchestrator
from mcp_orchestrator.config import config_from_mapping
from mcp_orchestrator.server import quiet_calls
from mcp_orchestrator.server.protocol import HeadWithBody
from mcp_orchestrator.server.quiet_calls import KeptAlive, PerRequestJsonResponse, is_quiet
from tests.conftest import wait_for
from tests.support_admission import GatedWorker
from tests.support_served import served

pytestmark = pytest.mark.anyio

TIMEOUT_S = 30.0
PROTOCOL = "2026-07-28"
JSON_ONLY = "application/json"
BOTH = "application/json, text/event-stream"


def call(request_id: int, prompt: str, progress_token: str | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "io.modelcontextprotocol/protocolVersion": PROTOCOL,
        "io.modelcontextprotocol/clientCapabilities": {},
    }
    if progress_token is not None:
        meta["progressToken"] = progress_token
    return {
        "jsonrpc": "2.0",
        "id": request_id,
        "method": "tools/call",
        "params": {"name": "infer", "arguments": {"prompt": prompt}, "_meta": meta},
    }


def headers(accept: str) -> dict[str, str]:
    return {"accept": accept, "mcp-protocol-version": PROTOCOL, "mcp-method": "tools/call", "mcp-name": "infer"}


def echo_orchestrator() -> Orchestrator:
    return Orchestrator(config_from_mapping({"server": {"transport": "http"}}))


def gated_orchestrator() -> tuple[GatedWorker, Orchestrator]:
    """An orchestrator whose backend call waits until the test opens the worker's gate."""
    worker = GatedWorker()
    return worker, Orchestrator(config_from_mapping({"server": {"transport": "http"}}), worker)


@pytest.fixture
def short_keepalive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quiet_calls, "KEEPALIVE_S", 0.05)


@pytest.fixture
def modes(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Each truth the SDK reads from its `json_response` setting (True: JSON mode), in order."""
    read: list[bool] = []
    real = PerRequestJsonResponse.__bool__

    def spied(self: PerRequestJsonResponse) -> bool:
        read.append(real(self))
        return read[-1]

    monkeypatch.setattr(PerRequestJsonResponse, "__bool__", spied)
    return read


async def test_a_quiet_call_is_answered_in_json_mode(modes: list[bool]) -> None:
    async with served(echo_orchestrator()) as url, httpx2.AsyncClient(timeout=TIMEOUT_S) as http:
        response = await http.post(url, json=call(7, "quiet please"), headers=headers(BOTH))
    assert modes and all(modes)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    answer = response.json()
    assert answer["id"] == 7 and answer["result"]["structuredContent"]["text"] == "quiet please"


async def test_a_call_that_asks_for_progress_keeps_the_streaming_path(modes: list[bool]) -> None:
    async with served(echo_orchestrator()) as url, httpx2.AsyncClient(timeout=TIMEOUT_S) as http:
        streamed = await http.post(url, json=call(2, "with progress", "p-2"), headers=headers(BOTH))
    assert modes and not any(modes)
    assert streamed.status_code == 200 and streamed.headers["content-type"] == "text/event-stream"
    events = [json.loads(line[5:]) for line in streamed.text.splitlines() if line.startswith("data:")]
    progress = [event["params"]["message"] for event in events if event.get("method") == "notifications/progress"]
    assert progress == ["with", " progress"]
    assert events[-1]["id"] == 2 and events[-1]["result"]["structuredContent"]["text"] == "with progress"


async def test_the_sdk_still_refuses_a_client_that_does_not_accept_sse(modes: list[bool]) -> None:
    """The spec asks clients to accept both; the SDK answers 406 otherwise, quiet or not."""
    async with served(echo_orchestrator()) as url, httpx2.AsyncClient(timeout=TIMEOUT_S) as http:
        quiet = await http.post(url, json=call(1, "quiet"), headers=headers(JSON_ONLY))
        loud = await http.post(url, json=call(2, "loud", "p"), headers=headers(JSON_ONLY))
    assert (quiet.status_code, loud.status_code) == (406, 406)
    assert not any(modes)


async def test_a_server_without_client_gone_keeps_the_streaming_path(modes: list[bool]) -> None:
    """Under plain uvicorn nothing could cancel a quiet call whose client left: no JSON mode."""
    async with served(echo_orchestrator(), protocol="h11") as url, httpx2.AsyncClient(timeout=TIMEOUT_S) as http:
        answered = await http.post(url, json=call(2, "quiet"), headers=headers(BOTH))
    assert modes and not any(modes)
    assert answered.status_code == 200 and answered.json()["result"]["structuredContent"]["text"] == "quiet"


async def test_each_request_gets_its_own_mode_while_others_run(modes: list[bool]) -> None:
    worker, orchestrator = gated_orchestrator()
    with anyio.fail_after(TIMEOUT_S):
        async with served(orchestrator) as url, httpx2.AsyncClient(timeout=TIMEOUT_S) as http:
            async with anyio.create_task_group() as tg:
                answers: list[httpx2.Response] = []

                async def quiet_call() -> None:
                    answers.append(await http.post(url, json=call(1, "held"), headers=headers(BOTH)))

                tg.start_soon(quiet_call)
                await wait_for(lambda: worker.calls == 1)  # a quiet call is in flight in JSON mode
                assert modes and all(modes)
                modes.clear()
                loud = await http.post(url, json=call(2, "loud", "p"), headers=headers(JSON_ONLY))
                assert loud.status_code == 406 and modes and not any(modes)  # its own mode, not the other's
                worker.open()
            assert answers[0].status_code == 200
            assert answers[0].json()["result"]["structuredContent"]["text"] == "held"


async def test_a_quiet_call_whose_client_leaves_is_cancelled_with_its_backend_call(modes: list[bool]) -> None:
    worker, orchestrator = gated_orchestrator()
    with anyio.fail_after(TIMEOUT_S):
        async with served(orchestrator) as url:
            async with httpx2.AsyncClient(timeout=TIMEOUT_S) as http, anyio.create_task_group() as tg:

                async def abandoned() -> None:
                    await http.post(url, json=call(3, "abandoned"), headers=headers(BOTH))

                tg.start_soon(abandoned)
                await wait_for(lambda: worker.calls == 1)
                assert modes and all(modes)  # the quiet path: no SDK watcher to cancel it
                tg.cancel_scope.cancel()  # the client gives up: its connection closes
            await wait_for(lambda: orchestrator.status().totals.cancelled == 1)
            assert worker.cancelled == 1 and worker.finished == 0
            totals = orchestrator.status().totals
            assert totals.in_flight == 0 and totals.completed == 0
            assert orchestrator.pipeline.reconciles()


def raw_post(url: str, message: dict[str, Any], accept: str) -> bytes:
    """One HTTP/1.1 POST as bytes, to send on a raw connection."""
    body = json.dumps(message).encode()
    host = url.split("/")[2]
    lines = ["POST /mcp HTTP/1.1", f"host: {host}", "content-type: application/json", f"content-length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in headers(accept).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def test_a_request_pipelined_after_a_quiet_call_does_not_inherit_its_json_mode() -> None:
    """uvicorn starts a pipelined request from the end of the previous response, in its task:
    the quiet call's mode must be gone by then."""
    async with served(echo_orchestrator()) as url:
        port = int(url.split(":")[2].split("/")[0])
        both = raw_post(url, call(1, "quiet"), BOTH) + raw_post(url, call(2, "loud", "p"), BOTH)
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            await stream.send(both)
            received = b""
            with anyio.fail_after(TIMEOUT_S):
                while received.count(b"HTTP/1.1 ") < 2 or b'"id":2,"result"' not in received:
                    received += await stream.receive()
    first, second = received.split(b"HTTP/1.1 ")[1:3]
    assert first.startswith(b"200 ") and b"content-type: application/json" in first
    # The loud call streams its progress, as it would alone (in JSON mode it would be dropped).
    assert second.startswith(b"200 ") and b"content-type: text/event-stream" in second


@pytest.mark.usefixtures("short_keepalive")
async def test_a_long_quiet_call_is_kept_alive_as_sse_and_answered_in_the_stream() -> None:
    worker, orchestrator = gated_orchestrator()
    with anyio.fail_after(TIMEOUT_S):
        async with (
            served(orchestrator) as url,
            httpx2.AsyncClient(timeout=TIMEOUT_S) as http,
            http.stream("POST", url, json=call(4, "slow answer"), headers=headers(BOTH)) as response,
        ):
            assert response.status_code == 200
            assert response.headers["content-type"] == "text/event-stream"
            received = ""
            async for text in response.aiter_text():
                received += text
                if received.count(": ping") >= 2 and not worker.gate.is_set():
                    worker.open()  # two keep-alives seen: let the answer come
    frames = [frame for frame in received.split("\r\n\r\n") if frame]
    assert frames[:2] == [": ping", ": ping"]
    answer = frames[-1]
    assert answer.startswith("event: message\r\ndata: ")
    message = json.loads(answer.split("data: ", 1)[1])
    assert message["id"] == 4 and message["result"]["structuredContent"]["text"] == "slow answer"
    assert orchestrator.pipeline.reconciles()


class Recorded:
    """A `send` that keeps what it was given."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []

    async def __call__(self, message: Any) -> None:
        self.messages.append(dict(message))


async def test_no_keep_alive_comment_follows_the_answer() -> None:
    sent = Recorded()
    response = KeptAlive(sent, 0.01)
    async with anyio.create_task_group() as tg:
        tg.start_soon(response.keep_alive)
        await wait_for(lambda: len(sent.messages) >= 3)  # the stream's head and two comments
        await response.send({"type": "http.response.start", "status": 200, "headers": []})
        await response.send({"type": "http.response.body", "body": b'{"id":1}', "more_body": False})
        answered = len(sent.messages)
        await anyio.sleep(0.1)  # ten intervals
        tg.cancel_scope.cancel()
    assert sent.messages[0]["headers"][0] == (b"content-type", b"text/event-stream")
    assert len(sent.messages) == answered
    assert sent.messages[-1] == {
        "type": "http.response.body",
        "body": b'event: message\r\ndata: {"id":1}\r\n\r\n',
        "more_body": False,
    }


async def test_a_server_error_after_the_switch_ends_the_stream_without_an_event() -> None:
    sent = Recorded()
    response = KeptAlive(sent, 10.0)
    async with anyio.create_task_group() as tg:
        tg.start_soon(response.keep_alive)
        await wait_for(lambda: len(sent.messages) == 2)  # the stream's head and a comment
        await response.send({"type": "http.response.start", "status": 500, "headers": []})
        await response.send({"type": "http.response.body", "body": b"Internal Server Error", "more_body": False})
        tg.cancel_scope.cancel()
    assert sent.messages[-1] == {"type": "http.response.body", "body": b"", "more_body": False}


async def test_a_body_over_the_read_ahead_limit_takes_the_streaming_path(modes: list[bool]) -> None:
    """After such a body uvicorn stops reading until asked: nothing would see the client leave."""
    async with served(echo_orchestrator()) as url, httpx2.AsyncClient(timeout=TIMEOUT_S) as http:
        large = call(6, "many words " * 7_000)  # 77 kB
        answered = await http.post(url, json=large, headers=headers(BOTH))
    assert modes and not any(modes)
    assert answered.status_code == 200 and answered.json()["id"] == 6


@pytest.mark.parametrize(
    ("message", "quiet"),
    [
        (call(1, "x"), True),
        (call(1, "x", "token"), False),
        ({"jsonrpc": "2.0", "method": "notifications/initialized"}, False),
        ({"jsonrpc": "2.0", "id": 1, "method": "subscriptions/listen", "params": {}}, False),
        ({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}, True),
        ({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"_meta": {"progressToken": 0}}}, False),
    ],
)
def test_what_counts_as_quiet(message: dict[str, Any], quiet: bool) -> None:
    assert is_quiet(json.dumps(message).encode()) is quiet
    assert is_quiet(b"[1, 2]") is False and is_quiet(b"not json") is False


# ---------------------------------------------------------------------------- a head goes with its body


class CountingTransport(asyncio.Transport):
    """A real socket transport, with its writes counted."""

    def __init__(self, inner: asyncio.Transport) -> None:
        super().__init__()
        self.inner = inner
        self.writes: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))
        self.inner.write(data)

    def close(self) -> None:
        self.inner.close()


@asynccontextmanager
async def socket_transport() -> AsyncIterator[tuple[CountingTransport, socket.socket]]:
    ours, theirs = socket.socketpair()
    loop = asyncio.get_running_loop()
    transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, ours)
    counting = CountingTransport(transport)
    try:
        yield counting, theirs
    finally:
        transport.close()
        theirs.close()


HEAD = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"


async def test_a_head_and_its_body_leave_in_one_write() -> None:
    async with socket_transport() as (counting, peer):
        transport = HeadWithBody(counting)
        transport.write(HEAD)
        assert counting.writes == []  # held for the body
        transport.write(b"{}")
        assert counting.writes == [HEAD + b"{}"]
        await anyio.lowlevel.checkpoint()
        assert counting.writes == [HEAD + b"{}"]  # nothing left to flush
        peer.settimeout(TIMEOUT_S)
        assert peer.recv(1000) == HEAD + b"{}"


async def test_a_head_alone_leaves_when_the_loop_turn_ends_and_before_a_close() -> None:
    async with socket_transport() as (counting, _peer):
        transport = HeadWithBody(counting)
        transport.write(HEAD)
        await wait_for(lambda: counting.writes == [HEAD])
        transport.write(b"ok")  # a body written later goes on its own
        assert counting.writes == [HEAD, b"ok"]
        transport.write(HEAD)
        transport.close()
        assert counting.writes == [HEAD, b"ok", HEAD]


async def test_anything_but_a_head_is_written_at_once() -> None:
    async with socket_transport() as (counting, _peer):
        transport = HeadWithBody(counting)
        for data in (b"5\r\nhello\r\n", b"HTTP/1.1 but no blank line", b"data: x\r\n\r\n"):
            transport.write(data)
            assert counting.writes[-1] == data
