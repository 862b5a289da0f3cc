"""The console script serving streamable HTTP on a free loopback port: MCP, /healthz, /metrics,
DNS-rebinding protection and the optional bearer token."""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from tests.support_processes import DEFAULT_LOOP, HttpServer, http_server, wait_for_text

pytestmark = pytest.mark.anyio

SESSION_TIMEOUT_S = 60.0
TOKEN = "test-token-0123456789"
STAGES = ["rag", "assemble", "inference", "post_process", "stream"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpServer]:
    with http_server("--worker", "echo", "--model", "http-echo", workdir=tmp_path_factory.mktemp("http")) as running:
        yield running


@pytest.fixture(scope="module")
def guarded_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpServer]:
    with http_server("--worker", "echo", token=TOKEN, workdir=tmp_path_factory.mktemp("http-token")) as running:
        yield running


async def test_loop_asyncio_serves_http_on_the_standard_loop(tmp_path: Path) -> None:
    with http_server("--worker", "echo", "--loop", "asyncio", workdir=tmp_path) as running:
        with anyio.fail_after(SESSION_TIMEOUT_S):
            async with Client(running.mcp_url) as client:
                result = await client.call_tool("infer", {"prompt": "head and body on asyncio"})
                status = (await client.call_tool("pipeline_status", {})).structured_content
    assert result.content[0].text == "head and body on asyncio"
    assert status is not None and status["event_loop"] == "asyncio"


def get(url: str, headers: dict[str, str] | None = None) -> httpx2.Response:
    with httpx2.Client(timeout=10.0) as http:
        return http.get(url, headers=headers or {})


def post_initialize(url: str, headers: dict[str, str]) -> httpx2.Response:
    body = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}},
    }
    with httpx2.Client(timeout=10.0) as http:
        return http.post(
            url,
            json=body,
            headers={"Accept": "application/json, text/event-stream", "Content-Type": "application/json"} | headers,
        )


def metric(text: str, name: str, labels: str = "") -> float:
    """The value of one sample in Prometheus text format, e.g. metric(t, "x_total", 'outcome="completed"')."""
    selector = re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else "")
    match = re.search(rf"^{selector} (\S+)$", text, re.MULTILINE)
    assert match is not None, f"{name}{{{labels}}} not in metrics"
    return float(match.group(1))


# ---------------------------------------------------------------------------- MCP over HTTP


async def test_tools_list_and_infer_with_progress_over_http(server: HttpServer) -> None:
    progress: list[str] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append(message or "")

    with anyio.fail_after(SESSION_TIMEOUT_S):
        async with Client(server.mcp_url) as client:
            listing = await client.list_tools()
            result = await client.call_tool(
                "infer", {"prompt": "served over streamable http"}, progress_callback=on_progress
            )
            bad = await client.call_tool("dead_letters", {"limit": 0})
    assert {tool.name for tool in listing.tools} == {
        "infer",
        "batch_infer",
        "request_status",
        "cancel_request",
        "pipeline_status",
        "dead_letters",
        "replay_dead_letter",
    }
    assert not result.is_error, result.content
    assert result.content[0].text == "served over streamable http"
    assert result.structured_content is not None
    assert result.structured_content["model"] == "http-echo"
    assert progress == ["served", " over", " streamable", " http"]
    assert bad.is_error
    assert "limit" in bad.content[0].text


async def test_legacy_handshake_client_over_http(server: HttpServer) -> None:
    with anyio.fail_after(SESSION_TIMEOUT_S):
        async with Client(server.mcp_url, mode="legacy") as client:
            result = await client.call_tool("infer", {"prompt": "old school"})
    assert result.content[0].text == "old school"


# ---------------------------------------------------------------------------- health and metrics


def test_healthz_reports_the_running_pipeline(server: HttpServer) -> None:
    response = get(f"{server.base_url}/healthz")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["worker"]["model"] == "http-echo"
    assert body["in_flight"] == 0


async def test_metrics_count_completed_requests_and_show_queue_depths(server: HttpServer) -> None:
    with anyio.fail_after(SESSION_TIMEOUT_S):
        async with Client(server.mcp_url) as client:
            before = (await client.call_tool("pipeline_status", {})).structured_content
            scraped_before = get(f"{server.base_url}/metrics").text
            for index in range(3):
                assert not (await client.call_tool("infer", {"prompt": f"metered {index}"})).is_error
            after = (await client.call_tool("pipeline_status", {})).structured_content
    response = get(f"{server.base_url}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert before is not None and after is not None
    completed_label = 'outcome="completed"'
    assert metric(scraped_before, "orchestrator_requests_total", completed_label) == before["totals"]["completed"]
    assert metric(text, "orchestrator_requests_total", completed_label) == after["totals"]["completed"]
    assert after["totals"]["completed"] == before["totals"]["completed"] + 3
    assert after["reconciles"] is True
    assert after["event_loop"] == DEFAULT_LOOP  # the HTTP protocol runs on uvloop's transports too
    for stage in STAGES:
        assert metric(text, "orchestrator_queue_depth", f'stage="{stage}"') == 0
        assert f'orchestrator_requests_shed_total{{stage="{stage}"}}' in text
    assert "orchestrator_stage_duration_seconds_bucket" in text


# ---------------------------------------------------------------------------- DNS-rebinding protection


@pytest.mark.parametrize("path", ["/healthz", "/metrics"])
def test_foreign_host_and_origin_are_refused_on_plain_routes(server: HttpServer, path: str) -> None:
    url = f"{server.base_url}{path}"
    assert get(url, {"Host": "evil.example"}).status_code == 421
    assert get(url, {"Origin": "http://evil.example"}).status_code == 403
    assert get(url, {"Host": f"localhost:{server.port}"}).status_code == 200
    assert get(url, {"Origin": f"http://127.0.0.1:{server.port}"}).status_code == 200


def test_foreign_host_and_origin_are_refused_on_mcp(server: HttpServer) -> None:
    assert post_initialize(server.mcp_url, {"Host": "evil.example"}).status_code == 421
    assert post_initialize(server.mcp_url, {"Origin": "http://evil.example"}).status_code == 403
    allowed = post_initialize(server.mcp_url, {"Origin": f"http://localhost:{server.port}"})
    assert allowed.status_code == 200, allowed.text


# ---------------------------------------------------------------------------- bearer token


def test_healthz_without_the_token_says_only_whether_it_is_up(guarded_server: HttpServer) -> None:
    """Load balancers ask without a token: they get the status and nothing about the worker."""
    url = f"{guarded_server.base_url}/healthz"
    bare = get(url)
    assert (bare.status_code, bare.json()) == (200, {"status": "ok"})
    assert get(url, {"Authorization": "Bearer wrong"}).json() == {"status": "ok"}
    detailed = get(url, guarded_server.auth_headers()).json()
    assert detailed["status"] == "ok" and "worker" in detailed and "in_flight" in detailed


@pytest.mark.parametrize("path", ["/metrics"])
def test_token_guards_plain_routes(guarded_server: HttpServer, path: str) -> None:
    url = f"{guarded_server.base_url}{path}"
    missing = get(url)
    assert missing.status_code == 401
    assert missing.headers.get("www-authenticate") == "Bearer"
    assert get(url, {"Authorization": "Bearer wrong"}).status_code == 401
    assert get(url, {"Authorization": TOKEN}).status_code == 401
    assert get(url, {"Authorization": f"Basic {TOKEN}"}).status_code == 401
    assert get(url, {"Authorization": f"Bearer {TOKEN}x"}).status_code == 401
    assert get(url, guarded_server.auth_headers()).status_code == 200
    # The scheme is case-insensitive (RFC 9110 section 11.1).
    assert get(url, {"Authorization": f"bearer {TOKEN}"}).status_code == 200
    assert get(url, {"Authorization": f"BEARER  {TOKEN}"}).status_code == 200


def test_token_guards_mcp(guarded_server: HttpServer) -> None:
    assert post_initialize(guarded_server.mcp_url, {}).status_code == 401
    assert post_initialize(guarded_server.mcp_url, {"Authorization": "Bearer nope"}).status_code == 401
    assert post_initialize(guarded_server.mcp_url, guarded_server.auth_headers()).status_code == 200


async def test_mcp_client_with_the_token_works(guarded_server: HttpServer) -> None:
    with anyio.fail_after(SESSION_TIMEOUT_S):
        async with (
            httpx2.AsyncClient(headers=guarded_server.auth_headers(), timeout=30.0) as http,
            Client(streamable_http_client(guarded_server.mcp_url, http_client=http)) as client,
        ):
            result = await client.call_tool("infer", {"prompt": "with a token"})
    assert not result.is_error, result.content
    assert result.content[0].text == "with a token"


def leaves(error: BaseException) -> list[BaseException]:
    """The non-group exceptions inside a (possibly nested) exception group."""
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in leaves(inner)]
    return [error]


async def test_mcp_client_without_the_token_is_refused(guarded_server: HttpServer) -> None:
    with anyio.fail_after(SESSION_TIMEOUT_S), pytest.raises(BaseException) as caught:
        async with Client(guarded_server.mcp_url) as client:
            await client.list_tools()
    assert any(isinstance(leaf, MCPError) for leaf in leaves(caught.value)), caught.value


def test_server_logs_went_to_its_stderr(server: HttpServer) -> None:
    assert "MCP at http://127.0.0.1:" in server.stderr()


def test_a_client_leaving_mid_body_is_not_an_error(tmp_path: Path) -> None:
    """Nobody is left to answer; it logged an ERROR with a ClientDisconnect traceback."""
    with http_server("--worker", "echo", "--log-level", "debug", workdir=tmp_path) as alone:
        head = (
            f"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:{alone.port}\r\nContent-Type: application/json\r\n"
            "Accept: application/json, text/event-stream\r\nContent-Length: 1000\r\n\r\n"
        )
        with socket.create_connection(("127.0.0.1", alone.port), timeout=5) as sock:
            sock.sendall(head.encode() + b'{"jsonrpc":')
        wait_for_text(alone.stderr_path, "HTTP client left before its request body ended")
        with httpx2.Client(timeout=5.0) as http:
            assert http.get(f"{alone.base_url}/healthz").status_code == 200
        stderr = alone.stderr()
    assert "Traceback" not in stderr and "ERROR" not in stderr, stderr


# ---------------------------------------------------------------------------- bad JSON-RPC messages

BAD_MESSAGES = [
    (b'{"jsonrpc":', -32700, None),
    (b'{"jsonrpc":"1.0","id":5,"method":"ping"}', -32600, 5),
    (b'{"id":6,"method":"ping"}', -32600, 6),
    (b'{"jsonrpc":"2.0","id":{"a":1},"method":"ping"}', -32600, None),
    (b'{"jsonrpc":"2.0","id":7,"method":"tools/call","params":"x"}', -32602, 7),
    (
        b'{"jsonrpc":"2.0","id":8,"method":"tools/call","params":{"name":"infer","arguments":{"prompt":"\\ud800"}}}',
        -32602,
        8,
    ),
    (
        b'{"jsonrpc":"2.0","id":9,"method":"tools/call","params":{"name":"infer","arguments":{"stop":'
        + b"[" * 300
        + b"]" * 300
        + b"}}}",
        -32600,
        9,
    ),
]


def open_session(url: str) -> dict[str, str]:
    """Headers of a fresh, initialized MCP session (the SDK's session mode)."""
    opened = post_initialize(url, {})
    assert opened.status_code == 200, opened.text
    headers = {
        "Accept": "application/json, text/event-stream",
        "Content-Type": "application/json",
        "Mcp-Session-Id": opened.headers["mcp-session-id"],
        "Mcp-Protocol-Version": "2025-11-25",
    }
    with httpx2.Client(timeout=10.0) as http:
        http.post(url, json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=headers)
    return headers


def test_every_bad_message_is_answered_with_its_error_and_id_and_changes_nothing(server: HttpServer) -> None:
    """The SDK alone answered these with id null and pydantic's report, and took an object id
    for a notification (202, no answer at all); they are now answered as over stdio."""
    headers = open_session(server.mcp_url)
    with httpx2.Client(timeout=10.0) as http:
        before = http.get(f"{server.base_url}/metrics").text
        for body, code, message_id in BAD_MESSAGES:
            answer = http.post(server.mcp_url, content=body, headers=headers)
            assert answer.status_code == 400, (body[:60], answer.status_code, answer.text)
            error = answer.json()
            assert (error["error"]["code"], error["id"]) == (code, message_id), error
            assert error["error"]["message"].split(":")[0] in ("Parse error", "Invalid Request", "Invalid params")
        object_id = b'{"jsonrpc":"2.0","id":{"x":1},"method":"tools/list"}'
        for content_type in ("application/json, text/plain", "application/json,", "Application/JSON; charset=utf-8"):
            # The SDK reads these bodies as JSON too (any comma-separated part), so they are checked.
            variant = http.post(server.mcp_url, content=object_id, headers=headers | {"Content-Type": content_type})
            assert variant.status_code == 400 and variant.json()["error"]["code"] == -32600, (
                content_type,
                variant.text,
            )
        oversize = http.post(server.mcp_url, content=b'{"x":"' + b"a" * (5 * 1024 * 1024) + b'"}', headers=headers)
        assert oversize.status_code == 413 and "max_message_bytes" in oversize.json()["error"]["message"]
        good = {"jsonrpc": "2.0", "id": 10, "method": "tools/call", "params": {"name": "pipeline_status"}}
        served = http.post(server.mcp_url, json=good, headers=headers)
        after = http.get(f"{server.base_url}/metrics").text
    assert served.status_code == 200 and '"reconciles":true' in served.text.replace(" ", "")
    assert metric(before, "orchestrator_requests_total", 'outcome="completed"') == metric(
        after, "orchestrator_requests_total", 'outcome="completed"'
    )
