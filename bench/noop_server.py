"""The baseline server for bench/mcp_overhead.py: the same SDK server kind with one no-op tool.

Served like mcp-orchestrator serves itself (same uvicorn settings over HTTP: no access
log, lifespan on, SSE responses at /mcp), so only the tool's own work differs.

    .venv/bin/python -m bench.noop_server            # stdio
    .venv/bin/python -m bench.noop_server http PORT  # streamable HTTP on 127.0.0.1:PORT
"""

from __future__ import annotations

import sys

import anyio
import uvicorn
from mcp.server.mcpserver import MCPServer

server = MCPServer(name="noop", log_level="WARNING")


@server.tool(structured_output=False)
async def noop(prompt: str) -> str:
    """Return the prompt unchanged: the cost of a tool call and nothing else."""
    return prompt


async def serve_http(port: int) -> None:
    app = server.streamable_http_app(streamable_http_path="/mcp", json_response=False, host="127.0.0.1")
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_config=None, log_level="warning", access_log=False, lifespan="on"
    )
    await uvicorn.Server(config).serve()


if __name__ == "__main__":
    if sys.argv[1:2] == ["http"]:
        anyio.run(serve_http, int(sys.argv[2]))
    else:
        server.run()
