"""The result cache, seen through MCP: hits skip the backend, entries expire after
window_s and the least recently used goes when max_entries are held (a hand-moved clock,
no sleeps), and the opt-outs work."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from mcp import Client

from mcp_orchestrator.resilience.cache import ResultCache
from mcp_orchestrator.workers.echo import EchoWorker
from tests.conftest import make_config, totals_of
from tests.support_admission import ManualClock, serving

pytestmark = pytest.mark.anyio

TEST_TIMEOUT_S = 30.0


async def infer(client: Client, **arguments: Any) -> dict[str, Any]:
    with anyio.fail_after(TEST_TIMEOUT_S):
        result = await client.call_tool("infer", arguments)
    assert not result.is_error, result.content
    assert result.structured_content is not None
    return result.structured_content


async def test_a_repeated_call_is_answered_from_the_cache() -> None:
    worker = EchoWorker()
    async with serving(worker=worker) as (orchestrator, client):
        first = await infer(client, prompt="the same words", max_tokens=3)
        second = await infer(client, prompt="the same words", max_tokens=3)
        totals = await totals_of(client)
        stages = orchestrator.status().stages
        metrics = orchestrator.pipeline.metrics.render().decode()
    assert worker.calls == 1
    assert first["cached"] is False and second["cached"] is True
    assert second["text"] == first["text"] == "the same words"
    assert second["request_id"] != first["request_id"]
    assert second["usage"] == first["usage"]  # the answer's usage; pipeline token totals count it once
    assert totals["cache_hits"] == 1 and totals["backend_calls_saved"] == 1
    assert totals["completed"] == 2
    assert "orchestrator_cache_hits_total 1.0" in metrics
    # A hit skips the stages: each stage saw one request.
    assert all(stage.processed == 1 for stage in stages)


async def test_entries_expire_after_window_s() -> None:
    clock = ManualClock()
    worker = EchoWorker()
    config = make_config(deduplication={"window_s": 60})
    async with serving(config, worker, clock) as (_, client):
        await infer(client, prompt="fresh")
        clock.advance(59.9)
        assert (await infer(client, prompt="fresh"))["cached"] is True
        clock.advance(0.1)  # 60 s after it was stored
        assert (await infer(client, prompt="fresh"))["cached"] is False
        assert (await infer(client, prompt="fresh"))["cached"] is True  # stored again
        totals = await totals_of(client)
    assert worker.calls == 2
    assert totals["cache_hits"] == 2


async def test_max_entries_evicts_the_least_recently_used() -> None:
    worker = EchoWorker()
    config = make_config(deduplication={"max_entries": 2})
    async with serving(config, worker, ManualClock()) as (orchestrator, client):
        await infer(client, prompt="a")
        await infer(client, prompt="b")
        assert (await infer(client, prompt="a"))["cached"] is True  # a is now the most recent
        await infer(client, prompt="c")  # evicts b
        assert orchestrator.status().cache.entries == 2
        assert (await infer(client, prompt="a"))["cached"] is True
        assert (await infer(client, prompt="b"))["cached"] is False
    assert worker.calls == 4  # a, b, c, b again


async def test_cache_false_neither_reads_nor_stores() -> None:
    worker = EchoWorker()
    async with serving(worker=worker) as (_, client):
        await infer(client, prompt="p", cache=False)
        assert (await infer(client, prompt="p"))["cached"] is False  # the first did not store
        assert (await infer(client, prompt="p", cache=False))["cached"] is False  # does not read
        assert (await infer(client, prompt="p"))["cached"] is True
    assert worker.calls == 3


async def test_deduplication_disabled_in_config_turns_the_cache_off() -> None:
    worker = EchoWorker()
    async with serving(make_config(deduplication={"enabled": False}), worker) as (orchestrator, client):
        await infer(client, prompt="p")
        assert (await infer(client, prompt="p"))["cached"] is False
        assert orchestrator.status().cache.entries == 0
    assert worker.calls == 2


async def test_a_worker_swap_never_serves_the_old_workers_answers() -> None:
    async with serving(worker=EchoWorker()) as (_, client):
        await infer(client, prompt="p")
        assert (await infer(client, prompt="p"))["cached"] is True
        swapped = await client.call_tool("configure_worker", {"kind": "echo", "model": "echo-2"})
        assert not swapped.is_error, swapped.content
        after = await infer(client, prompt="p")
        assert after["cached"] is False and after["model"] == "echo-2"
        assert (await infer(client, prompt="p"))["cached"] is True


def test_result_cache_counts_hits_and_rejects_bad_settings() -> None:
    clock = ManualClock()
    cache: ResultCache[str] = ResultCache(2, 10, clock=clock.now)
    assert cache.get("k") is None
    cache.put("k", "v")
    assert cache.get("k") == "v"
    clock.advance(10)
    assert cache.get("k") is None
    assert (cache.hits, cache.misses, cache.stored) == (1, 2, 1)
    with pytest.raises(ValueError, match="max_entries"):
        ResultCache(0, 10)
    with pytest.raises(ValueError, match="ttl_s"):
        ResultCache(1, 0)
