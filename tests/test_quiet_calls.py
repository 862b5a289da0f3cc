"""Quiet calls (server/quiet_calls.py) and the server's HTTP protocol (server/protocol.py).

A 2026-07-28 call without a progress token is answered by the SDK's JSON mode in the
request's own task. The tests tell the two paths apart by what each accepts: the SDK's
streaming path answers 406 to a client that does not accept `text/event-stream`, the JSON
path answers it. The server runs in this process with the CLI's app and protocol
(tests/support_served.py), so the tests can hold the backend call and see it cancelled.
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
from mcp_orchestrator.server.quiet_calls import is_quiet
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


async def test_a_quiet_call_is_answered_in_json_mode() -> None:
    async with served(echo_orchestrator()) as url, httpx2.AsyncClient(timeout=TIMEOUT_S) as http:
        for accept in (JSON_ONLY, BOTH):
            response = await http.post(url, json=call(7, "quiet please"), headers=headers(accept))
            assert response.status_code == 200, response.text
            assert response.headers["content-type"] == "application/json"
            answer = response.json()
            assert answer["id"] == 7
            assert answer["result"]["structuredContent"]["text"] == "quiet please"


async def test_a_call_that_asks_for_progress_keeps_the_streaming_path() -> None:
    async with served(echo_orchestrator()) as url, httpx2.AsyncClient(timeout=TIMEOUT_S) as http:
        refused = await http.post(url, json=call(1, "with progress", "p-1"), headers=headers(JSON_ONLY))
        assert refused.status_code == 406  # the SDK's streaming path needs text/event-stream
        streamed = await http.post(url, json=call(2, "with progress", "p-2"), headers=headers(BOTH))
    assert streamed.status_code == 200
    events = [json.loads(line[5:]) for line in streamed.text.splitlines() if line.startswith("data:")]
    progress = [event["params"]["message"] for event in events if event.get("method") == "notifications/progress"]
    assert progress == ["with", " progress"]
    assert events[-1]["id"] == 2 and events[-1]["result"]["structuredContent"]["text"] == "with progress"


async def test_a_server_without_client_gone_keeps_the_streaming_path() -> None:
    """Under plain uvicorn nothing could cancel a quiet call whose client left: no JSON mode."""
    async with served(echo_orchestrator(), protocol="h11") as url, httpx2.AsyncClient(timeout=TIMEOUT_S) as http:
        refused = await http.post(url, json=call(1, "quiet"), headers=headers(JSON_ONLY))
        answered = await http.post(url, json=call(2, "quiet"), headers=headers(BOTH))
    assert refused.status_code == 406
    assert answered.status_code == 200 and answered.json()["result"]["structuredContent"]["text"] == "quiet"


async def test_each_request_gets_its_own_mode_while_others_run() -> None:
    worker, orchestrator = gated_orchestrator()
    with anyio.fail_after(TIMEOUT_S):
        async with served(orchestrator) as url, httpx2.AsyncClient(timeout=TIMEOUT_S) as http:
            async with anyio.create_task_group() as tg:
                answers: list[httpx2.Response] = []

                async def quiet_call() -> None:
                    answers.append(await http.post(url, json=call(1, "held"), headers=headers(JSON_ONLY)))

                tg.start_soon(quiet_call)
                await wait_for(lambda: worker.calls == 1)  # a quiet call is in flight in JSON mode
                loud = await http.post(url, json=call(2, "loud", "p"), headers=headers(JSON_ONLY))
                assert loud.status_code == 406  # the flag of the call in flight is its own
                worker.open()
            assert answers[0].status_code == 200
            assert answers[0].json()["result"]["structuredContent"]["text"] == "held"


async def test_a_quiet_call_whose_client_leaves_is_cancelled_with_its_backend_call() -> None:
    worker, orchestrator = gated_orchestrator()
    with anyio.fail_after(TIMEOUT_S):
        async with served(orchestrator) as url:
            async with httpx2.AsyncClient(timeout=TIMEOUT_S) as http, anyio.create_task_group() as tg:

                async def abandoned() -> None:  # JSON only: the SDK's streaming path would refuse it
                    await http.post(url, json=call(3, "abandoned"), headers=headers(JSON_ONLY))

                tg.start_soon(abandoned)
                await wait_for(lambda: worker.calls == 1)
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
        both = raw_post(url, call(1, "quiet"), BOTH) + raw_post(url, call(2, "loud", "p"), JSON_ONLY)
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            await stream.send(both)
            received = b""
            with anyio.fail_after(TIMEOUT_S):
                while received.count(b"HTTP/1.1 ") < 2:
                    received += await stream.receive()
    first, second = received.split(b"HTTP/1.1 ")[1:3]
    assert first.startswith(b"200 ")
    assert second.startswith(b"406 ")  # the loud call took the streaming path, as it would alone


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


@pytest.mark.usefixtures("short_keepalive")
async def test_a_long_call_from_a_client_that_takes_only_json_gets_no_keep_alive() -> None:
    """Switching to SSE would send what the client said it does not accept: it waits for JSON."""
    worker, orchestrator = gated_orchestrator()
    with anyio.fail_after(TIMEOUT_S):
        async with (
            served(orchestrator) as url,
            httpx2.AsyncClient(timeout=TIMEOUT_S) as http,
            anyio.create_task_group() as tg,
        ):
            answers: list[httpx2.Response] = []

            async def slow_call() -> None:
                answers.append(await http.post(url, json=call(5, "patient"), headers=headers(JSON_ONLY)))

            tg.start_soon(slow_call)
            await wait_for(lambda: worker.calls == 1)
            await anyio.sleep(0.3)  # six keep-alive intervals
            worker.open()
    assert answers[0].status_code == 200 and answers[0].headers["content-type"] == "application/json"
    assert answers[0].json()["result"]["structuredContent"]["text"] == "patient"


async def test_a_body_over_the_read_ahead_limit_takes_the_streaming_path() -> None:
    """After such a body uvicorn stops reading until asked: nothing would see the client leave."""
    async with served(echo_orchestrator()) as url, httpx2.AsyncClient(timeout=TIMEOUT_S) as http:
        large = call(6, "many words " * 7_000)  # 77 kB
        refused = await http.post(url, json=large, headers=headers(JSON_ONLY))
        answered = await http.post(url, json=large, headers=headers(BOTH))
    assert refused.status_code == 406
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
