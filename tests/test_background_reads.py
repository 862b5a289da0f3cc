"""A streamed answer is handed on at its last event, not when the HTTP body ends.

Against a real keep-alive server on loopback (it speaks the OpenAI chat-completions wire
format) that sends `data: [DONE]` and then holds the end of the chunked body until the
test lets it go: `infer` must answer while the body is still open, and the connection
must still go back to the pool once the body has ended (the next call opens none).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx2
import pytest
from anyio.abc import SocketStream

from mcp_orchestrator import Orchestrator
from mcp_orchestrator.models import GenerationParams, Message
from mcp_orchestrator.workers.base import WorkerRequest
from mcp_orchestrator.workers.openai import OpenAIWorker
from tests.conftest import make_config, running, wait_for

pytestmark = pytest.mark.anyio

TEST_TIMEOUT_S = 30.0

EVENTS = (
    b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":"held"},"finish_reason":null}]}\n\n',
    b'data: {"choices":[{"index":0,"delta":{"content":" back"},"finish_reason":"stop"}]}\n\n',
    b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}\n\n',
    b"data: [DONE]\n\n",
)


@dataclass
class HoldingServer:
    """Keep-alive HTTP/1.1; each answer's last chunk (`0\\r\\n\\r\\n`) waits for `release`."""

    port: int = 0
    connections: int = 0
    requests: int = 0
    answered: anyio.Event = field(default_factory=anyio.Event)
    """Set once an answer's events are all sent (its body is still open)."""
    release: anyio.Event = field(default_factory=anyio.Event)

    async def serve(self, stream: SocketStream) -> None:
        self.connections += 1
        buffered = b""
        async with stream:
            while True:
                while b"\r\n\r\n" not in buffered:
                    try:
                        buffered += await stream.receive()
                    except (anyio.EndOfStream, anyio.BrokenResourceError):
                        return
                head, _, buffered = buffered.partition(b"\r\n\r\n")
                length = next(
                    (
                        int(line.split(b":")[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length")
                    ),
                    0,
                )
                while len(buffered) < length:
                    buffered += await stream.receive()
                body, buffered = buffered[:length], buffered[length:]
                assert json.loads(body)["stream"] is True
                self.requests += 1
                await stream.send(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                )
                for event in EVENTS:
                    await stream.send(b"%x\r\n%s\r\n" % (len(event), event))
                self.answered.set()
                await self.release.wait()
                await stream.send(b"0\r\n\r\n")


@asynccontextmanager
async def holding_server() -> AsyncIterator[HoldingServer]:
    server = HoldingServer()
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    server.port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, server.serve)
        yield server
        tg.cancel_scope.cancel()


async def test_the_answer_comes_before_the_body_ends_and_the_connection_is_kept() -> None:
    async with holding_server() as server:
        config = make_config(
            stages={"inference": {"worker": "open_ai", "base_url": f"http://127.0.0.1:{server.port}/v1"}},
        )
        async with running(config) as (orchestrator, client):
            closed = ResponsesClosed().watch(orchestrator)
            with anyio.fail_after(TEST_TIMEOUT_S):
                first = await client.call_tool("infer", {"prompt": "one", "cache": False})
                # The server still holds the end of that body, and the response is still open
                # and being read (in the background): the answer did not wait for the body's end.
                assert not server.release.is_set()
                assert closed.count == 0
                assert not first.is_error, first.content
                assert first.content[0].text == "held back"
                assert first.structured_content is not None
                assert first.structured_content["usage"] == {"input_tokens": 3, "output_tokens": 2}
                server.release.set()
                # Read to its end in the background, the response closes (its connection goes
                # back to the pool)...
                await wait_for(lambda: closed.count == 1)
                second = await client.call_tool("infer", {"prompt": "two", "cache": False})
    assert not second.is_error and second.content[0].text == "held back"
    # ...and the second call used it: one connection for both requests.
    assert (server.requests, server.connections) == (2, 1)


class ResponsesClosed:
    """Counts the shared client's responses read to their end and closed, through httpx2's
    public request hooks and the `trace` extension (its connection is free again then)."""

    def __init__(self) -> None:
        self.count = 0

    def watch(self, orchestrator: Orchestrator) -> ResponsesClosed:
        orchestrator.http.event_hooks = {"request": [self._on_request], "response": []}
        return self

    async def _on_request(self, request: httpx2.Request) -> None:
        chained = request.extensions.get("trace")  # the transport's own watch

        async def on_event(name: str, info: dict[str, Any]) -> None:
            if name == "http11.response_closed.complete":
                self.count += 1
            if chained is not None:
                await chained(name, info)

        request.extensions["trace"] = on_event


async def test_without_background_reads_the_worker_reads_the_end_itself() -> None:
    """A worker used on its own (no orchestrator running BackgroundReads) still returns the
    connection to the pool: it reads the end of the body before it finishes."""
    async with holding_server() as server:
        worker = OpenAIWorker(f"http://127.0.0.1:{server.port}/v1")
        request = WorkerRequest((Message(role="user", content="hi"),), GenerationParams())
        order: list[str] = []
        with anyio.fail_after(TEST_TIMEOUT_S):
            async with anyio.create_task_group() as tg:

                async def let_go() -> None:
                    await server.answered.wait()
                    order.append("body end released")
                    server.release.set()

                tg.start_soon(let_go)
                texts = [chunk.text async for chunk in worker.generate(request)]
                order.append("worker finished")
            again = [chunk.text async for chunk in worker.generate(request)]
        await worker.aclose()
    assert order == ["body end released", "worker finished"]  # it read the end before finishing
    assert "".join(texts) == "".join(again) == "held back"
    assert (server.requests, server.connections) == (2, 1)
