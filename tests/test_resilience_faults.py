"""Resilience end to end: real HTTP workers, a real model server behind a fault-injecting
server, real MCP client sessions. Waits are measured on an injected clock, never timed.

Each test scripts its own label on the fault server (tests/support_faults_extra.py), so
the answers it relays come from the real llama-server and the failures are byte-compatible
with it.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from mcp import Client

from mcp_orchestrator import Orchestrator
from mcp_orchestrator.config import Config, with_values
from tests.conftest import error_text, make_config, status_of, with_progress
from tests.support_faults_extra import FakeClock, ScriptedFaultServer, scripted_faults
from tests.support_llama import llama

__all__ = ["llama", "scripted_faults"]  # fixtures used by name

pytestmark = pytest.mark.anyio

_labels = itertools.count()
STALL_READ_TIMEOUT_S = 0.5


def label(name: str) -> str:
    return f"{name}-{next(_labels)}"


def config_for(worker: dict[str, Any], **resilience: Any) -> Config:
    """Small answers (fast), no shared answers (every call reaches the backend)."""
    return make_config(
        stages={"inference": {"max_tokens": 3, "temperature": 0, **worker}},
        resilience={"retry_base_ms": 100, "retry_max_ms": 1000, **resilience},
        deduplication={"enabled": False},
    )


def with_read_timeout(config: Config) -> Config:
    """A short read timeout, so a stalled stream ends quickly. Answers come from memory
    (the fault server replays recorded ones), so the timeout fires only where a test stalls."""
    return with_values(config, {"stages.inference.http.read_timeout_s": STALL_READ_TIMEOUT_S})


def open_ai_at(faults: ScriptedFaultServer, name: str) -> dict[str, Any]:
    return {"worker": "open_ai", "base_url": faults.url("script", name) + "/v1", "model": "gemma"}


@asynccontextmanager
async def serving(config: Config) -> AsyncIterator[tuple[Orchestrator, Client, FakeClock]]:
    clock = FakeClock(follow_loop=True)
    orchestrator = Orchestrator(config, clock=clock)
    async with orchestrator, Client(orchestrator.server) as client:
        yield orchestrator, client, clock
        assert orchestrator.pipeline.reconciles(), orchestrator.status().totals


async def infer(client: Client, prompt: str = "Say hi", *, watch: bool = False, **arguments: Any) -> Any:
    """Call infer; with `watch`, ask for progress, so chunks reach the caller while they arrive."""

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        return None

    progress = with_progress(on_progress) if watch else {}
    return await client.call_tool("infer", {"prompt": prompt, **arguments}, **progress)


def answer(result: Any) -> dict[str, Any]:
    assert not result.is_error, error_text(result)
    assert result.structured_content is not None
    data: dict[str, Any] = result.structured_content
    return data


# ---------------------------------------------------------------------------- retries


async def test_429_retry_after_is_honoured(scripted_faults: ScriptedFaultServer) -> None:
    name = label("429")
    scripted_faults.script(name, "429@2", "ok")
    async with serving(config_for(open_ai_at(scripted_faults, name))) as (_, client, clock):
        data = answer(await infer(client))
    assert data["text"]
    assert data["attempts"] == 2
    assert scripted_faults.generations(name) == 2
    assert clock.sleeps and clock.sleeps[0] >= 2.0  # the server's wait, not our 100 ms backoff
    provenance = data["provenance"]
    assert provenance["retries"] == 1
    assert [hop["status"] for hop in provenance["fallbacks"]] == [429]
    assert "Rate limit reached" in provenance["fallbacks"][0]["error"]


async def test_retry_after_as_an_http_date(scripted_faults: ScriptedFaultServer) -> None:
    name = label("429date")
    scripted_faults.script(name, "429@date:4", "ok")
    async with serving(config_for(open_ai_at(scripted_faults, name))) as (_, client, clock):
        data = answer(await infer(client))
    assert data["attempts"] == 2
    assert 2.0 <= clock.sleeps[0] <= 4.0  # an HTTP date has one-second resolution


@pytest.mark.parametrize("kind", ["open_ai", "anthropic", "llama_cpp"])
async def test_500_503_529_are_retried_with_bounded_backoff(scripted_faults: ScriptedFaultServer, kind: str) -> None:
    name = label(f"5xx-{kind}")
    scripted_faults.script(name, "500", "503", "529", "ok")
    base = scripted_faults.url("script", name) + ("/v1" if kind == "open_ai" else "")
    config = config_for({"worker": kind, "base_url": base, "model": "gemma"}, retry_attempts=3)
    async with serving(config) as (orchestrator, client, clock):
        data = answer(await infer(client))
        metrics = orchestrator.pipeline.metrics.render().decode()
    assert f'orchestrator_retries_total{{worker="{kind} at {base}"}} 3.0' in metrics
    assert data["attempts"] == 4
    assert scripted_faults.generations(name) == 4
    assert [hop["status"] for hop in data["provenance"]["fallbacks"]] == [500, 503, 529]
    ceilings = [0.1, 0.2, 0.4]  # full jitter under base * 2**n
    assert len(clock.sleeps) == 3
    assert all(0 <= wait <= cap for wait, cap in zip(clock.sleeps, ceilings, strict=True))


async def test_retries_stop_before_the_deadline_with_the_last_error(scripted_faults: ScriptedFaultServer) -> None:
    name = label("deadline")
    scripted_faults.script(name, "503@3")
    async with serving(config_for(open_ai_at(scripted_faults, name), retry_attempts=10)) as (_, client, clock):
        result = await infer(client, deadline_ms=5000)
        message = error_text(result)
        letters = (await client.call_tool("dead_letters", {})).structured_content
    # Calls at 0 s and 3 s; a second wait would end at 6 s > 5 s, so it fails at once.
    assert scripted_faults.generations(name) == 2
    assert clock.sleeps == [3.0]
    assert "HTTP 503" in message
    assert "gave up after 2 call(s): waiting to retry would pass the request's deadline" in message
    assert letters is not None and letters["entries"][0]["reason"] == "worker_error"


async def test_permanent_errors_are_neither_retried_nor_counted_by_the_breaker(
    scripted_faults: ScriptedFaultServer,
) -> None:
    name = label("401")
    scripted_faults.script(name, "401")
    config = config_for(open_ai_at(scripted_faults, name), circuit_breaker_threshold=2)
    async with serving(config) as (_, client, clock):
        for _ in range(4):
            message = error_text(await infer(client))
            assert "HTTP 401" in message and "permanent" in message
        (breaker,) = (await status_of(client))["breakers"]
    assert scripted_faults.generations(name) == 4  # one call per request: no retries
    assert clock.sleeps == []
    assert breaker["state"] == "closed"
    assert breaker["consecutive_failures"] == 0


# ---------------------------------------------------------------------------- the breaker


async def test_breaker_opens_fails_fast_half_opens_and_closes(scripted_faults: ScriptedFaultServer) -> None:
    name = label("breaker")
    scripted_faults.script(name, "500")
    config = config_for(
        open_ai_at(scripted_faults, name),
        retry_attempts=0,
        circuit_breaker_threshold=3,
        circuit_breaker_timeout_s=30,
        circuit_breaker_probes=2,
        circuit_breaker_success_rate=1.0,
    )
    async with serving(config) as (orchestrator, client, clock):
        for _ in range(3):
            assert "HTTP 500" in error_text(await infer(client))
        assert scripted_faults.generations(name) == 3

        clock.advance(10)
        message = error_text(await infer(client))
        backend = f"open_ai at {scripted_faults.url('script', name)}/v1"
        assert message.endswith(f"backend {backend} unavailable, circuit open, retry after 20 s")
        assert scripted_faults.generations(name) == 3  # the backend saw nothing while open
        (breaker,) = (await status_of(client))["breakers"]
        assert breaker | {"retry_after_s": 0} == breaker | {
            "name": backend,
            "state": "open",
            "rejected": 1,
            "times_opened": 1,
            "failures": 3,
            "retry_after_s": 0,
        }
        metrics = orchestrator.pipeline.metrics.render().decode()
        assert f'orchestrator_circuit_breaker_state{{worker="{backend}"}} 2.0' in metrics
        assert f'orchestrator_circuit_breaker_rejections_total{{worker="{backend}"}} 1.0' in metrics

        clock.advance(20)  # the timeout has passed: half-open, probes go through
        scripted_faults.script(name, "ok")
        first = answer(await infer(client))
        assert first["provenance"]["breaker"] == "half_open"
        second = answer(await infer(client))
        assert second["provenance"]["breaker"] == "closed"
        (breaker,) = (await status_of(client))["breakers"]
        assert breaker["state"] == "closed"
        metrics = orchestrator.pipeline.metrics.render().decode()
        assert f'orchestrator_circuit_breaker_state{{worker="{backend}"}} 0.0' in metrics
        assert f'orchestrator_circuit_breaker_transitions_total{{state="closed",worker="{backend}"}} 1.0' in metrics
    assert scripted_faults.generations(name) == 5


async def test_a_failed_probe_reopens_the_breaker(scripted_faults: ScriptedFaultServer) -> None:
    name = label("reopen")
    scripted_faults.script(name, "529")
    config = config_for(
        open_ai_at(scripted_faults, name),
        retry_attempts=0,
        circuit_breaker_threshold=1,
        circuit_breaker_timeout_s=5,
        circuit_breaker_probes=1,
    )
    async with serving(config) as (_, client, clock):
        assert "HTTP 529" in error_text(await infer(client))
        clock.advance(5)
        assert "HTTP 529" in error_text(await infer(client))  # the probe reached the backend and failed
        assert "circuit open, retry after 5 s" in error_text(await infer(client))
        (breaker,) = (await status_of(client))["breakers"]
    assert breaker["times_opened"] == 2
    assert scripted_faults.generations(name) == 2


# ---------------------------------------------------------------------------- timeouts and broken streams


async def test_slow_first_byte_hits_the_read_timeout_then_a_retry_answers(
    scripted_faults: ScriptedFaultServer,
) -> None:
    name = label("slow")
    scripted_faults.script(name, "slow:5000", "ok")
    async with serving(with_read_timeout(config_for(open_ai_at(scripted_faults, name)))) as (_, client, _clock):
        data = answer(await infer(client))
        (breaker,) = (await status_of(client))["breakers"]
    assert data["attempts"] == 2
    assert "sent nothing within the read timeout" in data["provenance"]["fallbacks"][0]["error"]
    assert breaker["failures"] == 1  # the slow call counted against the backend


async def test_reset_before_any_text_is_retried(scripted_faults: ScriptedFaultServer) -> None:
    name = label("reset0")
    scripted_faults.script(name, "reset:0", "ok")
    async with serving(config_for(open_ai_at(scripted_faults, name))) as (_, client, _clock):
        data = answer(await infer(client))
    assert data["attempts"] == 2


async def test_reset_mid_stream_after_text_reached_the_caller_is_not_retried(
    scripted_faults: ScriptedFaultServer,
) -> None:
    name = label("reset")
    scripted_faults.script(name, "reset:2", "ok")
    progress: list[str] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append(message or "")

    async with serving(config_for(open_ai_at(scripted_faults, name), retry_attempts=3)) as (_, client, _clock):
        result = await client.call_tool("infer", {"prompt": "Count to ten"}, **with_progress(on_progress))
        message = error_text(result)
        totals = (await status_of(client))["totals"]
    assert progress, "the caller got part of the answer before the reset"
    assert "had already been streamed to the caller" in message
    assert scripted_faults.generations(name) == 1
    assert totals["failed"] == 1


async def test_a_stalled_stream_is_cut_by_the_read_timeout(scripted_faults: ScriptedFaultServer) -> None:
    name = label("stall")
    scripted_faults.script(name, "stall:2", "ok")
    async with serving(with_read_timeout(config_for(open_ai_at(scripted_faults, name)))) as (_, client, _clock):
        message = error_text(await infer(client, "Count to ten", watch=True))
    assert "sent nothing within the read timeout" in message
    assert "not retried" in message  # text had reached the caller as progress
    assert scripted_faults.generations(name) == 1


@pytest.mark.parametrize("shared", [False, True], ids=["dedup-off", "dedup-on"])
async def test_a_stalled_stream_nobody_watched_is_retried(scripted_faults: ScriptedFaultServer, shared: bool) -> None:
    """Without a progress token no chunk reached the caller, so starting over repeats nothing;
    also when the call leads a flight that nobody else watches (coalescing on, the default)."""
    name = label("stall-quiet")
    scripted_faults.script(name, "stall:2", "ok")
    config = with_read_timeout(config_for(open_ai_at(scripted_faults, name)))
    config.deduplication.enabled = shared
    async with serving(config) as (_, client, _clock):
        data = answer(await infer(client, "Count to ten"))
    assert data["attempts"] == 2
    assert scripted_faults.generations(name) == 2


async def test_a_stall_before_any_text_is_retried(scripted_faults: ScriptedFaultServer) -> None:
    name = label("stall0")
    scripted_faults.script(name, "stall:0", "ok")
    async with serving(with_read_timeout(config_for(open_ai_at(scripted_faults, name)))) as (_, client, _clock):
        data = answer(await infer(client))
    assert data["attempts"] == 2


# ---------------------------------------------------------------------------- pools and fallback chains


async def test_fallback_moves_on_in_order_and_records_each_hop(scripted_faults: ScriptedFaultServer) -> None:
    first, second, third = label("fb-a"), label("fb-b"), label("fb-c")
    scripted_faults.script(first, "503")
    scripted_faults.script(second, "429@1")
    scripted_faults.script(third, "ok")
    members = [
        {"kind": "open_ai", "base_url": scripted_faults.url("script", first) + "/v1"},
        {"kind": "anthropic", "base_url": scripted_faults.url("script", second)},
        {"kind": "llama_cpp", "base_url": scripted_faults.url("script", third)},
    ]
    config = config_for({"worker": "fallback", "members": members}, circuit_breaker_threshold=2)
    async with serving(config) as (_, client, _clock):
        data = answer(await infer(client))
        assert data["worker"] == "fallback"
        provenance = data["provenance"]
        assert provenance["worker"] == f"llama_cpp at {scripted_faults.url('script', third)}"
        assert [(hop["worker"].split(" at ")[0], hop["status"]) for hop in provenance["fallbacks"]] == [
            ("open_ai", 503),
            ("anthropic", 429),
        ]
        assert data["attempts"] == 3
        answer(await infer(client))  # the first two members fail again: their breakers open
        data = answer(await infer(client))
        assert data["attempts"] == 1  # open members are skipped without a call
        breakers = {b["name"].split(" at ")[0]: b["state"] for b in (await status_of(client))["breakers"]}
    assert breakers == {"open_ai": "open", "anthropic": "open", "llama_cpp": "closed"}
    assert scripted_faults.generations(first) == 2
    assert scripted_faults.generations(second) == 2
    assert scripted_faults.generations(third) == 3


async def test_a_chain_with_every_breaker_open_fails_fast(scripted_faults: ScriptedFaultServer) -> None:
    first, second = label("fbo-a"), label("fbo-b")
    scripted_faults.script(first, "500")
    scripted_faults.script(second, "500")
    members = [
        {"kind": "llama_cpp", "base_url": scripted_faults.url("script", first)},
        {"kind": "llama_cpp", "base_url": scripted_faults.url("script", second)},
    ]
    config = config_for(
        {"worker": "fallback", "members": members},
        retry_attempts=0,
        circuit_breaker_threshold=1,
        circuit_breaker_timeout_s=60,
    )
    async with serving(config) as (_, client, clock):
        error_text(await infer(client))
        message = error_text(await infer(client))
    assert "backend fallback (all 2 members) unavailable, circuit open, retry after 60 s" in message
    assert clock.sleeps == []
    assert scripted_faults.generations(first) == scripted_faults.generations(second) == 1


async def test_pool_retries_on_another_replica_and_skips_an_open_one(scripted_faults: ScriptedFaultServer) -> None:
    bad, good = label("pool-bad"), label("pool-good")
    scripted_faults.script(bad, "500")
    scripted_faults.script(good, "ok")
    replicas = [
        {"kind": "llama_cpp", "base_url": scripted_faults.url("script", bad)},
        {"kind": "llama_cpp", "base_url": scripted_faults.url("script", good)},
    ]
    config = config_for(
        {"worker": "pool", "strategy": "round_robin", "replicas": replicas}, circuit_breaker_threshold=2
    )
    async with serving(config) as (_, client, _clock):
        for _ in range(6):
            data = answer(await infer(client))
            assert data["provenance"]["worker"].endswith(good)
        breakers = {b["name"]: b["state"] for b in (await status_of(client))["breakers"]}
    assert breakers[f"llama_cpp at {scripted_faults.url('script', bad)}"] == "open"
    assert scripted_faults.generations(bad) == 2  # then the pool skips it
    assert scripted_faults.generations(good) == 6


# ---------------------------------------------------------------------------- secrets


async def test_the_api_key_never_leaks(
    scripted_faults: ScriptedFaultServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    canary = "sk-CANARY-7f3a9c1e5b2d4680"
    monkeypatch.setenv("OPENAI_API_KEY", canary)
    name = label("leak")
    scripted_faults.script(name, "401", "500", "429@1", "reset:0", "ok", "reset:2", "500", "500", "500")
    caplog.set_level(logging.DEBUG)
    outputs: list[str] = []
    config = config_for(open_ai_at(scripted_faults, name), circuit_breaker_threshold=3, retry_attempts=1)
    async with serving(config) as (orchestrator, client, clock):
        for _ in range(6):
            result = await infer(client, "Count to ten")
            outputs.append(repr(result.content) + repr(result.structured_content))
            clock.advance(61)
        for tool, arguments in (
            ("pipeline_status", {}),
            ("dead_letters", {}),
            ("configure_worker", {"kind": "open_ai", "base_url": "https://evil.example/v1"}),
        ):
            result = await client.call_tool(tool, arguments)
            outputs.append(repr(result.content) + repr(result.structured_content))
        outputs.append(orchestrator.pipeline.metrics.render().decode())
        outputs.append(repr(orchestrator.status()))
    outputs.append(caplog.text)
    # The key really was in play: the backend received it, and echoed it in its 401 body.
    sent = [r.headers.get("authorization") for r in scripted_faults.recorded(name)]
    assert f"Bearer {canary}" in sent
    assert any("Invalid API Key" in out for out in outputs)
    for out in outputs:
        assert canary not in out
        assert "CANARY" not in out
