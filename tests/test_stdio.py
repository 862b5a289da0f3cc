"""The installed console script as a stdio MCP server, the way Claude Desktop/Code runs it."""

from __future__ import annotations

import itertools
import json
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mcp import Client
from mcp.client.stdio import stdio_client
from mcp.server.transport_security import DEFAULT_MAX_REQUEST_BODY_SIZE

from mcp_orchestrator import Config
from testbeds.processes import rss_bytes
from tests.conftest import error_text
from tests.support_processes import (
    DEFAULT_LOOP,
    LINE_TIMEOUT_S,
    SCRIPT,
    RawStdio,
    child_env,
    free_port,
    http_server,
    raw_stdio,
    run_cli,
    stdio_params,
)

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
    timings = [result.structured_content["latency_ms"], *result.structured_content["stage_ms"].values()]
    assert any(ms != int(ms) for ms in timings), timings  # finer than uvloop's whole-millisecond clock
    assert progress == ["over", " the", " pipe", " we", " go"]
    assert "priority" in error_text(bad)
    assert status is not None
    assert status["totals"]["submitted"] == 1
    assert status["totals"]["completed"] == 1
    assert status["reconciles"] is True
    assert status["event_loop"] == DEFAULT_LOOP


async def test_loop_asyncio_serves_on_the_standard_loop() -> None:
    params = stdio_params("--loop", "asyncio")
    with anyio.fail_after(SESSION_TIMEOUT_S):
        async with Client(params) as client:
            result = await client.call_tool("infer", {"prompt": "plain asyncio"})
            status = (await client.call_tool("pipeline_status", {})).structured_content
    assert result.content[0].text == "plain asyncio"
    assert status is not None
    assert status["event_loop"] == "asyncio"


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
    params = stdio_params("--metrics-port", str(port), env={"MCP_ORCHESTRATOR_TOKEN": "metrics-secret-4f9a2c"})
    url = f"http://127.0.0.1:{port}/metrics"
    authorized = {"Authorization": "Bearer metrics-secret-4f9a2c"}
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


# ---------------------------------------------------------------------------- bad messages over stdio
#
# Every message that is not valid JSON-RPC gets an error answer (id null when no usable id can
# be read); nothing reaches the pipeline, and the server goes on serving the next lines.

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
MIB = 1024 * 1024
DEFAULT_CAP = 4 * MIB  # the SDK's HTTP body cap, which stdio lines share by default


def initialize(raw: RawStdio) -> None:
    client = {"name": "raw-test", "version": "0"}
    raw.send(jsonrpc(1, "initialize", {"protocolVersion": HANDSHAKE_VERSION, "capabilities": {}, "clientInfo": client}))
    raw.read_until_response(1)
    raw.send(jsonrpc(None, "notifications/initialized"))


def write_bytes(raw: RawStdio, data: bytes) -> None:
    """Write `data` to the server's stdin as it is; a server that stops reading fails the test
    after LINE_TIMEOUT_S instead of hanging it (the writer thread dies with the process)."""
    stdin = raw.process.stdin
    assert stdin is not None
    failures: list[BaseException] = []

    def write() -> None:
        try:
            stdin.flush()
            stdin.buffer.write(data)
            stdin.buffer.flush()
        except OSError as exc:
            failures.append(exc)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    writer.join(LINE_TIMEOUT_S)
    if writer.is_alive():
        raise TimeoutError(f"the server did not read {len(data)} bytes within {LINE_TIMEOUT_S} s")
    if failures:
        raise failures[0]


def send_line(raw: RawStdio, line: str | bytes) -> None:
    write_bytes(raw, (line.encode("utf-8") if isinstance(line, str) else line) + b"\n")


def answer_to(raw: RawStdio, request_id: int | str | None) -> dict[str, Any]:
    """The next response (result or error) whose id is `request_id`; other messages are skipped."""
    while True:
        line = raw.next_line()
        assert line is not None, f"stdout closed before the answer to {request_id!r}"
        message: dict[str, Any] = json.loads(line)
        if ("result" in message or "error" in message) and message.get("id", "absent") == request_id:
            return message


def call(raw: RawStdio, request_id: int, tool: str, arguments: dict[str, Any]) -> dict[str, Any]:
    raw.send(jsonrpc(request_id, "tools/call", {"name": tool, "arguments": arguments}))
    result: dict[str, Any] = answer_to(raw, request_id)["result"]
    return result


def assert_still_serving(raw: RawStdio, submitted: int) -> None:
    """A valid infer is answered after the rejections, and only valid calls reached the pipeline."""
    result = call(raw, 900, "infer", {"prompt": "still here"})
    assert result["isError"] is False
    assert result["content"][0]["text"] == "still here"
    status = call(raw, 901, "pipeline_status", {})["structuredContent"]
    assert status["totals"]["submitted"] == submitted


def assert_only_json_rpc_on_stdout(raw: RawStdio) -> None:
    code, trailing = raw.hang_up()
    assert code == 0
    assert trailing == []
    for line in raw.stdout_lines:
        assert json.loads(line).get("jsonrpc") == "2.0", line[:200]


def nested(depth: int) -> str:
    """A tools/call whose whole message nests `depth` levels (message, params, arguments, lists)."""
    lists = depth - 3
    return (
        '{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"infer","arguments":'
        '{"prompt":"x","stop":' + "[" * lists + "]" * lists + "}}}"
    )


BAD_MESSAGES = [
    pytest.param("this is not json", PARSE_ERROR, None, "Parse error", id="not-json"),
    pytest.param('{"jsonrpc":"2.0","id":3,"method":', PARSE_ERROR, None, "Parse error", id="truncated-json"),
    pytest.param(
        '{"jsonrpc":"1.0","id":3,"method":"tools/list"}',
        INVALID_REQUEST,
        3,
        '"jsonrpc" must be "2.0"',
        id="jsonrpc-1.0",
    ),
    pytest.param('{"id":3,"method":"tools/list"}', INVALID_REQUEST, 3, '"jsonrpc" is missing', id="jsonrpc-missing"),
    pytest.param(
        '{"jsonrpc":"2.0","id":{"a":1},"method":"tools/list"}',
        INVALID_REQUEST,
        None,
        '"id" must be a string or an integer',
        id="id-object",
    ),
    pytest.param(
        '{"jsonrpc":"2.0","id":1.5,"method":"tools/list"}',
        INVALID_REQUEST,
        None,
        '"id" must be a string or an integer',
        id="id-float",
    ),
    pytest.param(
        '{"jsonrpc":"2.0","id":true,"method":"tools/list"}',
        INVALID_REQUEST,
        None,
        '"id" must be a string or an integer',
        id="id-boolean",
    ),
    pytest.param(
        '{"jsonrpc":"2.0","id":null,"method":"tools/list"}',
        INVALID_REQUEST,
        None,
        '"id" must be a string or an integer',
        id="id-null",
    ),
    pytest.param(
        '{"jsonrpc":"2.0","id":"call-7","method":"tools/call","params":"infer"}',
        INVALID_PARAMS,
        "call-7",
        '"params" must be an object',
        id="params-string",
    ),
    pytest.param(
        '{"jsonrpc":"2.0","id":3,"method":"tools/list","params":[1]}',
        INVALID_PARAMS,
        3,
        '"params" must be an object',
        id="params-array",
    ),
    pytest.param(
        '{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"infer","arguments":{"prompt":"a\\ud800b"}}}',
        INVALID_PARAMS,
        3,
        "lone surrogate",
        id="lone-surrogate-in-an-argument",
    ),
    pytest.param(
        '{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"infer","arguments":{"prompt":"x","\\udc00":1}}}',
        INVALID_PARAMS,
        3,
        "lone surrogate",
        id="lone-surrogate-in-an-argument-name",
    ),
    pytest.param(nested(300), INVALID_REQUEST, 3, "nesting deeper than 128 levels", id="nesting-300"),
    pytest.param(nested(100_000), INVALID_REQUEST, None, "nesting deeper than 128 levels", id="nesting-100000"),
    pytest.param('{"jsonrpc":"2.0","id":3}', INVALID_REQUEST, 3, '"method" is missing', id="method-missing"),
    pytest.param(
        '{"jsonrpc":"2.0","id":3,"method":5}', INVALID_REQUEST, 3, '"method" must be a string', id="method-number"
    ),
    pytest.param('[{"jsonrpc":"2.0","id":3,"method":"ping"}]', INVALID_REQUEST, None, "batch", id="batch"),
    pytest.param("42", INVALID_REQUEST, None, "must be a JSON object", id="not-an-object"),
]


@pytest.mark.parametrize(("line", "code", "answer_id", "words"), BAD_MESSAGES)
def test_a_bad_message_gets_the_error_json_rpc_gives_and_the_server_goes_on(
    tmp_path: Path, line: str, code: int, answer_id: int | str | None, words: str
) -> None:
    stderr_path = tmp_path / "stderr.log"
    with raw_stdio(stderr_path=stderr_path) as raw:
        initialize(raw)
        send_line(raw, line)
        error = answer_to(raw, answer_id)["error"]
        assert_still_serving(raw, submitted=1)
        assert_only_json_rpc_on_stdout(raw)
    assert error["code"] == code, error
    assert words in error["message"], error
    stderr = stderr_path.read_text(encoding="utf-8")
    assert "WARNING" in stderr and words in stderr, stderr  # each rejection is logged


BAD_PARAMS = [
    ({"name": "infer", "arguments": "text"}, "arguments: Input should be a valid dictionary"),
    ({"name": 123, "arguments": {}}, "name: Input should be a valid string"),
    ({"name": "infer", "arguments": {"prompt": "x"}, "_meta": {"progressToken": {"a": 1}}}, "_meta.progressToken"),
]


def test_params_the_sdk_refuses_are_answered_naming_the_field(tmp_path: Path) -> None:
    """The SDK's own answer was a bare "Invalid request parameters" with data "" (server/params.py)."""
    with raw_stdio(stderr_path=tmp_path / "stderr.log") as raw:
        initialize(raw)
        errors = []
        for request_id, (params, _) in enumerate(BAD_PARAMS, start=10):
            raw.send(jsonrpc(request_id, "tools/call", params))
            errors.append(answer_to(raw, request_id)["error"])
        assert_still_serving(raw, submitted=1)
    for error, (_, words) in zip(errors, BAD_PARAMS, strict=True):
        assert error["code"] == INVALID_PARAMS
        assert error["message"].startswith("Invalid request parameters: ") and words in error["message"], error
        assert words in error["data"], error


def test_nesting_up_to_the_limit_is_served(tmp_path: Path) -> None:
    """128 levels reach the tool (which refuses a list of lists as `stop`): the limit is not lower."""
    with raw_stdio(stderr_path=tmp_path / "stderr.log") as raw:
        initialize(raw)
        send_line(raw, nested(128))
        answer = answer_to(raw, 3)
        assert_only_json_rpc_on_stdout(raw)
    assert answer["result"]["isError"] is True
    assert "stop" in answer["result"]["content"][0]["text"]


def test_a_bad_notification_is_answered_with_id_null_and_a_valid_one_is_not_answered(tmp_path: Path) -> None:
    with raw_stdio(stderr_path=tmp_path / "stderr.log") as raw:
        initialize(raw)
        send_line(raw, '{"jsonrpc":"2.0","method":"notifications/initialized","params":"x"}')
        error = answer_to(raw, None)["error"]
        send_line(raw, '{"jsonrpc":"2.0","method":"notifications/initialized"}')  # valid: no answer
        assert_still_serving(raw, submitted=1)
        assert_only_json_rpc_on_stdout(raw)
    assert error["code"] == INVALID_PARAMS
    assert len(raw.stdout_lines) == 4  # initialize, the error, the infer, pipeline_status


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS from /proc")
def test_a_line_over_the_cap_is_answered_and_dropped_as_it_streams_in(tmp_path: Path) -> None:
    """6 MiB without a newline: the error comes while the line is still open, the bytes are not
    kept (RSS grows by far less than the line), and the next line is served."""
    size = 6 * MIB
    head = b'{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"infer","arguments":{"prompt":"'
    line = head + b"x" * (size - len(head))
    stderr_path = tmp_path / "stderr.log"
    with raw_stdio(stderr_path=stderr_path) as raw:
        initialize(raw)
        call(raw, 2, "infer", {"prompt": "warm up"})  # lazy imports and first-call allocations done
        before = rss_bytes(raw.process.pid)
        write_bytes(raw, line)
        error = answer_to(raw, None)["error"]  # answered before the line has even ended
        write_bytes(raw, b'"}}}\n')
        assert_still_serving(raw, submitted=2)
        after = rss_bytes(raw.process.pid)
        assert_only_json_rpc_on_stdout(raw)
    print(f"VmRSS before {before / MIB:.1f} MiB, after {after / MIB:.1f} MiB, line {size / MIB:.0f} MiB")
    assert error["code"] == INVALID_REQUEST
    assert f"larger than {DEFAULT_CAP} bytes" in error["message"]
    assert after - before < size / 2, (before, after)
    assert f"larger than {DEFAULT_CAP} bytes" in stderr_path.read_text(encoding="utf-8")


def test_the_default_cap_is_the_sdks_http_body_cap_and_a_tiny_one_is_refused(tmp_path: Path) -> None:
    assert Config().server.max_message_bytes == DEFAULT_MAX_REQUEST_BODY_SIZE == DEFAULT_CAP
    config = tmp_path / "tiny.toml"
    config.write_text("[server]\nmax_message_bytes = 100\n", encoding="utf-8")
    completed = run_cli("--check-config", "--config", str(config))
    assert completed.returncode == 2
    assert "server.max_message_bytes" in completed.stderr and "1024" in completed.stderr


def test_max_message_bytes_caps_stdio_lines_and_http_bodies(tmp_path: Path) -> None:
    config = tmp_path / "small.toml"
    config.write_text("[server]\nmax_message_bytes = 2048\n", encoding="utf-8")
    with raw_stdio("--config", str(config), stderr_path=tmp_path / "stderr.log") as raw:
        initialize(raw)
        send_line(raw, json.dumps(jsonrpc(5, "tools/call", {"name": "infer", "arguments": {"prompt": "y" * 2100}})))
        error = answer_to(raw, None)["error"]
        assert_still_serving(raw, submitted=1)
        assert_only_json_rpc_on_stdout(raw)
    assert error["code"] == INVALID_REQUEST
    assert "larger than 2048 bytes" in error["message"]
    with http_server("--config", str(config), workdir=tmp_path) as server:
        body = json.dumps(jsonrpc(1, "tools/list", {"padding": "z" * 2100}))
        headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
        response = httpx2.post(server.mcp_url, content=body, headers=headers, timeout=LINE_TIMEOUT_S)
    assert response.status_code == 413


# A generated message is valid or not by these rules (JSON-RPC 2.0 as MCP restricts it); the
# server's answer must be the one they give.
JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53), max_value=2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6)
    | st.sampled_from(["\ud800", "a\udfffb", "2.0", "1.0"])
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.text(max_size=5).filter(lambda key: key != "_meta"), children, max_size=3)
    ),
    max_leaves=6,
)
ABSENT = object()


def member(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly a valid value (what shrinking goes to), else any JSON value, sometimes absent."""
    return st.integers(0, 9).flatmap(lambda n: valid if n < 7 else JSON_VALUES if n < 9 else st.just(ABSENT))


GENERATED = st.fixed_dictionaries(
    {
        "jsonrpc": member(st.just("2.0")),
        "id": member(st.integers(min_value=-(2**53), max_value=2**53) | st.text(max_size=6)),
        "method": member(st.sampled_from(["ping", "no/such/method"])),
        "params": member(
            st.none() | st.dictionaries(st.text(max_size=5).filter(lambda key: key != "_meta"), JSON_VALUES, max_size=3)
        ),
    }
).map(lambda message: {key: value for key, value in message.items() if value is not ABSENT})


def has_lone_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        return any("\ud800" <= char <= "\udfff" for char in value)
    if isinstance(value, list):
        return any(has_lone_surrogate(item) for item in value)
    if isinstance(value, dict):
        return any(has_lone_surrogate(key) or has_lone_surrogate(item) for key, item in value.items())
    return False


def expected_answer(message: dict[str, Any]) -> tuple[int | None, Any] | None:
    """(error code, or None for a result; the id answered), or None when nothing is answered."""
    ident = message.get("id")
    usable = isinstance(ident, int | str) and not isinstance(ident, bool) and not has_lone_surrogate(ident)
    answer_id = ident if usable else None
    if "id" in message and not usable:
        return INVALID_REQUEST, None
    method = message.get("method")
    if message.get("jsonrpc") != "2.0" or not isinstance(method, str) or has_lone_surrogate(method):
        return INVALID_REQUEST, answer_id
    params = message.get("params")
    if (params is not None and not isinstance(params, dict)) or has_lone_surrogate(params):
        return INVALID_PARAMS, answer_id
    if "id" not in message:
        return None  # a valid notification
    return (None if method == "ping" else METHOD_NOT_FOUND), answer_id


def test_generated_messages_each_get_the_answer_json_rpc_gives(tmp_path: Path) -> None:
    stderr_path = tmp_path / "stderr.log"
    sentinels = itertools.count()
    with raw_stdio(stderr_path=stderr_path) as raw:
        initialize(raw)

        @settings(max_examples=150, deadline=None, database=None)
        @given(message=GENERATED)
        def answers(message: dict[str, Any]) -> None:
            expected = expected_answer(message)
            sentinel = f"sentinel-{next(sentinels)}"
            send_line(raw, json.dumps(message))  # ensure_ascii: lone surrogates travel as \\uXXXX escapes
            raw.send(jsonrpc(None, "ping") | {"id": sentinel})
            waiting = {sentinel} | ({"answer"} if expected is not None else set())
            while waiting:
                line = raw.next_line()
                assert line is not None
                answer = json.loads(line)
                if answer.get("id") == sentinel:
                    waiting.discard(sentinel)
                    continue
                assert expected is not None, f"{message!r} was answered: {answer}"
                code, answer_id = expected
                assert answer.get("id", "absent") == answer_id, (message, answer)
                assert (answer["error"]["code"] if "error" in answer else None) == code, (message, answer)
                waiting.discard("answer")

        answers()
        assert_still_serving(raw, submitted=1)
        assert_only_json_rpc_on_stdout(raw)


def test_a_client_that_goes_away_cancels_its_call_and_the_server_exits(tmp_path: Path) -> None:
    """stdin closing mid-call (the client was killed) is a cancellation: the call, whose worker
    would take a minute, is not waited for, and the server exits 0 with nothing but JSON-RPC on
    stdout (STOP_TIMEOUT_S, 10 s, bounds the wait: far less than the minute the call needs)."""
    config = tmp_path / "slow.toml"
    config.write_text('[stages.inference]\nworker = "echo"\ndelay_ms = 60000\n', encoding="utf-8")
    with raw_stdio("--config", str(config), stderr_path=tmp_path / "stderr.log") as raw:
        initialize(raw)
        raw.send(jsonrpc(2, "tools/call", {"name": "infer", "arguments": {"prompt": "slow"}}))
        raw.send(jsonrpc(3, "tools/call", {"name": "pipeline_status", "arguments": {}}))
        (status,) = raw.read_until_response(3)
        assert status["result"]["structuredContent"]["totals"]["in_flight"] == 1
        code, trailing = raw.hang_up()
    assert code == 0
    assert all(json.loads(line)["jsonrpc"] == "2.0" for line in trailing)
    answers = [json.loads(line) for line in trailing if json.loads(line).get("id") == 2]
    assert all("error" in answer or answer["result"]["isError"] for answer in answers)  # never an answer text
