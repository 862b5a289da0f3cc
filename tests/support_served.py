"""An orchestrator served over streamable HTTP in the test's own process, as the CLI serves it
(the same app and uvicorn protocol), so a test can hold its worker and see what the server did."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import uvicorn

from mcp_orchestrator import Orchestrator
from mcp_orchestrator.server.http import HTTP_PROTOCOL, build_http_app
from tests.conftest import wait_for

TIMEOUT_S = 30.0


@asynccontextmanager
async def served(
    orchestrator: Orchestrator, protocol: type[asyncio.Protocol] | str = HTTP_PROTOCOL
) -> AsyncIterator[str]:
    """`orchestrator` over streamable HTTP on a free loopback port, in this process; yields the
    MCP URL. `protocol`: uvicorn's `http=` (the server's own unless a test wants another)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    app = build_http_app(orchestrator, "127.0.0.1", [], [], None)
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on", http=protocol)
    server = uvicorn.Server(config)
    done = anyio.Event()

    async def serve() -> None:
        try:
            await server.serve(sockets=[sock])
        finally:
            done.set()

    with sock:
        async with orchestrator, anyio.create_task_group() as tg:
            tg.start_soon(serve)
            await wait_for(lambda: server.started or done.is_set())
            yield f"http://127.0.0.1:{sock.getsockname()[1]}/mcp"
            server.should_exit = True
            with anyio.fail_after(TIMEOUT_S):
                await done.wait()
