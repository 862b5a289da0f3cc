"""Backend faults, through a real MCP client: each gives a clear, classified error and nothing hangs.

The faults come from tests/support_fault_server.py, which relays the real llama-server's
own bytes and breaks them on command; its synthetic error answers are checked here
against the real server's.
"""

from __future__ import annotations

import json
import logging
import socket
from typing import TYPE_CHECKING, Any

import httpx2
import pytest

from mcp_orchestrator.config import Config
from mcp_orchestrator.models import GenerationParams, Message
from mcp_orchestrator.workers.base import WorkerError, WorkerRequest
from mcp_orchestrator.workers.registry import build_worker
from tests.conftest import error_text, make_config, running, status_of

if TYPE_CHECKING:
    from tests.support_fault_server import FaultServer
    from tests.support_llama import LlamaServer

pytestmark = pytest.mark.anyio
pytest_plugins = ("tests.support_llama", "tests.support_fault_server")

OPENAI_KEY = "sk-test-RECOGNISABLE-0penai-5ecret-7f3a9c"
ANTHROPIC_KEY = "sk-ant-test-RECOGNISABLE-anthr0pic-5ecret-2b8e1d"
KINDS = ("open_ai", "anthropic")


def url_for(kind: str, server: FaultServer, *scenario: str | int) -> str:
    root = server.url(*scenario)
    return f"{root}/v1" if kind == "open_ai" else root


def fault_config(kind: str, url: str, read_timeout_s: float = 30) -> Config:
    return make_config(
        stages={
            "inference": {"worker": kind, "base_url": url, "max_tokens": 8, "http": {"read_timeout_s": read_timeout_s}}
        },
        resilience={"retry_attempts": 0, "circuit_breaker_threshold": 1000},
    )


async def infer_error(config: Config) -> str:
    async with running(config) as (_, client):
        result = await client.call_tool("infer", {"prompt": "Say hi", "cache": False, "dedup": False})
        return error_text(result)


# ---------------------------------------------------------------------------- the fault server is faithful


def raw_exchange(port: int, request: bytes) -> tuple[list[str], bytes]:
    """Send raw bytes, read until the server closes: (header lines, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return head.decode("latin-1").split("\r\n"), body


def shape(value: Any) -> Any:
    """The structure of a JSON value: keys and types, not contents."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [shape(item) for item in value[:1]]
    return type(value).__name__


def error_request(path: str) -> bytes:
    body = b'{"messages": "not a list"}'
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body


def test_synthetic_errors_look_like_the_real_servers(llama: LlamaServer, fault_server: FaultServer) -> None:
    real_head, real_body = raw_exchange(llama.port, error_request("/v1/chat/completions"))
    fake_head, fake_body = raw_exchange(fault_server.port, error_request("/status/400/v1/chat/completions"))
    assert real_head[0] == "HTTP/1.1 400 Bad Request" == fake_head[0]
    assert [line.split(":")[0] for line in real_head[1:]] == [line.split(":")[0] for line in fake_head[1:]]
    assert {line for line in real_head if not line.startswith("Content-Length")} == {
        line for line in fake_head if not line.startswith("Content-Length")
    }
    assert shape(json.loads(real_body)) == shape(json.loads(fake_body))
    assert json.loads(fake_body)["error"]["type"] == json.loads(real_body)["error"]["type"]


def test_relayed_streams_are_the_real_servers_bytes(llama: LlamaServer, fault_server: FaultServer) -> None:
    body = {"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4, "temperature": 0, "stream": True}
    direct = httpx2.post(f"{llama.root}/v1/chat/completions", json=body, timeout=60)
    relayed = httpx2.post(fault_server.url("proxy", "bytes") + "/v1/chat/completions", json=body, timeout=60)
    assert relayed.headers["content-type"] == direct.headers["content-type"] == "text/event-stream"

    def events(text: str) -> list[Any]:
        frames = [frame for frame in text.split("\n\n") if frame]
        assert all(frame.startswith("data: ") for frame in frames)
        return [frame for frame in frames if frame == "data: [DONE]"] + [
            shape({k: v for k, v in json.loads(frame[6:]).items() if k != "timings"})
            for frame in frames
            if frame != "data: [DONE]"
        ]

    assert events(relayed.text) == events(direct.text)


# ---------------------------------------------------------------------------- each fault, each API


@pytest.mark.parametrize("kind", KINDS)
async def test_401_is_permanent_and_names_the_backend_status_and_message(kind: str, fault_server: FaultServer) -> None:
    message = await infer_error(fault_config(kind, url_for(kind, fault_server, "status", 401)))
    assert f"{kind} at {fault_server.root}/status/401" in message
    assert "(HTTP 401), permanent" in message
    assert "authentication_error" in message and "Missing API Key" in message


@pytest.mark.parametrize("kind", KINDS)
async def test_429_with_retry_after_is_retryable_and_parsed(kind: str, fault_server: FaultServer) -> None:
    message = await infer_error(fault_config(kind, url_for(kind, fault_server, "status", 429, "retry-after", 7)))
    assert "(HTTP 429), retryable" in message
    assert "rate_limit_error" in message and "retry after 7 s" in message

    worker = build_worker(kind, {"base_url": url_for(kind, fault_server, "status", 429, "retry-after-date", 120)})
    request = WorkerRequest((Message(role="user", content="hi"),), GenerationParams(max_tokens=2))
    with pytest.raises(WorkerError) as caught:
        async for _ in worker.generate(request):
            pass
    await worker.aclose()
    assert caught.value.retryable and caught.value.status == 429
    assert caught.value.retry_after_s is not None and 60 < caught.value.retry_after_s <= 120  # an HTTP date


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("status", "words"), [(500, "server_error"), (503, "Loading model"), (529, "Overloaded")])
async def test_server_errors_are_retryable(kind: str, status: int, words: str, fault_server: FaultServer) -> None:
    message = await infer_error(fault_config(kind, url_for(kind, fault_server, "status", status)))
    assert f"(HTTP {status}), retryable" in message and words in message


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("scenario", "expected"),
    [
        (("malformed", 2), "permanent: malformed response: event data is not JSON"),
        (("reset", 2), "retryable: the connection broke while reading the answer"),
        (("truncate", 2), "retryable: the stream ended before"),
        (("html",), "permanent: malformed response: expected an SSE stream, content-type is 'text/html'"),
    ],
)
async def test_broken_streams_fail_clearly(
    kind: str, scenario: tuple[Any, ...], expected: str, fault_server: FaultServer
) -> None:
    message = await infer_error(fault_config(kind, url_for(kind, fault_server, *scenario)))
    assert expected in message, message
    assert ("captive portal" not in message and "not shown" in message) or scenario[0] in ("reset", "truncate")


@pytest.mark.parametrize(("kind", "expected"), [("open_ai", "(HTTP 500)"), ("anthropic", "(HTTP 529)")])
async def test_an_error_event_inside_the_stream_is_reported(
    kind: str, expected: str, fault_server: FaultServer
) -> None:
    message = await infer_error(fault_config(kind, url_for(kind, fault_server, "event-error", 2)))
    assert expected in message and "retryable: error in the stream" in message


@pytest.mark.parametrize("kind", KINDS)
async def test_a_stalled_stream_hits_the_read_timeout_instead_of_hanging(kind: str, fault_server: FaultServer) -> None:
    message = await infer_error(fault_config(kind, url_for(kind, fault_server, "stall", 2), read_timeout_s=0.5))
    assert "retryable: the backend sent nothing within the read timeout" in message


async def test_a_dead_backend_is_a_retryable_connection_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound but not listening: connections are refused
        message = await infer_error(fault_config("llama_cpp", f"http://127.0.0.1:{port}"))
    assert "retryable: cannot connect" in message


# ---------------------------------------------------------------------------- secrets


async def test_api_keys_never_appear_in_any_output(
    fault_server: FaultServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)
    monkeypatch.setenv("ANTHROPIC_API_KEY", ANTHROPIC_KEY)
    caplog.set_level(logging.DEBUG)
    seen: list[str] = []
    for kind in KINDS:
        # Configured by the operator, so the key is sent; the backend echoes it in its 401 message.
        config = fault_config(kind, url_for(kind, fault_server, "status", 401, "echo", kind))
        async with running(config) as (orchestrator, client):
            failed = await client.call_tool("infer", {"prompt": "hi", "cache": False, "dedup": False})
            seen.append(error_text(failed))
            assert "[redacted]" in seen[-1]  # the echoed key was there, and was removed
            seen.append(json.dumps(await status_of(client)))
            letters = await client.call_tool("dead_letters", {})
            seen.append(json.dumps(letters.structured_content))
            swapped = await client.call_tool(
                "configure_worker", {"kind": kind, "base_url": url_for(kind, fault_server, "proxy", f"keys-{kind}")}
            )
            seen.append(json.dumps(swapped.structured_content) if not swapped.is_error else error_text(swapped))
            seen.append(orchestrator.pipeline.metrics.render().decode())
    received = [r.headers for r in fault_server.requests if "echo" in r.scenario]
    assert any(OPENAI_KEY in h.get("authorization", "") for h in received)  # the test really had keys to leak
    assert any(h.get("x-api-key") == ANTHROPIC_KEY for h in received)
    seen.append(caplog.text)
    for output in seen:
        assert OPENAI_KEY not in output and ANTHROPIC_KEY not in output


async def test_a_tool_configured_worker_does_not_send_the_key_to_a_host_the_operator_did_not_name(
    fault_server: FaultServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)
    # The operator allowed configure_worker to reach this origin, but never named it as a backend:
    # a worker may reach it, the key may not.
    allowed = {"worker_origins": [fault_server.root.removeprefix("http://")]}
    async with running(make_config(resilience={"retry_attempts": 0}, security=allowed)) as (_, client):
        url = url_for("open_ai", fault_server, "proxy", "withheld")
        swapped = await client.call_tool("configure_worker", {"kind": "open_ai", "base_url": url})
        assert not swapped.is_error, error_text(swapped)
        assert swapped.structured_content is not None
        assert swapped.structured_content["settings"]["api_key"] == "withheld"
        result = await client.call_tool("infer", {"prompt": "Say hi", "max_tokens": 2, "cache": False})
        assert not result.is_error, error_text(result)
    sent = fault_server.recorded("withheld")
    assert sent and all("authorization" not in r.headers for r in sent)


def retrying_config(url: str, retries: int) -> Config:
    return make_config(
        stages={"inference": {"worker": "llama_cpp", "base_url": url, "max_tokens": 2}},
        resilience={
            "retry_attempts": retries,
            "retry_base_ms": 1,
            "retry_max_ms": 2,
            "circuit_breaker_threshold": 1000,
        },
    )


async def test_a_request_the_backend_read_is_a_backend_call_and_is_sent_again_only_by_the_retry_policy(
    fault_server: FaultServer,
) -> None:
    """The backend read the whole request, then closed the connection without an answer:
    it may have acted on it (and billed it), so the transport does not quietly send it
    again. Each send is one call of the retry policy, counted in `attempts`, provenance and
    the breaker, and one request never costs more than retry_attempts + 1 calls (the
    transport used to re-send each call twice more: 12 calls for retry_attempts = 3)."""
    async with running(retrying_config(fault_server.url("disconnect", "stale", 2), retries=2)) as (
        orchestrator,
        client,
    ):
        result = await client.call_tool("infer", {"prompt": "Say hi", "cache": False})
        assert not result.is_error, error_text(result)
        assert result.structured_content is not None
        assert result.structured_content["provenance"]["attempts"] == 3
        assert result.structured_content["provenance"]["retries"] == 2
        breaker = orchestrator.status().breakers[0]
        assert (breaker.failures, breaker.successes) == (2, 1), breaker
    assert fault_server.count("stale") == 3

    async with running(retrying_config(fault_server.url("disconnect", "gone", 100), retries=3)) as (_, client):
        failed = await client.call_tool("infer", {"prompt": "Say hi", "cache": False, "dedup": False})
        message = error_text(failed)
    assert "retryable: the connection broke while reading the answer" in message
    assert "gave up after 4 call(s)" in message
    assert fault_server.count("gone") == 4
