"""Config reload: all or nothing, in-flight requests untouched, restart-only keys kept and named.

In process through `reload_config` (the code SIGHUP runs), plus one real process that
gets a real SIGHUP.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client

from mcp_orchestrator.app import Orchestrator
from mcp_orchestrator.config import Config, load_config
from mcp_orchestrator.reload import ReloadError, changed_keys, is_worker_key, needs_restart, reload_config
from tests.conftest import make_config, status_of, wait_for
from tests.support_processes import LINE_TIMEOUT_S, raw_stdio
from tests.test_stdio import HANDSHAKE_VERSION, jsonrpc

BASE = """
[stages.inference]
worker = "echo"
model = "first"
[resilience]
circuit_breaker_threshold = 5
"""


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------- classification


@pytest.mark.parametrize(
    ("key", "restart"),
    [
        ("stages.rag.channel_capacity", True),
        ("stages.inference.channel_capacity", True),
        ("stages.inference.concurrency", True),
        ("stages.inference.http.read_timeout_s", True),
        ("server.port", True),
        ("observability.metrics_port", True),
        ("pipeline.max_prompt_chars", True),
        ("distributed.redis_url", True),
        ("stages.rag.timeout_ms", False),
        ("stages.inference.timeout_ms", False),
        ("stages.inference.model", False),
        ("resilience.retry_attempts", False),
        ("rate_limits.requests_per_second", False),
        ("security.allowed_hosts", False),
        ("observability.log_level", False),
    ],
)
def test_restart_keys(key: str, restart: bool) -> None:
    assert needs_restart(key) is restart


def test_worker_keys() -> None:
    assert is_worker_key("stages.inference.model")
    assert is_worker_key("stages.inference.replicas")
    assert not is_worker_key("stages.inference.timeout_ms")
    assert not is_worker_key("resilience.retry_attempts")


def test_changed_keys_are_dotted_leaves() -> None:
    old = make_config(stages={"inference": {"model": "a"}})
    new = make_config(stages={"inference": {"model": "b"}, "rag": {"timeout_ms": 7}}, rate_limits={"enabled": True})
    assert changed_keys(old, new) == ["rate_limits.enabled", "stages.inference.model", "stages.rag.timeout_ms"]
    assert changed_keys(old, old) == []


# ---------------------------------------------------------------------------- in process


def loader(path: Path) -> Callable[[], Config]:
    return lambda: load_config(path)


@pytest.mark.anyio
async def test_reload_applies_live_keys_keeps_restart_keys_and_in_flight_requests_finish(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", BASE + '[stages.inference.http]\n[observability]\nlog_level = "warning"\n')
    slow = make_config(stages={"inference": {"worker": "echo", "model": "first", "delay_ms": 300}})
    orchestrator = Orchestrator(slow)
    async with orchestrator, Client(orchestrator.server) as client:
        results: list[Any] = []

        async def call() -> None:
            results.append(await client.call_tool("infer", {"prompt": "in flight", "cache": False}))

        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            await wait_for(lambda: orchestrator.pipeline.status().concurrency["busy"] > 0)
            write(
                path,
                BASE.replace('"first"', '"second"').replace("threshold = 5", "threshold = 2")
                + "[stages.rag]\nchannel_capacity = 7\ntimeout_ms = 1234\n"
                + "[rate_limits]\nenabled = true\nrequests_per_second = 5\n",
            )
            report = await reload_config(orchestrator, loader(path), str(path))
        (in_flight,) = results
        assert not in_flight.is_error
        assert in_flight.structured_content["model"] == "first"  # finished on the old worker
        assert report.worker_swapped
        assert "stages.inference.model" in report.applied
        assert "resilience.circuit_breaker_threshold" in report.applied
        assert "stages.rag.timeout_ms" in report.applied
        assert "rate_limits.requests_per_second" in report.applied
        assert report.restart_needed == ["stages.rag.channel_capacity"]
        assert "need a restart, running values kept: stages.rag.channel_capacity" in report.summary()

        status = await status_of(client)
        assert status["worker"]["model"] == "second"
        assert {s["name"]: s["capacity"] for s in status["stages"]}["rag"] == 512
        assert status["rate_limit"]["enabled"] is True
        assert status["rate_limit"]["requests_per_second"] == 5
        assert orchestrator.config.stages.rag.timeout_ms == 1234
        assert orchestrator.config.stages.rag.channel_capacity == 512
        for breaker in orchestrator.pipeline.breakers.values():
            assert breaker.settings.threshold == 2
        answer = await client.call_tool("infer", {"prompt": "after", "cache": False})
        assert answer.structured_content is not None and answer.structured_content["model"] == "second"
        assert orchestrator.pipeline.reconciles()


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[resilience]\nretry_atempts = 2\n", "resilience.retry_atempts: unknown key; did you mean 'retry_attempts'?"),
        ("[stages.inference]\nworker = 'nope'\n", "stages.inference"),
        ("[stages.inference]\nworker = 'llama_cpp'\nbase_url = 'http://127.0.0.1:9'\n", "health check"),
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
            await reload_config(orchestrator, loader(path), str(path))
        assert problem in str(caught.value)
        assert str(caught.value).startswith(f"config reload from {path} failed, keeping the running config")
        assert orchestrator.config is config
        after = await status_of(client)
        assert after["worker"] == before["worker"]
        result = await client.call_tool("infer", {"prompt": "still here", "cache": False})
        assert not result.is_error


@pytest.mark.anyio
async def test_reload_can_switch_configure_worker_off(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", BASE)
    orchestrator = Orchestrator(load_config(path))
    async with orchestrator, Client(orchestrator.server) as client:
        write(path, BASE + "[security]\nallow_configure = false\n")
        report = await reload_config(orchestrator, loader(path), str(path))
        assert report.applied == ["security.allow_configure"]
        result = await client.call_tool("configure_worker", {"kind": "echo"})
        assert result.is_error


class NeverRetrieves:
    """A context source that never answers: only the RAG stage timeout ends its requests."""

    async def retrieve(self, query: str, session_id: str | None, max_tokens: int) -> list[str]:
        await anyio.sleep_forever()
        return []


@pytest.mark.anyio
async def test_a_reloaded_rag_timeout_applies_to_the_next_request(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", BASE + "[stages.rag]\ntimeout_ms = 600000\n")
    orchestrator = Orchestrator(load_config(path))
    orchestrator.pipeline.context_source = NeverRetrieves()
    async with orchestrator, Client(orchestrator.server) as client:
        write(path, BASE + "[stages.rag]\ntimeout_ms = 20\n")
        report = await reload_config(orchestrator, loader(path), str(path))
        assert report.applied == ["stages.rag.timeout_ms"]
        with anyio.fail_after(30):
            result = await client.call_tool("infer", {"prompt": "needs context", "cache": False})
    assert result.is_error
    assert "rag stage timed out after 20 ms" in result.content[0].text


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
        refused = await client.call_tool("infer", {"prompt": "one more", "cache": False, "deadline_ms": 1000})
        assert refused.is_error and "retry_after_ms" in str(refused.content)

        write(path, BASE + limits + "0.2\n")
        report = await reload_config(orchestrator, loader(path), str(path))
        assert report.applied == ["rate_limits.requests_per_second"]
        status = await status_of(client)
        assert status["rate_limit"]["requests_per_second"] == 0.2
        assert status["rate_limit"]["tokens_available"] < 1  # a fresh bucket would hold 3
        after = await client.call_tool("infer", {"prompt": "after the reload", "cache": False, "deadline_ms": 1000})
        assert after.is_error and "retry_after_ms" in str(after.content)
        # The session's own bucket kept its level too: empty after three calls.
        session_gate = orchestrator.pipeline.admission._session_gate("s1")
        assert session_gate is not None and session_gate.tokens() < 1
        assert orchestrator.pipeline.reconciles()


# ---------------------------------------------------------------------------- a real SIGHUP


def wait_for_text(path: Path, text: str) -> str:
    """Poll a log file until `text` appears (bounded, so a broken reload fails instead of hanging)."""
    deadline = time.monotonic() + LINE_TIMEOUT_S
    while time.monotonic() < deadline:
        content = path.read_text(encoding="utf-8", errors="replace")
        if text in content:
            return content
        time.sleep(0.02)
    raise AssertionError(f"{text!r} not in the log within {LINE_TIMEOUT_S} s:\n{path.read_text()}")


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP on this platform")
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
        os.kill(raw.process.pid, signal.SIGHUP)
        log = wait_for_text(stderr_path, "config reloaded from")
        assert "need a restart, running values kept: stages.rag.channel_capacity" in log
        assert status(3)["worker"]["model"] == "second"

        write(config_path, "[resilience]\nretry_atempts = 1\n")
        os.kill(raw.process.pid, signal.SIGHUP)
        log = wait_for_text(stderr_path, "keeping the running config")
        assert "resilience.retry_atempts: unknown key; did you mean 'retry_attempts'?" in log
        after = status(4)
        assert after["worker"]["model"] == "second"
        assert raw.process.poll() is None  # still serving
