"""The installed console script as a stdio MCP server, the way Claude Desktop/Code runs it."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from mcp import Client
from mcp.client.stdio import stdio_client

from tests.conftest import error_text
from tests.support_processes import LINE_TIMEOUT_S, SCRIPT, child_env, free_port, raw_stdio, run_cli, stdio_params

pytestmark = pytest.mark.anyio

SESSION_TIMEOUT_S = 60.0
HANDSHAKE_VERSION = "2025-11-25"


def test_console_script_is_installed() -> None:
    assert SCRIPT.exists(), f"{SCRIPT} missing: install the project (pip install -e .)"


async def test_stdio_session_lists_tools_streams_progress_and_rejects_bad_input() -> None:
    progress: list[str] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append(message or "")

    with tempfile.TemporaryFile("w+") as errlog:
        params = stdio_params("--worker", "echo", "--model", "stdio-echo", "--log-level", "info")
        with anyio.fail_after(SESSION_TIMEOUT_S):
            async with Client(stdio_client(params, errlog=errlog)) as client:
                listing = await client.list_tools()
                result = await client.call_tool(
                    "infer", {"prompt": "over the pipe we go"}, progress_callback=on_progress
                )
                bad = await client.call_tool("infer", {"prompt": "hi", "priority": "whenever"})
                status = (await client.call_tool("pipeline_status", {})).structured_content
        errlog.seek(0)
        server_log = errlog.read()
    assert "serving MCP over stdio" in server_log
    names = {tool.name for tool in listing.tools}
    assert {"infer", "pipeline_status", "dead_letters", "replay_dead_letter", "configure_worker"} <= names
    assert not result.is_error, result.content
    assert result.content[0].text == "over the pipe we go"
    assert result.structured_content is not None
    assert result.structured_content["model"] == "stdio-echo"
    assert progress == ["over", " the", " pipe", " we", " go"]
    assert "priority" in error_text(bad)
    assert status is not None
    assert status["totals"]["submitted"] == 1
    assert status["totals"]["completed"] == 1
    assert status["reconciles"] is True


async def totals_when(client: Client, condition: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """Poll pipeline_status over the session until `condition(totals)` holds (the caller sets a deadline)."""
    while True:
        status = (await client.call_tool("pipeline_status", {})).structured_content
        assert status is not None
        if condition(status["totals"]):
            totals: dict[str, Any] = status["totals"]
            return totals
        await anyio.sleep(0.01)


async def test_cancelled_call_over_stdio_reaches_the_server() -> None:
    """The client sends notifications/cancelled; the server counts the request as cancelled."""
    params = stdio_params("--delay-ms", "60000")
    with anyio.fail_after(SESSION_TIMEOUT_S):
        async with Client(params) as client:
            async with anyio.create_task_group() as tg:
                scope = anyio.CancelScope()

                async def slow_call() -> None:
                    with scope:
                        await client.call_tool("infer", {"prompt": "never answered"})

                tg.start_soon(slow_call)
                await totals_when(client, lambda totals: totals["in_flight"] == 1)
                scope.cancel()
            totals = await totals_when(client, lambda totals: totals["cancelled"] == 1)
    assert totals["in_flight"] == 0
    assert totals["submitted"] == 1
    assert totals["completed"] == 0


def jsonrpc(message_id: int | None, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
    if message_id is not None:
        message["id"] = message_id
    if params is not None:
        message["params"] = params
    return message


def test_stdout_carries_only_json_rpc_and_logs_go_to_stderr(tmp_path: Path) -> None:
    stderr_path = tmp_path / "stderr.log"
    with raw_stdio("--log-level", "debug", stderr_path=stderr_path) as raw:
        raw.send(
            jsonrpc(
                1,
                "initialize",
                {
                    "protocolVersion": HANDSHAKE_VERSION,
                    "capabilities": {},
                    "clientInfo": {"name": "raw-test", "version": "0"},
                },
            )
        )
        (initialized,) = raw.read_until_response(1)
        raw.send(jsonrpc(None, "notifications/initialized"))
        raw.send(
            jsonrpc(
                2, "tools/call", {"name": "infer", "arguments": {"prompt": "a b c"}, "_meta": {"progressToken": "tok"}}
            )
        )
        call_messages = raw.read_until_response(2)
        raw.send(jsonrpc(3, "tools/call", {"name": "infer", "arguments": {"prompt": ""}}))
        (bad,) = raw.read_until_response(3)
        raw.send(jsonrpc(4, "tools/list"))
        (listing,) = raw.read_until_response(4)
        code, trailing = raw.hang_up()
    stdout_lines = raw.stdout_lines
    stderr = stderr_path.read_text(encoding="utf-8")

    assert initialized["result"]["serverInfo"]["name"] == "mcp-orchestrator"
    *progress, answer = call_messages
    assert [m["method"] for m in progress] == ["notifications/progress"] * 3
    assert [m["params"]["message"] for m in progress] == ["a", " b", " c"]
    assert all(m["params"]["progressToken"] == "tok" for m in progress)
    assert answer["result"]["content"][0]["text"] == "a b c"
    assert answer["result"]["isError"] is False
    assert bad["result"]["isError"] is True
    assert "prompt" in bad["result"]["content"][0]["text"]
    assert len(listing["result"]["tools"]) >= 5

    assert code == 0
    assert trailing == []
    for line in stdout_lines:
        message = json.loads(line)
        assert message.get("jsonrpc") == "2.0", line
    assert "DEBUG" in stderr  # debug logging really was on, and it went to stderr
    assert "serving MCP over stdio" in stderr


def test_python_dash_m_serves_stdio() -> None:
    """`python -m mcp_orchestrator` is the same program as the console script."""
    request = jsonrpc(
        1,
        "initialize",
        {"protocolVersion": HANDSHAKE_VERSION, "capabilities": {}, "clientInfo": {"name": "m", "version": "0"}},
    )
    completed = subprocess.run(
        [sys.executable, "-m", "mcp_orchestrator"],
        input=json.dumps(request) + "\n",
        capture_output=True,
        text=True,
        timeout=LINE_TIMEOUT_S,
        env=child_env(),
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    (line,) = completed.stdout.splitlines()
    assert json.loads(line)["result"]["serverInfo"]["name"] == "mcp-orchestrator"


async def test_metrics_port_serves_prometheus_next_to_stdio() -> None:
    """stdio has no HTTP of its own; --metrics-port exposes /metrics on loopback, behind the
    same Host/Origin checks and bearer token as the HTTP transport."""
    port = free_port()
    params = stdio_params("--metrics-port", str(port), env={"MCP_ORCHESTRATOR_TOKEN": "metrics-secret"})
    url = f"http://127.0.0.1:{port}/metrics"
    authorized = {"Authorization": "Bearer metrics-secret"}
    with anyio.fail_after(SESSION_TIMEOUT_S), tempfile.TemporaryFile("w+") as errlog:
        async with Client(stdio_client(params, errlog=errlog)) as client, httpx2.AsyncClient(timeout=10.0) as http:
            assert not (await client.call_tool("infer", {"prompt": "scrape me"})).is_error
            while True:
                try:
                    response = await http.get(url, headers=authorized)
                    break
                except httpx2.TransportError:  # the metrics server may still be starting
                    await anyio.sleep(0.05)
            anonymous = await http.get(url)
            foreign_host = await http.get(url, headers={"Host": "evil.example"} | authorized)
            foreign_origin = await http.get(url, headers={"Origin": "http://evil.example"} | authorized)
        errlog.seek(0)
        stderr = errlog.read()
    assert "Traceback" not in stderr and "CancelledError" not in stderr, stderr  # a quiet exit
    assert response.status_code == 200
    assert 'orchestrator_requests_total{outcome="completed"} 1.0' in response.text
    assert anonymous.status_code == 401
    assert foreign_host.status_code == 421
    assert foreign_origin.status_code == 403


def test_a_taken_metrics_port_is_one_clear_line_before_anything_is_served() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        completed = run_cli("--transport", "http", "--port", "0", "--metrics-port", str(port))
    assert completed.returncode == 1
    assert completed.stderr.strip() == (
        f"mcp-orchestrator: cannot listen on 127.0.0.1:{port}: Address already in use "
        "(--metrics-port / observability.metrics_port)"
    )
