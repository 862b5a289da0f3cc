"""Long calls over the real transports: a stdio subprocess and streamable HTTP on 127.0.0.1.

The same client code as tests/test_long_calls.py, through `mcp.Client` on each wire: a task
created, polled to completion and identical to the inline answer; a client without the
extension never gets a task; a background request fetched by id after the client's own
timeout; counters that reconcile at the end.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp.types import CallToolResult

from tests.support_processes import http_server, stdio_params
from tests.support_tasks import TaskHandle, TasksClient, call, error_of, get_task, poll_until_ended

pytestmark = pytest.mark.anyio

TEST_TIMEOUT_S = 60.0
CONFIG = """
[stages.inference]
worker = "echo"
delay_ms = 400

[tasks]
inline_ms = 0
"""


@contextmanager
def config_file(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "long-calls.toml"
    path.write_text(CONFIG, encoding="utf-8")
    yield path


@asynccontextmanager
async def clients(transport: str, tmp_path: Path) -> AsyncIterator[tuple[Client, Client]]:
    """A client that declares the tasks extension and one that does not, on one server."""
    with config_file(tmp_path) as path:
        if transport == "stdio":
            # A stdio server has one client: each client here starts its own server process.
            params = stdio_params("--config", str(path))
            async with Client(params, extensions=[TasksClient()]) as tasks_client, Client(params) as plain:
                yield tasks_client, plain
        else:
            with http_server("--config", str(path), workdir=tmp_path) as server:
                async with (
                    Client(server.mcp_url, extensions=[TasksClient()]) as tasks_client,
                    Client(server.mcp_url) as plain,
                ):
                    yield tasks_client, plain


def text(result: CallToolResult) -> str:
    return "\n".join(block.text for block in result.content if block.type == "text")


@pytest.mark.parametrize("transport", ["stdio", "http"])
async def test_tasks_and_background_requests_over_the_wire(transport: str, tmp_path: Path) -> None:
    async with clients(transport, tmp_path) as (tasks_client, plain):
        with anyio.fail_after(TEST_TIMEOUT_S):
            handle = await call(tasks_client, "infer", {"prompt": "over the wire", "cache": False})
            assert isinstance(handle, TaskHandle), handle
            ended = await poll_until_ended(tasks_client, handle.task_id)
            inline = await plain.call_tool("infer", {"prompt": "over the wire", "cache": False})
            not_a_task = await call(plain, "infer", {"prompt": "plain client"})
            refused = await error_of(get_task(plain, handle.task_id))
            queued = await plain.session.call_tool(
                "infer", {"prompt": "in the background", "background": True}, read_timeout_seconds=0.2
            )
            assert isinstance(queued, CallToolResult) and queued.structured_content is not None
            fetched = await plain.call_tool(
                "request_status", {"request_id": queued.structured_content["request_id"], "wait_ms": 20_000}
            )
            status = (await plain.call_tool("pipeline_status", {})).structured_content
    assert ended.status == "completed" and ended.result is not None
    assert ended.result["content"][0]["text"] == text(inline) == "over the wire"
    task_answer: dict[str, Any] = ended.result["structuredContent"]
    assert inline.structured_content is not None
    assert set(task_answer) == set(inline.structured_content)
    assert isinstance(not_a_task, CallToolResult) and text(not_a_task) == "plain client"
    assert refused.error.code == -32021
    assert fetched.structured_content is not None and fetched.structured_content["status"] == "completed"
    assert text(fetched) == "in the background"
    assert status is not None and status["reconciles"] is True
    # The plain client's server: over stdio its own process (3 calls, 1 background), over HTTP the shared one.
    expected = (3, 1) if transport == "stdio" else (4, 2)
    assert (status["totals"]["completed"], status["jobs"]["started"]) == expected


async def test_background_requests_belong_to_their_http_session(tmp_path: Path) -> None:
    with config_file(tmp_path) as path, http_server("--config", str(path), workdir=tmp_path) as server:
        async with (
            Client(server.mcp_url, mode="legacy") as alice,
            Client(server.mcp_url, mode="legacy") as bob,
        ):
            with anyio.fail_after(TEST_TIMEOUT_S):
                queued = await alice.call_tool("infer", {"prompt": "alice's", "background": True})
                assert queued.structured_content is not None
                request_id = queued.structured_content["request_id"]
                seen_by_bob = await bob.call_tool("request_status", {"request_id": request_id})
                cancel_by_bob = await bob.call_tool("cancel_request", {"request_id": request_id})
                mine = await alice.call_tool("request_status", {"request_id": request_id, "wait_ms": 20_000})
    for refused in (seen_by_bob, cancel_by_bob):
        assert refused.is_error and f"no task or background request {request_id!r}" in text(refused)
    assert mine.structured_content is not None and mine.structured_content["status"] == "completed"
    assert text(mine) == "alice's"
