"""Config reload: every key is applied live or kept until a restart, decided by the part that
holds it; every live key changes behaviour after a real SIGHUP; a bad reload changes nothing.

The live-key tests run the orchestrator in this process with the SIGHUP handler the server
uses (`reload_on_sighup`) and send this process a real SIGHUP; each observes the new
behaviour through the tools, not the reload report. One more test sends SIGHUP to a real
server process.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client

from mcp_orchestrator import Config, Orchestrator, load_config
from mcp_orchestrator.config import changed_keys, leaf_values
from mcp_orchestrator.errors import ReloadError
from mcp_orchestrator.models import Usage
from mcp_orchestrator.orchestrator import LIVE_KEYS, RESTART_KEYS
from mcp_orchestrator.pipeline import Pipeline
from mcp_orchestrator.pipeline.pipeline import matches
from mcp_orchestrator.reload import reload_config, reload_on_sighup
from mcp_orchestrator.workers.base import Chunk, WorkerError, WorkerRequest
from tests.conftest import error_text, make_config, status_of, wait_for
from tests.support_admission import GatedWorker, ManualClock, start_call
from tests.support_context import Passages
from tests.support_fault_server import FaultServer
from tests.support_faults_extra import FakeClock
from tests.support_processes import raw_stdio, wait_for_text
from tests.support_workers import StubWorker
from tests.test_stdio import HANDSHAKE_VERSION, jsonrpc

pytest_plugins = ("tests.support_llama", "tests.support_fault_server")  # the fault server relays to llama-server

BASE = """
[stages.inference]
worker = "echo"
model = "first"
[resilience]
circuit_breaker_threshold = 5
"""
TEST_TIMEOUT_S = 30.0
SIGHUP = getattr(signal, "SIGHUP", None)
needs_sighup = pytest.mark.skipif(SIGHUP is None, reason="no SIGHUP on this platform")


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------- who holds each key


def every_key() -> list[str]:
    return sorted(leaf_values(Config()))


@pytest.mark.parametrize("key", every_key())
def test_every_key_is_held_by_exactly_one_part(key: str) -> None:
    """The pipeline holds its own settings, the orchestrator the rest (worker, server, HTTP
    client, logging, security); each says whether a change applies live or needs a restart."""
    by_pipeline = Pipeline.needs_restart(key) is not None
    by_orchestrator = matches(key, RESTART_KEYS) or matches(key, LIVE_KEYS)
    assert by_pipeline != by_orchestrator, f"{key}: pipeline {by_pipeline}, orchestrator {by_orchestrator}"
    assert Orchestrator.needs_restart(key) is not None


@pytest.mark.parametrize(
    ("key", "restart"),
    [
        ("stages.rag.channel_capacity", True),
        ("stages.inference.concurrency", True),
        ("stages.inference.http.read_timeout_s", True),
        ("server.port", True),
        ("observability.metrics_port", True),
        ("pipeline.max_prompt_chars", True),
        ("pipeline.name", True),
        ("distributed.redis_url", True),
        ("deduplication.window_s", True),
        ("stages.inference.channel_capacity", False),
        ("stages.rag.timeout_ms", False),
        ("stages.rag.source", False),
        ("stages.inference.timeout_ms", False),
        ("stages.inference.model", False),
        ("stages.inference.replicas", False),
        ("pipeline.priority_aging_ms", False),
        ("pipeline.dead_letter_capacity", False),
        ("resilience.retry_attempts", False),
        ("rate_limits.requests_per_second", False),
        ("security.worker_origins", False),
        ("observability.log_level", False),
    ],
)
def test_restart_or_live(key: str, restart: bool) -> None:
    assert Orchestrator.needs_restart(key) is restart


def test_changed_keys_are_dotted_leaves() -> None:
    old = make_config(stages={"inference": {"model": "a"}})
    new = make_config(stages={"inference": {"model": "b"}, "rag": {"timeout_ms": 7}}, rate_limits={"enabled": True})
    assert changed_keys(old, new) == ["rate_limits.enabled", "stages.inference.model", "stages.rag.timeout_ms"]
    assert changed_keys(old, old) == []


# ---------------------------------------------------------------------------- a real SIGHUP, in this process


@dataclass
class Reloading:
    orchestrator: Orchestrator
    client: Client
    path: Path

    async def hup(self, text: str) -> None:
        """Write the file, send this process SIGHUP, and wait until the reload has switched."""
        write(self.path, text)
        before = self.orchestrator.config
        assert SIGHUP is not None
        os.kill(os.getpid(), SIGHUP)
        await wait_for(lambda: self.orchestrator.config is not before)

    async def infer(self, **arguments: Any) -> Any:
        return await self.client.call_tool("infer", {"prompt": "hello world", "cache": False, **arguments})

    async def answer(self, **arguments: Any) -> dict[str, Any]:
        result = await self.infer(**arguments)
        assert not result.is_error, error_text(result)
        assert result.structured_content is not None
        return result.structured_content


@asynccontextmanager
async def reloading(tmp_path: Path, text: str, **options: Any) -> AsyncIterator[Reloading]:
    """An orchestrator started from a file, reloading it on SIGHUP as the server does."""
    path = write(tmp_path / "live.toml", text)
    orchestrator = Orchestrator(load_config(path), **options)
    with anyio.fail_after(TEST_TIMEOUT_S):
        async with orchestrator, Client(orchestrator.server) as client, anyio.create_task_group() as tg:
            await tg.start(reload_on_sighup, orchestrator, lambda: load_config(path), str(path))
            yield Reloading(orchestrator, client, path)
            assert orchestrator.pipeline.reconciles(), orchestrator.status().totals
            tg.cancel_scope.cancel()


@needs_sighup
@pytest.mark.anyio
async def test_pipeline_keys_deadline_dead_letters_and_dedup(tmp_path: Path) -> None:
    slow = '[stages.inference]\nworker = "echo"\ndelay_ms = 100\n'
    async with reloading(tmp_path, slow) as live:
        assert (await live.answer())["text"] == "hello world"  # 100 ms is well within the default deadline
        await live.hup(slow + "[pipeline]\ndefault_deadline_ms = 20\n")
        assert "deadline of 20 ms exceeded" in error_text(await live.infer())

        for _ in range(2):
            assert (await live.infer()).is_error
        letters = await live.client.call_tool("dead_letters", {})
        assert letters.structured_content is not None and letters.structured_content["total"] == 3
        await live.hup(slow + "[pipeline]\ndefault_deadline_ms = 20\ndead_letter_capacity = 1\n")
        letters = (await status_of(live.client))["dead_letters"]
        assert (letters["held"], letters["capacity"], letters["dropped"]) == (1, 1, 2)

        big = "[pipeline]\ndefault_deadline_ms = 20\ndead_letter_max_bytes = 1048576\n"
        await live.hup(slow + big)
        huge = {"prompt": "x" * 200_000, "system": "y" * 200_000, "cache": False}
        for _ in range(3):  # letters of ~400 KB each: only two fit in 1 MiB
            assert (await live.client.call_tool("infer", huge)).is_error
        letters = (await status_of(live.client))["dead_letters"]
        assert (letters["held"], letters["max_bytes"]) == (2, 1048576)
        assert letters["bytes"] <= 1048576 and letters["dropped"] == 2 + 2

        await live.hup(slow)
        first, again = await live.answer(cache=True), await live.answer(cache=True)
        assert not first["cached"] and again["cached"]
        await live.hup(slow + "[deduplication]\nenabled = false\n")
        assert not (await live.answer(cache=True))["cached"]
        assert (await status_of(live.client))["cache"]["enabled"] is False


@needs_sighup
@pytest.mark.anyio
async def test_priority_aging_reorders_even_the_requests_already_waiting(tmp_path: Path) -> None:
    gated = GatedWorker()
    config = "[stages.inference]\nconcurrency = 1\n[pipeline]\npriority_aging_ms = 60000\n"

    async def round_of(live: Reloading, reload: Callable[[], Awaitable[None]] | None) -> list[str]:
        gated.prompts.clear()
        gated.close()
        async with anyio.create_task_group() as tg:
            start_call(tg, live.client, {"prompt": "blocker", "cache": False})
            await wait_for(lambda: gated.calls > 0 and gated.prompts == ["blocker"])
            start_call(tg, live.client, {"prompt": "low, first in", "priority": "low", "cache": False})
            await wait_for(lambda: live.orchestrator.status().stages[2].depth == 1)
            await anyio.sleep(0.05)  # arrivals 50 ms apart: more than 3 aging periods of 1 ms
            start_call(tg, live.client, {"prompt": "critical, later", "priority": "critical", "cache": False})
            await wait_for(lambda: live.orchestrator.status().stages[2].depth == 2)
            if reload is not None:
                await reload()
            gated.open()
        return gated.prompts[1:]

    async with reloading(tmp_path, config, worker=gated) as live:
        assert await round_of(live, None) == ["critical, later", "low, first in"]
        reordered = await round_of(live, lambda: live.hup(config.replace("60000", "1")))
    assert reordered == ["low, first in", "critical, later"]


@needs_sighup
@pytest.mark.anyio
async def test_rag_keys_source_enabled_context_size_and_timeout(tmp_path: Path) -> None:
    rag = '[stages.rag]\nsource = "tests.support_context:Passages"\n'
    async with reloading(tmp_path, BASE + rag) as live:
        assert "alpha beta gamma delta" in (await live.answer())["text"]
        await live.hup(BASE + rag + "max_context_tokens = 2\n")
        assert (await live.answer())["text"] == "hello world"  # the 4-word passage no longer fits
        await live.hup(BASE + rag.replace("Passages", "OtherPassages"))
        assert "omega" in (await live.answer())["text"]
        before = Passages.calls
        await live.hup(BASE + rag + "enabled = false\n")
        assert (await live.answer())["text"] == "hello world"
        assert Passages.calls == before  # a disabled stage does not even ask
        assert (await status_of(live.client))["stages"][0]["enabled"] is False
        await live.hup(BASE + rag.replace("Passages", "NeverAnswers") + "timeout_ms = 20\n")
        assert "the rag stage timed out after 20 ms" in error_text(await live.infer())


@needs_sighup
@pytest.mark.anyio
async def test_post_process_keys(tmp_path: Path) -> None:
    async with reloading(tmp_path, BASE) as live:
        assert (await live.answer(prompt="hello world END more", stop=["END"]))["text"] == "hello world"
        assert (await live.answer(prompt="hi  "))["text"] == "hi"
        await live.hup(BASE + "[stages.post_process]\nmax_output_chars = 5\n")
        assert (await live.answer())["text"] == "hello"
        await live.hup(BASE + "[stages.post_process]\nstrip_whitespace = false\n")
        assert (await live.answer(prompt="hi  "))["text"] == "hi  "
        await live.hup(BASE + "[stages.post_process]\nenabled = false\n")
        skipped = await live.answer(prompt="hello world END more", stop=["END"])
        assert skipped["text"] == "hello world END more"  # echo ignores stop; only the stage applied it
        assert (await status_of(live.client))["stages"][3]["enabled"] is False


@needs_sighup
@pytest.mark.anyio
async def test_inference_queue_capacity_and_timeout(tmp_path: Path) -> None:
    gated = GatedWorker()
    config = "[stages.inference]\nconcurrency = 1\nchannel_capacity = 8\n"
    async with reloading(tmp_path, config, worker=gated) as live:
        async with anyio.create_task_group() as tg:
            calls = [start_call(tg, live.client, {"prompt": f"call {i}", "cache": False}) for i in range(3)]
            await wait_for(lambda: live.orchestrator.status().stages[2].depth == 2)
            await live.hup(config.replace("8", "1"))
            shed = await live.infer()
            gated.open()
        assert "the inference stage queue is full (1 waiting)" in error_text(shed)
        assert all(call.structured["text"] == f"call {i}" for i, call in enumerate(calls))
        gated.close()
        await live.hup(config + "timeout_ms = 40\n")
        assert "the inference stage timed out after 40 ms" in error_text(await live.infer())
        gated.open()


class Switchable(StubWorker):
    """A worker that fails (retryably) or answers, as the test says; counts its calls."""

    kind = "switchable"
    model = "switchable-model"

    def __init__(self) -> None:
        self.failing = True
        self.calls = 0

    async def generate(self, request: WorkerRequest) -> Any:
        self.calls += 1
        if self.failing:
            raise WorkerError("switchable", "overloaded", retryable=True, status=503)
        yield Chunk("ok", Usage(input_tokens=1, output_tokens=1), "stop")


@needs_sighup
@pytest.mark.anyio
async def test_resilience_keys(tmp_path: Path) -> None:
    worker = Switchable()
    clock = FakeClock(follow_loop=True)  # retry waits and breaker timeouts on a clock the test moves
    base = "[resilience]\nretry_base_ms = 5000\nretry_max_ms = 5000\ncircuit_breaker_threshold = 50\n"
    async with reloading(tmp_path, base, worker=worker, clock=clock) as live:
        assert "gave up after 4 call(s)" in error_text(await live.infer())  # 3 retries by default
        assert any(wait > 0.001 for wait in clock.sleeps)
        await live.hup(base + "retry_attempts = 1\n")
        assert "gave up after 2 call(s)" in error_text(await live.infer())
        await live.hup(base.replace("5000", "1") + "retry_attempts = 1\n")
        clock.sleeps.clear()
        assert (await live.infer()).is_error
        assert clock.sleeps and all(wait <= 0.001 for wait in clock.sleeps)

        threshold = "[resilience]\nretry_attempts = 0\ncircuit_breaker_threshold = 2\n"
        await live.hup(threshold)
        for _ in range(2):
            assert (await live.infer()).is_error
        (breaker,) = (await status_of(live.client))["breakers"]
        assert breaker["state"] == "open"
        assert 50 < breaker["retry_after_s"] <= 60
        await live.hup(threshold + "circuit_breaker_timeout_s = 1\n")
        clock.advance(1.01)
        (breaker,) = (await status_of(live.client))["breakers"]
        assert breaker["state"] == "half_open"  # 60 s before the reload
        await live.hup(threshold + "circuit_breaker_timeout_s = 1\ncircuit_breaker_probes = 1\n")
        worker.failing = False
        assert not (await live.infer()).is_error
        (breaker,) = (await status_of(live.client))["breakers"]
        assert breaker["state"] == "closed"  # one probe of one is enough now (4 of 5 before)

        worker.failing = True
        probes = threshold + "circuit_breaker_timeout_s = 1\ncircuit_breaker_probes = 2\n"
        await live.hup(probes)
        for _ in range(2):
            assert (await live.infer()).is_error
        clock.advance(1.01)
        worker.failing = False
        assert not (await live.infer()).is_error
        (breaker,) = (await status_of(live.client))["breakers"]
        assert breaker["state"] == "half_open"  # one success of two probes is below 0.8
        await live.hup(probes + "circuit_breaker_success_rate = 0.5\n")
        (breaker,) = (await status_of(live.client))["breakers"]
        assert breaker["state"] == "closed"  # judged again at once: one of two is enough at 0.5


@needs_sighup
@pytest.mark.anyio
async def test_attempt_timeout(tmp_path: Path) -> None:
    gated = GatedWorker()
    config = "[resilience]\nretry_attempts = 0\n"
    async with reloading(tmp_path, config, worker=gated) as live:
        await live.hup(config + "attempt_timeout_ms = 20\n")
        message = error_text(await live.infer())
        assert "no complete answer within 20 ms (resilience.attempt_timeout_ms)" in message
        gated.open()


@needs_sighup
@pytest.mark.anyio
async def test_rate_limit_keys(tmp_path: Path) -> None:
    clock = ManualClock()  # tokens refill only when the test moves the clock
    async with reloading(tmp_path, BASE, clock=clock) as live:
        for _ in range(3):
            assert not (await live.infer()).is_error  # off: no limit
        limits = "[rate_limits]\nenabled = true\nrequests_per_second = 0.1\nburst_capacity = 1\n"
        await live.hup(BASE + limits)
        assert not (await live.infer()).is_error
        refused = error_text(await live.infer(deadline_ms=1000))
        assert "rate limited: the global limit (0.1 requests/s, burst 1)" in refused
        await live.hup(BASE + limits.replace("burst_capacity = 1", "burst_capacity = 3"))
        clock.advance(30)
        for _ in range(3):
            assert not (await live.infer()).is_error  # three tokens now fit
        assert (await live.infer(deadline_ms=1000)).is_error
        await live.hup(BASE + limits.replace("0.1", "1000"))
        clock.advance(0.01)  # ten tokens at 1,000/s (the bucket holds one)
        assert not (await live.infer()).is_error

        sessions = limits.replace("0.1", "1000") + "per_session_rps = 0.1\nper_session_burst = 1\n"
        await live.hup(BASE + sessions)
        clock.advance(1)
        assert not (await live.infer(session_id="s1")).is_error
        assert "the per-session limit (0.1 requests/s, burst 1)" in error_text(
            await live.infer(session_id="s1", deadline_ms=1000)
        )
        clock.advance(1)  # a global token again: s2's own bucket is full
        assert not (await live.infer(session_id="s2")).is_error
        await live.hup(BASE + sessions.replace("per_session_burst = 1", "per_session_burst = 2"))
        for _ in range(2):
            clock.advance(1)
            assert not (await live.infer(session_id="s3")).is_error  # a session's bucket holds two now
        clock.advance(1)
        assert "the per-session limit (0.1 requests/s, burst 2)" in error_text(
            await live.infer(session_id="s3", deadline_ms=1000)
        )

        # A token 0.5 s away and a 1 s deadline: worth waiting for unless 0.6 s must be left.
        slow = "[rate_limits]\nenabled = true\nrequests_per_second = 2\nburst_capacity = 1\n"
        await live.hup(BASE + slow)
        clock.advance(1)
        assert not (await live.infer()).is_error
        async with anyio.create_task_group() as tg:
            waiter = start_call(tg, live.client, {"prompt": "waits", "cache": False, "deadline_ms": 1000})
            await wait_for(lambda: live.orchestrator.status().rate_limit.waiting == 1)
            clock.advance(0.5)
            live.orchestrator.pipeline.clock_advanced()
        assert waiter.structured["text"] == "waits"
        await live.hup(BASE + slow + "min_remaining_ms = 600\n")
        assert "retry_after_ms" in error_text(await live.infer(deadline_ms=1000))


@needs_sighup
@pytest.mark.anyio
async def test_security_and_log_level_keys(tmp_path: Path) -> None:
    async with reloading(tmp_path, BASE) as live:
        elsewhere = {"kind": "llama_cpp", "base_url": "http://no-such-host.invalid:9"}
        assert "is not an origin configure_worker may reach" in error_text(
            await live.client.call_tool("configure_worker", elsewhere)
        )
        await live.hup(BASE + '[security]\nworker_origins = ["no-such-host.invalid:9"]\n')
        assert "failed its health check" in error_text(await live.client.call_tool("configure_worker", elsewhere))
        await live.hup(BASE + "[security]\nallow_configure = false\n")
        assert "allow_configure" in error_text(await live.client.call_tool("configure_worker", {"kind": "echo"}))
        assert "configure_worker" not in {tool.name for tool in (await live.client.list_tools()).tools}
        await live.hup(BASE + "[security]\nallow_configure = true\n")
        assert "configure_worker" in {tool.name for tool in (await live.client.list_tools()).tools}

        assert not logging.getLogger("mcp_orchestrator").isEnabledFor(logging.DEBUG)
        await live.hup(BASE + '[observability]\nlog_level = "debug"\n')
        assert logging.getLogger("mcp_orchestrator").isEnabledFor(logging.DEBUG)
        await live.hup(BASE)
        assert not logging.getLogger("mcp_orchestrator").isEnabledFor(logging.DEBUG)


@needs_sighup
@pytest.mark.anyio
async def test_echo_worker_keys(tmp_path: Path) -> None:
    async with reloading(tmp_path, BASE) as live:
        assert (await live.answer())["model"] == "first"
        await live.hup(BASE.replace('"first"', '"second"'))
        assert (await live.answer())["model"] == "second"
        await live.hup(BASE.replace('model = "first"', 'model = "first"\nmax_tokens = 1'))
        answer = await live.answer()
        assert answer["text"] == "hello" and answer["finish_reason"] == "length"
        await live.hup(BASE.replace('model = "first"', 'model = "first"\ndelay_ms = 7\nchunk_delay_ms = 3'))
        worker = (await status_of(live.client))["worker"]
        assert (worker["delay_ms"], worker["chunk_delay_ms"]) == (7, 3)


@needs_sighup
@pytest.mark.anyio
async def test_http_worker_keys_reach_the_backend(tmp_path: Path, fault_server: FaultServer) -> None:
    """Each worker key, changed by SIGHUP, is in the next request the backend receives."""
    os.environ["RELOAD_TEST_KEY"] = "sk-reload-test"
    url = fault_server.url("proxy", "reload")
    http = f'[stages.inference]\nworker = "llama_cpp"\nbase_url = "{url}"\nmax_tokens = 4\ntemperature = 0.0\n'

    def last_request() -> tuple[dict[str, Any], dict[str, str]]:
        recorded = fault_server.recorded("reload", "/v1/chat/completions")[-1]
        return recorded.body, recorded.headers

    try:
        async with reloading(tmp_path, BASE) as live:
            await live.hup(http)
            assert (await live.answer())["worker"] == "llama_cpp"
            changes = [
                ("top_p = 0.5", lambda body, headers: body["top_p"] == 0.5),
                ("seed = 11", lambda body, headers: body["seed"] == 11),
                ('stop = ["zzz"]', lambda body, headers: body["stop"] == ["zzz"]),
                ('system = "Be terse."', lambda body, headers: body["messages"][0]["content"] == "Be terse."),
                ("stream = false", lambda body, headers: body["stream"] is False),
                ('model = "gemma"', lambda body, headers: body["model"] == "gemma"),
                ('api_key_env = "RELOAD_TEST_KEY"', lambda body, headers: "sk-reload-test" in headers["authorization"]),
            ]
            for line, check in changes:
                await live.hup(http + line + "\n")
                await live.answer()
                body, headers = last_request()
                assert check(body, headers), (line, body)
            await live.hup(http.replace("temperature = 0.0", "temperature = 1.5"))
            await live.answer()
            assert last_request()[0]["temperature"] == 1.5
            pool = (
                '[stages.inference]\nworker = "pool"\nstrategy = "least_loaded"\nvirtual_nodes = 8\n'
                f'[[stages.inference.replicas]]\nkind = "llama_cpp"\nbase_url = "{url}"\n'
                f'[[stages.inference.replicas]]\nkind = "echo"\nmodel = "spare"\n'
            )
            await live.hup(pool)
            worker = (await status_of(live.client))["worker"]
            assert (worker["kind"], worker["strategy"], worker["virtual_nodes"]) == ("pool", "least_loaded", 8)
            assert [replica["kind"] for replica in worker["replicas"]] == ["llama_cpp", "echo"]
            chain = (
                '[stages.inference]\nworker = "fallback"\n[[stages.inference.members]]\nkind = "echo"\nmodel = "m1"\n'
            )
            await live.hup(chain)
            assert (await live.answer())["model"] == "m1"
    finally:
        del os.environ["RELOAD_TEST_KEY"]


# ---------------------------------------------------------------------------- all or nothing


@pytest.mark.anyio
async def test_reload_keeps_restart_keys_and_in_flight_requests_finish_on_the_old_worker(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", BASE)
    gated = GatedWorker()
    orchestrator = Orchestrator(load_config(path), gated)
    async with orchestrator, Client(orchestrator.server) as client:
        async with anyio.create_task_group() as tg:
            in_flight = start_call(tg, client, {"prompt": "in flight", "cache": False})
            await wait_for(lambda: gated.calls == 1)
            write(
                path,
                BASE.replace('"first"', '"second"') + "[stages.rag]\nchannel_capacity = 7\ntimeout_ms = 1234\n",
            )
            report = await reload_config(orchestrator, lambda: load_config(path), str(path))
            gated.open()
        assert in_flight.structured["model"] == "gated-model"  # finished on the worker it started on
        assert report.worker_swapped
        assert report.applied == ["stages.inference.model", "stages.rag.timeout_ms"]
        assert report.restart_needed == ["stages.rag.channel_capacity"]
        assert "need a restart, running values kept: stages.rag.channel_capacity" in report.summary()
        status = await status_of(client)
        assert status["worker"]["model"] == "second"
        assert {s["name"]: s["capacity"] for s in status["stages"]}["rag"] == 512
        assert orchestrator.config.stages.rag.channel_capacity == 512  # the running value, not the file's
        assert orchestrator.config.stages.rag.timeout_ms == 1234
        assert orchestrator.pipeline.reconciles()


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[resilience]\nretry_atempts = 2\n", "resilience.retry_atempts: unknown key; did you mean 'retry_attempts'?"),
        ("[stages.inference]\nworker = 'nope'\n", "stages.inference.worker: unknown worker kind 'nope'"),
        ("[stages.inference]\nworker = 'llama_cpp'\nbase_url = 'http://127.0.0.1:9'\n", "health check"),
        (
            "[stages.inference]\nworker = 'llama_cpp'\nbase_url = 'http://127.0.0.1:99999'\n",
            "stages.inference.base_url: is not a URL a client can use",
        ),
        ('[stages.rag]\nsource = "tests.support_context:not_a_source"\n', "stages.rag.source: "),
        ('[stages.rag]\nsource = "tests.no_such_module:X"\n', "cannot import 'tests.no_such_module'"),
        ("[stages.rag]\nenabled = 'yes'\n", "stages.rag.enabled: Input should be a valid boolean"),
        ("not toml = = =", "invalid TOML"),
    ],
)
async def test_a_bad_reload_changes_nothing_and_says_why(tmp_path: Path, text: str, problem: str) -> None:
    path = write(tmp_path / "c.toml", BASE)
    config = load_config(path)
    orchestrator = Orchestrator(config)
    async with orchestrator, Client(orchestrator.server) as client:
        before = await status_of(client)
        write(path, text)
        with pytest.raises(ReloadError) as caught:
            await reload_config(orchestrator, lambda: load_config(path), str(path))
        assert problem in str(caught.value)
        assert str(caught.value).startswith(f"config reload from {path} failed, keeping the running config")
        assert orchestrator.config is config
        after = await status_of(client)
        assert after["worker"] == before["worker"]
        result = await client.call_tool("infer", {"prompt": "still here", "cache": False})
        assert not result.is_error


@pytest.mark.anyio
async def test_a_reload_contradicting_a_value_kept_until_restart_says_which_and_changes_nothing(
    tmp_path: Path,
) -> None:
    """max_deadline_ms needs a restart; default_deadline_ms applies live: a file raising both
    would put the new default over the running max."""
    path = write(tmp_path / "c.toml", "[pipeline]\nmax_deadline_ms = 100000\ndefault_deadline_ms = 90000\n")
    config = load_config(path)
    async with Orchestrator(config) as orchestrator:
        write(path, "[pipeline]\nmax_deadline_ms = 700000\ndefault_deadline_ms = 650000\n")
        with pytest.raises(ReloadError) as caught:
            await reload_config(orchestrator, lambda: load_config(path), str(path))
        assert orchestrator.config is config
    text = str(caught.value)
    assert "default_deadline_ms (650000) must not be greater than max_deadline_ms (100000)" in text
    assert "kept until a restart: pipeline.max_deadline_ms = 100000" in text


@pytest.mark.anyio
async def test_new_rate_limits_start_as_empty_as_the_old_buckets_not_with_a_fresh_burst(tmp_path: Path) -> None:
    # One token per 10 s (then per 5 s): nothing refills during the test, whatever the machine's speed.
    limits = "[rate_limits]\nenabled = true\nburst_capacity = 3\nper_session_rps = 0.1\nrequests_per_second = "
    path = write(tmp_path / "c.toml", BASE + limits + "0.1\n")
    orchestrator = Orchestrator(load_config(path))
    async with orchestrator, Client(orchestrator.server) as client:
        for index in range(3):
            arguments = {"prompt": f"spend {index}", "cache": False, "session_id": "s1"}
            assert not (await client.call_tool("infer", arguments)).is_error
        assert (await status_of(client))["rate_limit"]["tokens_available"] < 1

        write(path, BASE + limits + "1000\n")  # the global limit now refills at once...
        report = await reload_config(orchestrator, lambda: load_config(path), str(path))
        assert report.applied == ["rate_limits.requests_per_second"]
        # ...but the session's own bucket kept its level: empty after three calls, refusing s1 only.
        arguments = {"prompt": "s1 again", "cache": False, "session_id": "s1", "deadline_ms": 1000}
        refused = await client.call_tool("infer", arguments)
        assert "the per-session limit" in error_text(refused)
        assert not (await client.call_tool("infer", {"prompt": "s2", "cache": False, "session_id": "s2"})).is_error


# ---------------------------------------------------------------------------- a real SIGHUP to a real server


@needs_sighup
def test_sighup_reloads_a_running_stdio_server(tmp_path: Path) -> None:
    config_path = write(tmp_path / "c.toml", BASE)
    stderr_path = tmp_path / "stderr.log"
    with raw_stdio("--config", str(config_path), stderr_path=stderr_path) as raw:
        raw.send(
            jsonrpc(
                1,
                "initialize",
                {"protocolVersion": HANDSHAKE_VERSION, "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}},
            )
        )
        raw.read_until_response(1)
        raw.send(jsonrpc(None, "notifications/initialized"))

        def status(message_id: int) -> dict[str, Any]:
            raw.send(jsonrpc(message_id, "tools/call", {"name": "pipeline_status", "arguments": {}}))
            (reply,) = raw.read_until_response(message_id)
            content: dict[str, Any] = reply["result"]["structuredContent"]
            return content

        assert status(2)["worker"]["model"] == "first"
        write(config_path, BASE.replace('"first"', '"second"') + "[stages.rag]\nchannel_capacity = 7\n")
        assert SIGHUP is not None
        os.kill(raw.process.pid, SIGHUP)
        log = wait_for_text(stderr_path, "config reloaded from")
        assert "need a restart, running values kept: stages.rag.channel_capacity" in log
        assert status(3)["worker"]["model"] == "second"

        write(config_path, "[resilience]\nretry_atempts = 1\n")
        os.kill(raw.process.pid, SIGHUP)
        log = wait_for_text(stderr_path, "keeping the running config")
        assert "resilience.retry_atempts: unknown key; did you mean 'retry_attempts'?" in log
        after = status(4)
        assert after["worker"]["model"] == "second"
        assert raw.process.poll() is None  # still serving
