"""The naive bridge for bench/gateway.py: what most LLM-calling MCP servers are.

One MCPServer (the official SDK) with one tool, `ask`, that sends the prompt to an OpenAI
chat-completions backend with httpx2 (the HTTP client mcp-orchestrator's workers use, one
pooled AsyncClient) and returns the answer's text. Nothing else: no queue, no limits, no
retries, no metrics, no argument checks beyond the SDK's. Served over streamable HTTP as the
SDK serves a server by default (bench/noop_server.py: uvicorn's own HTTP protocol, the SDK's
streaming mode); mcp-orchestrator's own HTTP protocol and JSON answers for plain calls
(server/protocol.py, server/quiet_calls.py) are part of what the benchmark compares.

    .venv/bin/python -m bench.naive_bridge PORT BACKEND_V1_URL [MODEL]
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import httpx2
from mcp.server.mcpserver import MCPServer

from bench.noop_server import serve_http

TIMEOUT_S = 60.0


def build(base_url: str, model: str) -> MCPServer:
    http: httpx2.AsyncClient | None = None

    @asynccontextmanager
    async def lifespan(_: MCPServer) -> AsyncIterator[None]:
        nonlocal http
        limits = httpx2.Limits(max_connections=100, max_keepalive_connections=100)
        async with httpx2.AsyncClient(base_url=base_url, timeout=TIMEOUT_S, limits=limits) as client:
            http = client
            yield

    server = MCPServer(name="naive-bridge", log_level="WARNING", lifespan=lifespan)

    @server.tool(structured_output=False)
    async def ask(prompt: str) -> str:
        """Send the prompt to the model and return its answer."""
        assert http is not None
        body = {"model": model, "messages": [{"role": "user", "content": prompt}]}
        response = await http.post("/chat/completions", json=body)
        response.raise_for_status()
        return str(response.json()["choices"][0]["message"]["content"])

    return server


if __name__ == "__main__":
    port, base = int(sys.argv[1]), sys.argv[2]
    bridge = build(base, sys.argv[3] if len(sys.argv) > 3 else "mock-gpt")
    app = bridge.streamable_http_app(streamable_http_path="/mcp", json_response=False, host="127.0.0.1")
    anyio.run(serve_http, app, port)
