"""What a backend answers is checked before it reaches a result (workers/replies.py): text no
UTF-8 can hold is cleaned, token counts and finish reasons that are not what the wire format
promises are a malformed response. End to end against testbeds/mock_openai.py (its own
process, the OpenAI wire format), and the parsers against hand-written replies."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from mcp import Client

from mcp_orchestrator.errors import WorkerError
from mcp_orchestrator.workers import taxonomy
from mcp_orchestrator.workers.anthropic import message_chunk, read_messages_stream
from mcp_orchestrator.workers.base import Chunk
from mcp_orchestrator.workers.openai import completion_chunk, read_chat_stream
from mcp_orchestrator.workers.replies import MAX_TOKEN_COUNT, backend_json
from mcp_orchestrator.workers.transport import Endpoint, open_event_stream
from testbeds.mock_openai import ANSWER
from testbeds.processes import terminate
from tests.support_processes import LINE_TIMEOUT_S, http_server, stdio_params

LONE_SURROGATE = '"caf\\ud800e au lait"'
"""The mock's answer as a JSON literal: valid JSON, but no UTF-8 text can hold it."""
CLEANED = "caf\ufffde au lait"
SESSION_TIMEOUT_S = 60.0
ENDPOINT = Endpoint(backend="test at http://replies.test", base_url="http://replies.test")


@contextmanager
def mock_backend(answer_json: str | None) -> Iterator[str]:
    """testbeds/mock_openai.py answering `answer_json` (None: its own answer); yields its /v1 URL."""
    answer = [] if answer_json is None else ["--answer-json", answer_json]
    process = subprocess.Popen(
        [sys.executable, "-m", "testbeds.mock_openai", "--latency-ms", "0", *answer],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        match = re.search(r"listening on (http://\S+)", line)
        assert match is not None, f"no banner within {LINE_TIMEOUT_S:g} s: {line!r}"
        yield f"{match.group(1)}/v1"
    finally:
        terminate(process)


def config_for(tmp_path: Path, url: str, *, stream: bool) -> Path:
    path = tmp_path / f"replies-{stream}.toml"
    path.write_text(
        "[stages.inference]\n"
        f'worker = "open_ai"\nbase_url = "{url}"\nmodel = "mock-gpt"\nstream = {json.dumps(stream)}\n'
        "[resilience]\nretry_attempts = 0\n",
        encoding="utf-8",
    )
    return path


@pytest.mark.anyio
@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
async def test_a_lone_surrogate_from_the_backend_is_replaced_and_stdio_serves_on(tmp_path: Path, stream: bool) -> None:
    """It ended the stdio server (the SDK's writer cannot encode it), every call in flight with it."""
    with mock_backend(LONE_SURROGATE) as url:
        params = stdio_params("--config", str(config_for(tmp_path, url, stream=stream)), env={"OPENAI_API_KEY": "sk-t"})
        with anyio.fail_after(SESSION_TIMEOUT_S):
            async with Client(params) as client:
                first = await client.call_tool("infer", {"prompt": "one"})
                cached = await client.call_tool("infer", {"prompt": "one"})
                status = (await client.call_tool("pipeline_status", {})).structured_content
    for result in (first, cached):
        assert not result.is_error, result.content
        assert result.content[0].text == CLEANED  # type: ignore[union-attr]
    assert cached.structured_content is not None and cached.structured_content["cached"] is True
    assert status is not None and status["totals"]["completed"] == 2 and status["reconciles"]


@pytest.mark.anyio
async def test_a_lone_surrogate_from_the_backend_reaches_an_http_caller_cleaned(tmp_path: Path) -> None:
    """Over HTTP the caller got a 200 with an empty body, counted as completed, and cached."""
    with (
        mock_backend(LONE_SURROGATE) as url,
        http_server(
            "--config", str(config_for(tmp_path, url, stream=True)), workdir=tmp_path, env={"OPENAI_API_KEY": "sk-t"}
        ) as server,
    ):
        with anyio.fail_after(SESSION_TIMEOUT_S):
            async with Client(server.mcp_url) as client:
                result = await client.call_tool("infer", {"prompt": "over http"})
    assert not result.is_error, result.content
    assert result.content[0].text == CLEANED  # type: ignore[union-attr]


def test_the_mock_answers_its_own_text_by_default() -> None:
    """As bench/gateway.py runs it (an --answer-json that parsed its default broke the benchmark)."""
    with mock_backend(None) as url:
        body = {"model": "mock-gpt", "messages": [{"role": "user", "content": "hi"}]}
        answer = httpx2.post(f"{url}/chat/completions", json=body, timeout=10).json()
    assert answer["choices"][0]["message"]["content"] == ANSWER


# ---------------------------------------------------------------------------- the parsers


def test_only_lone_surrogates_are_replaced() -> None:
    assert backend_json('{"a": ["x\\udc00y", {"\\ud83d\\ude00": "\\ud83d"}]}') == {"a": ["x\ufffdy", {"😀": "\ufffd"}]}
    assert backend_json(b'{"text": "plain \\u00e9"}') == {"text": "plain é"}
    raw = backend_json(b'{"a": "x\xed\xa0\x80y"}')["a"]  # a surrogate's own bytes, not escaped
    assert raw.encode("utf-8") and raw.startswith("x") and raw.endswith("y")
    with pytest.raises(ValueError):
        backend_json("{not json")
    with pytest.raises(ValueError):  # RecursionError escaped as a worker error with a huge traceback
        backend_json("[" * 5000 + "]" * 5000)
    with pytest.raises(ValueError):
        backend_json("[" * 900 + '"\\ud800"' + "]" * 900)


def test_message_content_is_its_text_parts_or_a_malformed_response() -> None:
    """Content given as parts was shown as Python's repr of the list, reasoning parts included."""

    def answer(content: Any) -> dict[str, Any]:
        return {"choices": [{"index": 0, "message": {"content": content}, "finish_reason": "stop"}]}

    parts = [{"type": "reasoning", "text": "secret thoughts"}, {"type": "text", "text": "hello"}, {"type": "text"}]
    assert completion_chunk(ENDPOINT, answer(parts)).text == "hello"
    assert completion_chunk(ENDPOINT, answer(None)).text == ""
    for content in ({"k": "v"}, 12345, ["text"]):
        with pytest.raises(WorkerError) as caught:
            completion_chunk(ENDPOINT, answer(content))
        assert "the message content is neither text nor a list of parts" in str(caught.value)


def _events(*payloads: Any) -> httpx2.AsyncClient:
    body = b"".join(b"data: " + json.dumps(p).encode() + b"\n\n" for p in payloads) + b"data: [DONE]\n\n"

    async def chunks() -> AsyncIterator[bytes]:
        yield body

    async def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=chunks())

    return httpx2.AsyncClient(transport=httpx2.MockTransport(handler))


async def _chat_stream(*payloads: Any) -> list[Chunk]:
    async with _events(*payloads) as client, open_event_stream(client, ENDPOINT, "/chat", {}) as events:
        return [chunk async for chunk in read_chat_stream(ENDPOINT, events)]


def _choice(finish: Any) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": finish}]}


BAD_FINISH_REASONS = [{"nested": "sk-secret"}, "x" * 65, 3, "line\nbreak"]
BAD_COUNTS = [-5, True, MAX_TOKEN_COUNT + 1, 2.5, "12"]


@pytest.mark.anyio
@pytest.mark.parametrize("finish", BAD_FINISH_REASONS, ids=["object", "long", "number", "control"])
async def test_a_finish_reason_that_is_not_a_short_text_is_a_malformed_response(finish: Any) -> None:
    with pytest.raises(WorkerError) as caught:
        await _chat_stream(_choice(finish))
    assert "malformed response: the finish reason is not a short text" in str(caught.value)
    assert "sk-secret" not in str(caught.value) and not caught.value.retryable
    with pytest.raises(WorkerError):
        completion_chunk(ENDPOINT, {"choices": [{"index": 0, "message": {"content": "hi"}, "finish_reason": finish}]})
    with pytest.raises(WorkerError):
        message_chunk(ENDPOINT, {"content": [{"type": "text", "text": "hi"}], "stop_reason": finish})


@pytest.mark.anyio
@pytest.mark.parametrize("count", BAD_COUNTS, ids=["negative", "boolean", "huge", "float", "text"])
async def test_a_token_count_that_is_not_one_is_a_malformed_response(count: Any) -> None:
    usage = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": count}}
    with pytest.raises(WorkerError) as caught:
        await _chat_stream(_choice("stop"), usage)
    assert "usage.completion_tokens is not a token count" in str(caught.value)
    with pytest.raises(WorkerError) as caught:
        message_chunk(ENDPOINT, {"content": [], "usage": {"input_tokens": count, "output_tokens": 1}})
    assert "usage.input_tokens is not a token count" in str(caught.value)


@pytest.mark.anyio
async def test_good_counts_and_reasons_pass_unchanged() -> None:
    usage = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 0}}
    chunks = await _chat_stream(_choice("length"), usage)
    assert [c.text for c in chunks] == ["hi", ""]
    assert chunks[-1].finish_reason == "length" and chunks[-1].usage is not None
    assert (chunks[-1].usage.input_tokens, chunks[-1].usage.output_tokens) == (3, 0)
    answer = {"content": [{"type": "text", "text": "hi"}], "stop_reason": "end_turn", "usage": {"input_tokens": 2}}
    assert message_chunk(ENDPOINT, answer).finish_reason == "stop"


@pytest.mark.anyio
async def test_the_anthropic_stream_checks_its_stop_reason() -> None:
    events = [
        {"type": "message_start", "message": {"usage": {"input_tokens": 1, "output_tokens": 0}}},
        {"type": "message_delta", "delta": {"stop_reason": {"x": 1}}, "usage": {"output_tokens": 1}},
        {"type": "message_stop"},
    ]
    async with _events(*events) as client, open_event_stream(client, ENDPOINT, "/messages", {}) as stream:
        with pytest.raises(WorkerError) as caught:
            _ = [chunk async for chunk in read_messages_stream(ENDPOINT, stream)]
    assert "the finish reason is not a short text" in str(caught.value)


def test_a_lone_surrogate_in_a_backend_error_message_is_dropped() -> None:
    error = taxonomy.status_error("b", 400, b'{"error": {"message": "bad \\udc00 input"}}', {}, ())
    assert "bad input" in str(error)
    str(error).encode("utf-8")  # what the SDK's writer does with it
