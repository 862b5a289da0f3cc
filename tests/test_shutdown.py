"""SIGTERM drains, for real, over stdio and streamable HTTP.

Each test starts the console script with a slow echo worker (its first word comes at once,
the next ones `chunk_delay_ms` apart), starts CALLS concurrent `infer` calls, waits until
every one of them has streamed its first word (so all are in flight in the pipeline), and
sends SIGTERM. With a grace longer than the calls every caller gets its normal answer;
with a grace shorter than the calls every caller gets a clear tool error instead of a
dropped stream. Either way the process exits 0, and over stdio stdout stays pure JSON-RPC.
Every wait has a deadline; nothing is timed.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from mcp import Client
from mcp.types import CallToolResult, TextContent

from mcp_orchestrator.shutdown import DrainReport, Shutdown
from tests.conftest import error_text, make_config, running, totals_of, wait_for
from tests.support_processes import (
    STOP_TIMEOUT_S,
    HttpServer,
    RawStdio,
    http_server,
    raw_stdio,
    wait_for_text,
    write_lines,
)
from tests.test_stdio import jsonrpc

pytestmark = pytest.mark.anyio

CALLS = 10
WORDS = 4
FAST_CHUNK_MS = 1000
"""A drained call takes about (WORDS - 1) * FAST_CHUNK_MS after its first word: far below the long grace."""
SLOW_CHUNK_MS = 60_000
"""A cut call would take minutes: far beyond the short grace."""
LONG_GRACE_S = 60
SHORT_GRACE_S = 0.2
SESSION_TIMEOUT_S = 60.0
HANDSHAKE_VERSION = "2025-11-25"
SHUT_DOWN = "shut down before this request finished"
REFUSED = "server is shutting down"


def config_file(tmp_path: Path, chunk_delay_ms: int, grace_s: float) -> Path:
    return write_lines(
        tmp_path / "slow.toml",
        [
            "[server]",
            f"shutdown_grace_s = {grace_s}",
            "[stages.inference]",
            'worker = "echo"',
            f"chunk_delay_ms = {chunk_delay_ms}",
        ],
    )


def prompt(index: int) -> str:
    """Distinct prompts, so that no call joins another's trip."""
    return " ".join(f"w{index}-{word}" for word in range(WORDS))


# ---------------------------------------------------------------------------- the ledger


async def test_a_drain_past_its_grace_counts_every_cut_request_as_cancelled_and_refuses_new_ones() -> None:
    """In process: what the drain does to the pipeline, where the counters can be read after it."""
    config = make_config(stages={"inference": {"chunk_delay_ms": SLOW_CHUNK_MS}})
    async with running(config) as (orchestrator, client):
        results: list[CallToolResult] = []

        async def call(index: int) -> None:
            results.append(await client.call_tool("infer", {"prompt": prompt(index)}))

        async with anyio.create_task_group() as tg:
            for index in range(CALLS):
                tg.start_soon(call, index)
            await wait_for(lambda: len(orchestrator.pipeline.ledger.live) == CALLS)
            report = await Shutdown(orchestrator.pipeline, grace_s=0).drain()
        late = await client.call_tool("infer", {"prompt": "too late"})
        totals = await totals_of(client)
    assert report.cancelled == CALLS
    assert [SHUT_DOWN in error_text(result) for result in results] == [True] * CALLS
    assert REFUSED in error_text(late)
    assert (totals["submitted"], totals["cancelled"], totals["failed"], totals["in_flight"]) == (CALLS + 1, CALLS, 1, 0)


# ---------------------------------------------------------------------------- stdio


def infer_call(message_id: int, text: str) -> dict[str, Any]:
    return jsonrpc(
        message_id,
        "tools/call",
        {"name": "infer", "arguments": {"prompt": text}, "_meta": {"progressToken": f"p{message_id}"}},
    )


def start_stdio_calls(raw: RawStdio) -> list[int]:
    """Handshake, then CALLS infer calls; returns their ids once each has streamed its first word."""
    raw.send(
        jsonrpc(
            0,
            "initialize",
            {
                "protocolVersion": HANDSHAKE_VERSION,
                "capabilities": {},
                "clientInfo": {"name": "shutdown-test", "version": "0"},
            },
        )
    )
    raw.read_until_response(0)
    raw.send(jsonrpc(None, "notifications/initialized"))
    ids = list(range(1, CALLS + 1))
    for message_id in ids:
        raw.send(infer_call(message_id, prompt(message_id)))
    started: set[str] = set()
    while len(started) < CALLS:
        line = raw.next_line()
        assert line is not None, "stdout closed before every call started"
        message = json.loads(line)
        assert message.get("method") == "notifications/progress", message
        started.add(message["params"]["progressToken"])
    return ids


def stdio_answers(raw: RawStdio, ids: list[int]) -> dict[int, dict[str, Any]]:
    """Read stdout to its end: every response by id (each line must be JSON-RPC)."""
    answers: dict[int, dict[str, Any]] = {}
    while (line := raw.next_line()) is not None:
        message = json.loads(line)
        assert message.get("jsonrpc") == "2.0", line
        if "id" in message and ("result" in message or "error" in message):
            assert message["id"] not in answers, f"two answers for {message['id']}"
            answers[message["id"]] = message
    return answers


def test_stdio_sigterm_lets_calls_in_flight_finish_and_refuses_new_ones(tmp_path: Path) -> None:
    stderr_path = tmp_path / "stderr.log"
    config = config_file(tmp_path, FAST_CHUNK_MS, LONG_GRACE_S)
    with raw_stdio("--config", str(config), stderr_path=stderr_path) as raw:
        ids = start_stdio_calls(raw)
        raw.process.send_signal(signal.SIGTERM)
        wait_for_text(stderr_path, f"draining {CALLS} in-flight request(s), up to {LONG_GRACE_S:g} s")
        late = CALLS + 1
        raw.send(infer_call(late, "too late"))  # the client still writes: new work is refused
        answers = stdio_answers(raw, [*ids, late])
        code = raw.process.wait(timeout=STOP_TIMEOUT_S)
    assert code == 0
    assert sorted(answers) == [*ids, late]
    for message_id in ids:
        result = answers[message_id]["result"]
        assert result["isError"] is False, result
        assert result["content"][0]["text"] == prompt(message_id)
    refused = answers[late]["result"]
    assert refused["isError"] is True
    assert REFUSED in refused["content"][0]["text"]
    assert "finished" in stderr_path.read_text(encoding="utf-8")


def test_stdio_a_call_cancelled_by_its_id_as_text_is_not_waited_for(tmp_path: Path) -> None:
    """The SDK cancels request 10 on a notice naming "10" (it is never answered): the drain
    waited for it through the whole grace."""
    stderr_path = tmp_path / "stderr.log"
    config = config_file(tmp_path, SLOW_CHUNK_MS, LONG_GRACE_S)
    with raw_stdio("--config", str(config), stderr_path=stderr_path) as raw:
        (first, *others) = start_stdio_calls(raw)
        for message_id in [first, *others]:
            raw.send(jsonrpc(None, "notifications/cancelled", {"requestId": str(message_id)}))
        raw.send(jsonrpc(CALLS + 1, "ping"))
        raw.read_until_response(CALLS + 1)  # read after the notices: they were seen
        raw.process.send_signal(signal.SIGTERM)
        answers = stdio_answers(raw, [])
        code = raw.process.wait(timeout=STOP_TIMEOUT_S)
    stderr = stderr_path.read_text(encoding="utf-8")
    assert code == 0 and answers == {}  # cancelled calls are not answered
    assert "draining 0 in-flight request(s)" in stderr, stderr


def test_stdio_sigterm_past_the_grace_answers_every_call_with_an_error(tmp_path: Path) -> None:
    stderr_path = tmp_path / "stderr.log"
    config = config_file(tmp_path, SLOW_CHUNK_MS, SHORT_GRACE_S)
    with raw_stdio("--config", str(config), stderr_path=stderr_path) as raw:
        ids = start_stdio_calls(raw)
        raw.process.send_signal(signal.SIGTERM)
        answers = stdio_answers(raw, ids)
        code = raw.process.wait(timeout=STOP_TIMEOUT_S)
    stderr = stderr_path.read_text(encoding="utf-8")
    assert code == 0
    assert sorted(answers) == ids
    for message_id in ids:
        result = answers[message_id]["result"]
        assert result["isError"] is True, result
        assert SHUT_DOWN in result["content"][0]["text"]
    assert f"draining {CALLS} in-flight request(s)" in stderr
    assert f"cancelled {CALLS}" in stderr


# ---------------------------------------------------------------------------- HTTP


async def http_calls_then_sigterm(
    server: HttpServer, *, legacy: bool = False, listed: bool = True
) -> tuple[list[CallToolResult], str]:
    """CALLS concurrent infer calls over one client; SIGTERM once each has streamed its first word.

    With `listed`, the client lists the tools first; else its SDK asks for the list after the
    first answer (to check each result against the tool's output schema), during the drain.
    Returns the results, and the text of a call made once the drain has begun (legacy
    sessions only: a sessionless client's new request is refused with 503)."""
    results: list[CallToolResult] = []
    late = ""
    started = 0
    all_started = anyio.Event()

    async def call(index: int) -> None:
        first = True

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            nonlocal first, started
            if first:
                first = False
                started += 1
                if started == CALLS:
                    all_started.set()

        results.append(await client.call_tool("infer", {"prompt": prompt(index)}, progress_callback=on_progress))

    with anyio.fail_after(SESSION_TIMEOUT_S):
        async with (
            Client(server.mcp_url, **({"mode": "legacy"} if legacy else {})) as client,
            anyio.create_task_group() as tg,
        ):
            if listed:
                await client.list_tools()
            for index in range(CALLS):
                tg.start_soon(call, index)
            await all_started.wait()
            server.process.send_signal(signal.SIGTERM)
            await anyio.to_thread.run_sync(wait_for_text, server.stderr_path, "draining")
            assert await anyio.to_thread.run_sync(refused_after_signal, server)
            if legacy:  # the session is still served while its calls finish: new work is refused
                late = error_text(await client.call_tool("infer", {"prompt": "too late"}))
    return results, late


def wait_for_exit(process: subprocess.Popen[str]) -> int:
    return process.wait(timeout=STOP_TIMEOUT_S)


ODD_BODIES = [b'{"jsonrpc":"2.0","id":1,"method":["tools/list"]}', b"[" * 100_000, b"\xff", b"{" + b" " * 20_000]
"""Sessionless POSTs during a drain, read before authentication: each is refused, none is a 500."""


def refused_after_signal(server: HttpServer) -> bool:
    """Requests from outside the sessions once the drain began: refused (503, or no connection)."""
    headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
    # A made-up session header does not make a request a session's: 2026-07-28 has no sessions,
    # and /healthz has none either (a load balancer sending one must still see 503).
    made_up = {"Mcp-Session-Id": "made-up", "MCP-Protocol-Version": "2026-07-28"}
    call = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"pipeline_status","arguments":{}}}'
    try:
        with httpx2.Client(timeout=5.0) as http:
            statuses = [http.get(f"{server.base_url}/healthz").status_code]
            statuses += [http.post(server.mcp_url, content=body, headers=headers).status_code for body in ODD_BODIES]
            statuses.append(http.get(f"{server.base_url}/healthz", headers=made_up).status_code)
            statuses.append(http.post(server.mcp_url, content=call, headers={**headers, **made_up}).status_code)
    except httpx2.TransportError:
        return True
    assert statuses == [503] * len(statuses), statuses
    return True


@pytest.mark.parametrize(
    ("legacy", "listed"),
    [(False, True), (False, False), (True, True)],
    ids=["sessionless", "sessionless-unlisted", "session"],
)
async def test_http_sigterm_lets_calls_in_flight_finish_and_refuses_new_work(
    tmp_path: Path, legacy: bool, listed: bool
) -> None:
    config = config_file(tmp_path, FAST_CHUNK_MS, LONG_GRACE_S)
    with http_server("--config", str(config), workdir=tmp_path) as server:
        results, late = await http_calls_then_sigterm(server, legacy=legacy, listed=listed)
        code = await anyio.to_thread.run_sync(wait_for_exit, server.process)
        stderr = server.stderr()
    assert code == 0
    assert len(results) == CALLS
    assert all(not result.is_error for result in results), [result.content for result in results]
    texts = sorted(block.text for result in results for block in result.content if isinstance(block, TextContent))
    assert texts == sorted(prompt(index) for index in range(CALLS))
    if legacy:
        assert REFUSED in late
    assert f"draining {CALLS} in-flight request(s), up to {LONG_GRACE_S:g} s" in stderr
    assert f"all {CALLS} in-flight request(s) finished" in stderr
    assert "transport write blocked" not in stderr


@pytest.mark.parametrize("legacy", [False, True], ids=["sessionless", "session"])
async def test_http_sigterm_past_the_grace_answers_every_call_with_an_error(tmp_path: Path, legacy: bool) -> None:
    config = config_file(tmp_path, SLOW_CHUNK_MS, SHORT_GRACE_S)
    with http_server("--config", str(config), workdir=tmp_path) as server:
        results, _ = await http_calls_then_sigterm(server, legacy=legacy)
        code = await anyio.to_thread.run_sync(wait_for_exit, server.process)
        stderr = server.stderr()
    assert code == 0
    assert len(results) == CALLS
    for result in results:
        assert SHUT_DOWN in error_text(result)
    assert f"draining {CALLS} in-flight request(s)" in stderr
    assert f"cancelled {CALLS}" in stderr
    assert "transport write blocked" not in stderr


def test_a_body_still_arriving_does_not_hold_the_drain(tmp_path: Path) -> None:
    """A client sending its POST body byte by byte owes no answer yet: the drain does not wait
    the grace for it, and once drained its request is cut short without an ERROR."""
    config = config_file(tmp_path, FAST_CHUNK_MS, LONG_GRACE_S)
    with http_server("--config", str(config), workdir=tmp_path) as server:
        head = (
            f"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nContent-Type: application/json\r\n"
            "Accept: application/json, text/event-stream\r\nContent-Length: 1000\r\n\r\n"
        )
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(head.encode() + b'{"jsonrpc":')
            server.process.send_signal(signal.SIGTERM)
            wait_for_text(server.stderr_path, "draining")
            with contextlib.suppress(OSError):  # the server may close it first
                sock.sendall(b'"2.0",')
            code = wait_for_exit(server.process)
        stderr = server.stderr()
    assert code == 0
    assert "draining 0 in-flight request(s)" in stderr, stderr
    assert "ERROR" not in stderr and "Traceback" not in stderr, stderr


def test_the_drain_summary_never_says_all_finished_when_a_call_went_unanswered() -> None:
    assert DrainReport(1, 0, 1, 9.0).summary() == (
        "shutdown: grace over after 9.00 s; 1 call(s) still unanswered are dropped; exiting"
    )
    assert DrainReport(2, 0, 0, 1.0).summary() == "shutdown: all 2 in-flight request(s) finished after 1.00 s; exiting"
