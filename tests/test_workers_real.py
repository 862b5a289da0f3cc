"""Every HTTP worker kind against the real llama-server (Gemma 3 270M), through a real MCP client.

The model's wording is poor and not asserted; the protocol is: text arrives as progress
notifications in order before the result, tokens are counted, temperature 0 + seed repeat,
parameters reach the backend with the right precedence, and configure_worker swaps
kinds under traffic or refuses an unreachable backend while keeping the old one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anyio
import pytest
from mcp import Client

from mcp_orchestrator.config import Config
from tests.conftest import error_text, make_config, running, status_of, with_progress
from tests.support_processes import free_port

if TYPE_CHECKING:
    from tests.support_fault_server import FaultServer
    from tests.support_llama import LlamaServer

pytestmark = pytest.mark.anyio
pytest_plugins = ("tests.support_llama", "tests.support_fault_server")  # the `llama` and `fault_server` fixtures

KINDS = ("open_ai", "anthropic", "llama_cpp", "vllm")
PROMPT = "Say hi"
"""The model keeps talking after this prompt, so max_tokens is what ends the answer."""


def base_url(kind: str, root: str) -> str:
    """open_ai takes the /v1 prefix in its base URL (like the OpenAI SDK); the others the server root."""
    return f"{root}/v1" if kind == "open_ai" else root


def config_for(kind: str, url: str, **inference: Any) -> Config:
    return make_config(
        stages={"inference": {"worker": kind, "base_url": url, "max_tokens": 8, "temperature": 0, **inference}},
        resilience={"retry_attempts": 0},
    )


async def infer(client: Client, prompt: str = PROMPT, **arguments: Any) -> dict[str, Any]:
    result = await client.call_tool("infer", {"prompt": prompt, "cache": False, "dedup": False, **arguments})
    assert not result.is_error, error_text(result)
    assert result.structured_content is not None
    return result.structured_content


@pytest.mark.parametrize("kind", KINDS)
async def test_infer_through_each_worker_kind(kind: str, llama: LlamaServer) -> None:
    async with running(config_for(kind, base_url(kind, llama.root), seed=7)) as (_, client):
        progress: list[tuple[float, str]] = []

        async def on_progress(value: float, total: float | None, message: str | None) -> None:
            progress.append((value, message or ""))

        result = await client.call_tool(
            "infer", {"prompt": PROMPT, "cache": False, "dedup": False}, **with_progress(on_progress)
        )
        assert not result.is_error, error_text(result)
        answer = result.structured_content
        assert answer is not None
        # Chunks arrived as progress notifications, in order, all before the result.
        assert len(progress) >= 2, progress
        assert [value for value, _ in progress] == sorted({value for value, _ in progress})
        assert "".join(text for _, text in progress).strip() == answer["text"] != ""
        assert answer["worker"] == kind
        assert answer["usage"]["input_tokens"] > 0
        assert 0 < answer["usage"]["output_tokens"] <= 8
        assert answer["finish_reason"] in ("length", "stop")

        # Temperature 0 (+ seed where the API has one) repeats. Compared once the server's
        # prompt cache holds the prompt: a cold first evaluation can differ in the last bits.
        again, third = await infer(client), await infer(client)
        assert again["text"] == third["text"] != ""
        assert again["request_id"] != third["request_id"]


@pytest.mark.parametrize("kind", KINDS)
async def test_non_streaming_mode_gives_the_same_answer(kind: str, llama: LlamaServer) -> None:
    url = base_url(kind, llama.root)
    async with running(config_for(kind, url)) as (_, client):
        await infer(client)  # warm the server's prompt cache, as in the test above
        streamed = await infer(client)
    async with running(config_for(kind, url, stream=False)) as (_, client):
        whole = await infer(client)
    assert whole["text"] == streamed["text"]
    assert whole["usage"] == streamed["usage"]
    assert whole["finish_reason"] == streamed["finish_reason"]


async def test_parameters_come_from_the_call_then_configure_worker_then_the_config(
    fault_server: FaultServer,
) -> None:
    config = make_config(
        stages={"inference": {"max_tokens": 6, "temperature": 0.3, "top_p": 0.9}},
        resilience={"retry_attempts": 0},
        security=origins(fault_server.root),
    )
    async with running(config) as (_, client):
        configured = await client.call_tool(
            "configure_worker",
            {
                "kind": "llama_cpp",
                "base_url": fault_server.url("proxy", "precedence"),
                "temperature": 0,
                "seed": 11,
                "system": "Answer briefly.",
            },
        )
        assert not configured.is_error, error_text(configured)
        first = await infer(client)
        second = await infer(client, max_tokens=3, temperature=0.5)
    sent = [r.body for r in fault_server.recorded("precedence", "/v1/chat/completions")]
    assert len(sent) == 2
    # configure_worker's temperature and seed over the config's; the config's max_tokens and top_p below them.
    assert (sent[0]["temperature"], sent[0]["seed"], sent[0]["max_tokens"], sent[0]["top_p"]) == (0, 11, 6, 0.9)
    assert sent[0]["messages"][0] == {"role": "system", "content": "Answer briefly."}
    assert sent[0]["stream"] is True and sent[0]["stream_options"] == {"include_usage": True}
    # The call's own values win.
    assert (sent[1]["temperature"], sent[1]["max_tokens"], sent[1]["seed"]) == (0.5, 3, 11)
    assert first["usage"]["output_tokens"] <= 6
    assert second["usage"]["output_tokens"] <= 3


def origins(*urls: str) -> dict[str, Any]:
    """[security] allowing these origins to configure_worker (the servers here listen on random ports)."""
    return {"worker_origins": [url.split("://", 1)[1].split("/", 1)[0] for url in urls]}


async def test_configure_worker_swaps_to_each_kind_while_traffic_runs(llama: LlamaServer) -> None:
    config = make_config(resilience={"retry_attempts": 0}, security=origins(llama.root))
    async with running(config) as (_, client):
        results: list[Any] = []
        done = anyio.Event()

        async def traffic(lane: int) -> None:
            count = 0
            while not done.is_set():
                arguments = {"prompt": f"{PROMPT} {lane} {count}", "max_tokens": 4, "cache": False, "dedup": False}
                results.append(await client.call_tool("infer", arguments))
                count += 1

        async with anyio.create_task_group() as tg:
            tg.start_soon(traffic, 1)
            tg.start_soon(traffic, 2)
            for kind in KINDS:
                swapped = await client.call_tool(
                    "configure_worker", {"kind": kind, "base_url": base_url(kind, llama.root), "temperature": 0}
                )
                assert not swapped.is_error, error_text(swapped)
                assert swapped.structured_content is not None
                assert swapped.structured_content["kind"] == kind
                assert (await infer(client, max_tokens=4))["worker"] == kind
            done.set()
        failed = [error_text(r) for r in results if r.is_error]
        assert not failed, failed
        served_by = {r.structured_content["worker"] for r in results}
        assert len(served_by) >= 3, served_by  # the background traffic crossed several swaps
        assert (await status_of(client))["worker"]["kind"] == "vllm"


async def test_configure_worker_refuses_an_unreachable_backend_and_keeps_the_old_one(llama: LlamaServer) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    config = make_config(resilience={"retry_attempts": 0}, security=origins(llama.root, dead))
    async with running(config) as (_, client):
        ok = await client.call_tool("configure_worker", {"kind": "llama_cpp", "base_url": llama.root})
        assert not ok.is_error, error_text(ok)
        for kind in KINDS:
            refused = await client.call_tool("configure_worker", {"kind": kind, "base_url": base_url(kind, dead)})
            message = error_text(refused)
            assert f"the new {kind} worker failed its health check, old worker kept" in message
            assert "cannot connect" in message and dead in message
        status = await status_of(client)
        assert status["worker"]["kind"] == "llama_cpp"
        assert status["worker"]["base_url"] == llama.root
        assert (await infer(client, max_tokens=2))["worker"] == "llama_cpp"


async def test_configure_worker_refuses_origins_nobody_named_without_contacting_them(llama: LlamaServer) -> None:
    async with running() as (_, client):  # the default origins: llama-server here is on a random port
        for options in (
            {"kind": "open_ai", "base_url": "https://attacker.example/v1"},
            {"kind": "llama_cpp", "base_url": llama.root},
        ):
            message = error_text(await client.call_tool("configure_worker", options))
            assert "base_url: " in message and "is not an origin configure_worker may reach" in message
            assert "[security] worker_origins" in message
        assert (await status_of(client))["worker"]["kind"] == "echo"
