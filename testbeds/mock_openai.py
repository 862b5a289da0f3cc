"""A mock OpenAI chat-completions backend with a fixed latency, for the gateway benchmark.

Raw asyncio HTTP/1.1 (keep-alive, Content-Length requests), so the backend itself costs
next to nothing and every gateway in bench/gateway.py is measured against the same floor.
It speaks the wire format the real servers speak (OpenAI, vLLM, llama.cpp's server):

- `POST /v1/chat/completions`: waits `--latency-ms`, then answers one `chat.completion`
  object, or with `"stream": true` an SSE stream of `chat.completion.chunk` events (a role
  chunk, one content chunk per word, a chunk with `finish_reason`, a `usage` chunk when
  `stream_options.include_usage` is set, then `data: [DONE]`), sent chunked;
- `GET /v1/models`: the one model; `GET /health`: `{"status":"ok"}`.

The answer is fixed (ANSWER, or `--answer-json`: a JSON string literal, so a test can make
the backend send text no UTF-8 can hold, such as a lone surrogate escape), tokens are
counted as words. Run as its own process:

    .venv/bin/python -m testbeds.mock_openai --port 0 --latency-ms 20

It prints `mock-openai listening on http://127.0.0.1:PORT` on stdout once it listens.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import time
from typing import Any

ANSWER = "Hello from the mock backend."
MODEL = "mock-gpt"
MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 4 * 1024 * 1024
IDLE_TIMEOUT_S = 300.0
"""A connection with no request for this long is closed."""


class MockOpenAI:
    def __init__(self, latency_s: float, answer: str = ANSWER) -> None:
        self.latency_s = latency_s
        self.answer = answer
        self.served = 0
        self._ids = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IDLE_TIMEOUT_S)
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
                    return
                method, path, headers = _parse_head(head)
                length = int(headers.get("content-length", "0") or 0)
                if length > MAX_BODY_BYTES:
                    await _respond(writer, 413, {"error": {"message": "body too large", "type": "invalid_request"}})
                    return
                body = await reader.readexactly(length) if length else b""
                keep_alive = headers.get("connection", "").lower() != "close"
                await self.route(method, path, body, writer, keep_alive)
                if not keep_alive:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def route(self, method: str, path: str, body: bytes, writer: asyncio.StreamWriter, keep_alive: bool) -> None:
        path = path.split("?", 1)[0]
        if method == "GET" and path in ("/health", "/healthz"):
            await _respond(writer, 200, {"status": "ok"}, keep_alive)
        elif method == "GET" and path in ("/v1/models", "/models"):
            await _respond(
                writer,
                200,
                {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "mock"}]},
                keep_alive,
            )
        elif method == "POST" and path in ("/v1/chat/completions", "/chat/completions"):
            try:
                request = json.loads(body)
                messages = request["messages"]
            except (ValueError, KeyError, TypeError):
                error = {"error": {"message": "expected a JSON body with messages", "type": "invalid_request_error"}}
                await _respond(writer, 400, error, keep_alive)
                return
            await asyncio.sleep(self.latency_s)
            self.served += 1
            self._ids += 1
            if request.get("stream"):
                await self.stream(request, messages, writer, keep_alive)
            else:
                await _respond(writer, 200, self.completion(request, messages), keep_alive)
        else:
            await _respond(
                writer, 404, {"error": {"message": f"no route {method} {path}", "type": "not_found"}}, keep_alive
            )

    def completion(self, request: dict[str, Any], messages: list[Any]) -> dict[str, Any]:
        prompt_tokens, completion_tokens = _prompt_tokens(messages), len(self.answer.split())
        return {
            "id": f"chatcmpl-mock{self._ids}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request.get("model") or MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": self.answer},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    async def stream(
        self, request: dict[str, Any], messages: list[Any], writer: asyncio.StreamWriter, keep_alive: bool
    ) -> None:
        base = {
            "id": f"chatcmpl-mock{self._ids}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": request.get("model") or MODEL,
        }
        words = self.answer.split(" ")
        deltas: list[dict[str, Any]] = [{"role": "assistant", "content": ""}]
        deltas += [{"content": word if i == 0 else f" {word}"} for i, word in enumerate(words)]
        events = [
            {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}]}
            for delta in deltas
        ]
        events.append({**base, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]})
        if (request.get("stream_options") or {}).get("include_usage"):
            prompt_tokens = _prompt_tokens(messages)
            usage = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": len(words),
                "total_tokens": prompt_tokens + len(words),
            }
            events.append({**base, "choices": [], "usage": usage})
        payload = b"".join(b"data: " + json.dumps(event).encode() + b"\n\n" for event in events)
        payload += b"data: [DONE]\n\n"
        head = (
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
            f"transfer-encoding: chunked\r\nconnection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n"
        )
        writer.write(head.encode() + f"{len(payload):x}\r\n".encode() + payload + b"\r\n0\r\n\r\n")
        await writer.drain()


def _prompt_tokens(messages: list[Any]) -> int:
    return sum(len(str(m.get("content", "")).split()) for m in messages if isinstance(m, dict))


def _parse_head(head: bytes) -> tuple[str, str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = [*lines[0].split(" ", 2), "", ""][:3]
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return method, path, headers


REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 413: "Payload Too Large"}


async def _respond(writer: asyncio.StreamWriter, status: int, body: dict[str, Any], keep_alive: bool = False) -> None:
    data = json.dumps(body).encode()
    head = (
        f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(data)}\r\nconnection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n"
    )
    writer.write(head.encode() + data)
    await writer.drain()


async def serve(host: str, port: int, latency_ms: float, answer: str = ANSWER) -> None:
    mock = MockOpenAI(latency_ms / 1000, answer)
    server = await asyncio.start_server(mock.handle, host, port, backlog=2048, limit=MAX_HEADER_BYTES)
    bound = server.sockets[0].getsockname()[1]
    print(f"mock-openai listening on http://{host}:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description="A mock OpenAI chat-completions backend with a fixed latency")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    # No type= here: argparse would apply it to a string default too.
    parser.add_argument("--answer-json", help="the answer, as a JSON string literal (default: ANSWER)")
    args = parser.parse_args()
    answer = ANSWER
    if args.answer_json is not None:
        try:
            answer = json.loads(args.answer_json)
        except ValueError:
            answer = None
        if not isinstance(answer, str) or not answer:
            parser.error("--answer-json must be a non-empty JSON string literal")
    asyncio.run(serve(args.host, args.port, args.latency_ms, answer))


if __name__ == "__main__":
    main()
