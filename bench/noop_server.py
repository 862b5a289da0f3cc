"""Baseline servers for bench/mcp_overhead.py.

`noop`: the same SDK server kind as mcp-orchestrator with one no-op tool, served as the SDK
serves one by default (uvicorn's own HTTP protocol, no access log, lifespan on, the SDK's
streaming mode at /mcp): the baseline an MCP server gets without doing anything.

`canned`: mcp-orchestrator's own MCP server (its tools, middleware, HTTP app and uvicorn
protocol, as the CLI serves it) whose pipeline is bypassed: `infer` answers every call with
one result computed at start-up.
It separates what the MCP layer costs for `infer` (arguments, the structured result and
its output schema) from what the pipeline costs.

    .venv/bin/python -m bench.noop_server                    # no-op, stdio
    .venv/bin/python -m bench.noop_server http PORT          # no-op, streamable HTTP on 127.0.0.1:PORT
    .venv/bin/python -m bench.noop_server canned             # canned infer, stdio
    .venv/bin/python -m bench.noop_server canned http PORT   # canned infer, streamable HTTP
"""

from __future__ import annotations

import sys
from typing import Any

import anyio
import uvicorn
from mcp.server.mcpserver import MCPServer

from mcp_orchestrator import Config, InferResult, Orchestrator, Submission
from mcp_orchestrator.pipeline.request import ChunkSink, Request
from mcp_orchestrator.server.http import HTTP_PROTOCOL, build_http_app

server = MCPServer(name="noop", log_level="WARNING")


@server.tool(structured_output=False)
async def noop(prompt: str) -> str:
    """Return the prompt unchanged: the cost of a tool call and nothing else."""
    return prompt


async def serve_http(app: Any, port: int, protocol: Any = "auto") -> None:
    """`app` on 127.0.0.1:`port`; `protocol`: uvicorn's `http=` (its own default unless given)."""
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_config=None,
        log_level="warning",
        access_log=False,
        lifespan="on",
        http=protocol,
    )
    await uvicorn.Server(config).serve()


class CannedOrchestrator(Orchestrator):
    """mcp-orchestrator with the pipeline bypassed: every request the tools submit is answered
    with the one result computed when started (its MCP server, middleware and HTTP app are the
    real ones). The tools submit and then wait, so both are replaced."""

    answer: InferResult | None = None

    async def __aenter__(self) -> CannedOrchestrator:
        await super().__aenter__()
        self.answer = await super().infer(Submission(prompt="a canned answer for every prompt"))
        return self

    def submit(
        self, submission: Submission, on_chunk: ChunkSink | None = None, *, job_id: str | None = None
    ) -> Request:
        return Request("canned", submission, 0.0, 0.0, on_chunk, job_id)

    async def wait(self, request: Request) -> InferResult:
        assert self.answer is not None
        return self.answer


async def serve_canned(http_port: int | None) -> None:
    orchestrator = CannedOrchestrator(Config())
    async with orchestrator:
        if http_port is None:
            await orchestrator.server.run_stdio_async()
        else:
            app = build_http_app(orchestrator, "127.0.0.1", [], [], None)
            await serve_http(app, http_port, HTTP_PROTOCOL)


if __name__ == "__main__":
    args = sys.argv[1:]
    is_canned = args[:1] == ["canned"]
    if is_canned:
        args = args[1:]
    port = int(args[1]) if args[:1] == ["http"] else None
    if is_canned:
        anyio.run(serve_canned, port)
    elif port is not None:
        app = server.streamable_http_app(streamable_http_path="/mcp", json_response=False, host="127.0.0.1")
        anyio.run(serve_http, app, port)
    else:
        server.run()
