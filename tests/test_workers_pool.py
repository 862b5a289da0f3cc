"""Pools and fallback chains over the real llama-server, through a real MCP client.

Replicas are recording proxies in front of the one real server (tests/support_fault_server.py),
so every request can be attributed to the replica that received it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anyio
import pytest
from mcp import Client

from mcp_orchestrator.config import Config
from tests.conftest import error_text, make_config, running, status_of, wait_for, with_progress
from tests.support_processes import free_port

if TYPE_CHECKING:
    from tests.support_fault_server import FaultServer
    from tests.support_llama import LlamaServer

pytestmark = pytest.mark.anyio
pytest_plugins = ("tests.support_llama", "tests.support_fault_server")


def composite_config(worker: str, **options: Any) -> Config:
    return make_config(
        stages={"inference": {"worker": worker, "max_tokens": 1, "temperature": 0, **options}},
        resilience={"retry_attempts": 0, "circuit_breaker_threshold": 1000},
    )


def replica(server: FaultServer, *scenario: str | int) -> dict[str, Any]:
    return {"kind": "llama_cpp", "base_url": server.url(*scenario)}


async def infer(client: Client, prompt: str = "Say hi", **arguments: Any) -> dict[str, Any]:
    result = await client.call_tool("infer", {"prompt": prompt, "cache": False, "dedup": False, **arguments})
    assert not result.is_error, error_text(result)
    assert result.structured_content is not None
    return result.structured_content


async def test_round_robin_spreads_requests_evenly(fault_server: FaultServer) -> None:
    config = composite_config(
        "pool", strategy="round_robin", replicas=[replica(fault_server, "proxy", f"rr-{n}") for n in "ab"]
    )
    async with running(config) as (_, client):
        for _ in range(6):
            assert (await infer(client))["worker"] == "pool"
        replicas = (await status_of(client))["worker"]["replicas"]
    assert (fault_server.count("rr-a"), fault_server.count("rr-b")) == (3, 3)
    assert [r["requests"] for r in replicas] == [3, 3]


async def test_least_loaded_avoids_the_busy_replica(fault_server: FaultServer) -> None:
    config = composite_config(
        "pool",
        strategy="least_loaded",
        replicas=[replica(fault_server, "hold", "ll-busy"), replica(fault_server, "proxy", "ll-free")],
    )
    async with running(config) as (_, client), anyio.create_task_group() as tg:
        tg.start_soon(infer, client, "Say hi slowly")
        await wait_for(lambda: fault_server.count("ll-busy") == 1)  # held at the busy replica
        for _ in range(3):
            await infer(client)
        busy_in_flight = (await status_of(client))["worker"]["replicas"][0]["in_flight"]
        fault_server.release("ll-busy")
    assert busy_in_flight == 1
    # Round robin would have sent a second request to the busy replica.
    assert (fault_server.count("ll-busy"), fault_server.count("ll-free")) == (1, 3)


async def test_session_affinity_keeps_each_session_on_one_replica(fault_server: FaultServer) -> None:
    labels = [f"sa-{n}" for n in "abc"]
    config = composite_config(
        "pool", strategy="session_affinity", replicas=[replica(fault_server, "proxy", label) for label in labels]
    )
    sessions = [f"user-{n}" for n in range(12)]
    async with running(config) as (_, client):
        for _ in range(2):
            for session in sessions:
                await infer(client, f"Say hi to {session}.", session_id=session)
    where: dict[str, set[str]] = {}
    for label in labels:
        for record in fault_server.recorded(label, "/v1/chat/completions"):
            prompt = record.body["messages"][-1]["content"]
            where.setdefault(prompt, set()).add(label)
    assert len(where) == len(sessions)
    assert all(len(replicas) == 1 for replicas in where.values()), where  # never split
    assert len({next(iter(replicas)) for replicas in where.values()}) >= 2  # and spread


async def test_a_pool_can_mix_kinds(llama: LlamaServer) -> None:
    replicas = [
        {"kind": "open_ai", "base_url": f"{llama.root}/v1"},
        {"kind": "anthropic", "base_url": llama.root},
        {"kind": "vllm", "base_url": llama.root},
    ]
    async with running(composite_config("pool", replicas=replicas)) as (_, client):
        for _ in range(3):
            assert (await infer(client))["usage"]["output_tokens"] > 0
        kinds = [(r["kind"], r["requests"]) for r in (await status_of(client))["worker"]["replicas"]]
    assert kinds == [("open_ai", 1), ("anthropic", 1), ("vllm", 1)]


async def test_fallback_moves_from_a_dead_backend_to_the_live_one(fault_server: FaultServer) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    members = [{"kind": "llama_cpp", "base_url": dead}, replica(fault_server, "proxy", "fb-live")]
    async with running(composite_config("fallback", members=members)) as (_, client):
        answer = await infer(client)
        chain = (await status_of(client))["worker"]["members"]
    assert answer["worker"] == "fallback" and answer["usage"]["output_tokens"] > 0
    assert fault_server.count("fb-live") == 1
    assert [(m["failed"], m["served"]) for m in chain] == [(1, 0), (0, 1)]


async def test_fallback_does_not_move_on_after_a_permanent_error(fault_server: FaultServer) -> None:
    members = [replica(fault_server, "status", 401), replica(fault_server, "proxy", "fb-never")]
    async with running(composite_config("fallback", members=members)) as (_, client):
        result = await client.call_tool("infer", {"prompt": "Say hi", "cache": False})
    assert "(HTTP 401), permanent" in error_text(result)
    assert fault_server.count("fb-never") == 0


async def test_fallback_never_switches_backends_mid_answer(fault_server: FaultServer) -> None:
    members = [replica(fault_server, "reset", 3), replica(fault_server, "proxy", "fb-mid")]
    config = composite_config("fallback", members=members)
    config.stages.inference.max_tokens = 16
    async with running(config) as (_, client):
        chunks: list[str] = []

        async def on_progress(value: float, total: float | None, message: str | None) -> None:
            chunks.append(message or "")

        result = await client.call_tool("infer", {"prompt": "Say hi", "cache": False}, **with_progress(on_progress))
    message = error_text(result)
    assert "failed after its answer had started streaming; not switching members mid-answer" in message
    assert "the connection broke while reading the answer" in message
    assert chunks  # part of the first member's answer had reached the caller
    assert fault_server.count("fb-mid") == 0


async def test_all_members_failing_is_one_retryable_error_listing_each(fault_server: FaultServer) -> None:
    members = [replica(fault_server, "status", 503), replica(fault_server, "status", 429, "retry-after", 4)]
    async with running(composite_config("fallback", members=members)) as (_, client):
        result = await client.call_tool("infer", {"prompt": "Say hi", "cache": False})
    message = error_text(result)
    assert "fallback, retryable: all 2 members failed" in message
    assert "member 0" in message and "HTTP 503" in message and "member 1" in message and "HTTP 429" in message
    assert "retry after 4 s" in message


async def test_configure_worker_builds_pools_and_chains_and_checks_their_health(
    llama: LlamaServer, fault_server: FaultServer
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    allowed = {"worker_origins": [llama.root.removeprefix("http://"), dead.removeprefix("http://")]}
    async with running(make_config(resilience={"retry_attempts": 0}, security=allowed)) as (_, client):
        pool = await client.call_tool(
            "configure_worker",
            {
                "kind": "pool",
                "strategy": "session_affinity",
                "replicas": [{"kind": "llama_cpp", "base_url": llama.root}, {"kind": "vllm", "base_url": dead}],
            },
        )
        message = error_text(pool)
        assert "1 of 2 replicas failed the health check" in message and "replica 1 (vllm" in message
        assert (await status_of(client))["worker"]["kind"] == "echo"  # nothing changed

        bad = await client.call_tool(
            "configure_worker", {"kind": "pool", "replicas": [{"kind": "llama_cpp", "temperature": 9}]}
        )
        assert "replicas.0.temperature" in error_text(bad)

        chain = await client.call_tool(
            "configure_worker",
            {
                "kind": "fallback",
                "members": [{"kind": "llama_cpp", "base_url": dead}, {"kind": "llama_cpp", "base_url": llama.root}],
                "max_tokens": 3,
            },
        )
        assert "max_tokens: not an option of worker kind 'fallback'" in error_text(chain)
        chain = await client.call_tool(
            "configure_worker",
            {
                "kind": "fallback",
                "members": [
                    {"kind": "llama_cpp", "base_url": dead},
                    {"kind": "llama_cpp", "base_url": llama.root, "max_tokens": 3},
                ],
            },
        )
        assert not chain.is_error, error_text(chain)  # a chain needs one live member
        answer = await infer(client)
        assert answer["worker"] == "fallback" and answer["usage"]["output_tokens"] <= 3
