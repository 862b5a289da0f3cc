"""Coalescing (single flight) seen through MCP: identical calls in flight share one
backend call; calls that could get different answers never do; cancellation is
reference-counted; a failure reaches every waiter and is never cached.

The backend is a GatedWorker the test opens, so who is waiting when is decided by the
test, never by timing."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from mcp_orchestrator.config import Config
from mcp_orchestrator.models import Submission
from mcp_orchestrator.pipeline import Pipeline
from mcp_orchestrator.workers.base import WorkerError
from mcp_orchestrator.workers.echo import EchoWorker
from tests.conftest import error_text, make_config, totals_of, wait_for, with_progress
from tests.support_admission import GatedWorker, serving, start_call

pytestmark = pytest.mark.anyio

TEST_TIMEOUT_S = 30.0
NO_CACHE = make_config(deduplication={"window_s": 300}, resilience={"retry_attempts": 0})


def followers(orchestrator: Any) -> int:
    """Callers currently waiting on another request's flight."""
    return orchestrator.status().cache.waiting


async def test_identical_concurrent_calls_make_one_backend_call() -> None:
    worker = GatedWorker()
    async with serving(worker=worker) as (orchestrator, client):
        with anyio.fail_after(TEST_TIMEOUT_S):
            async with anyio.create_task_group() as tg:
                calls = [start_call(tg, client, {"prompt": "what is the answer"}) for _ in range(25)]
                await wait_for(lambda: followers(orchestrator) == 24 and worker.calls == 1)
                worker.open()
            totals = await totals_of(client)
            metrics = orchestrator.pipeline.metrics.render().decode()
    results = [call.structured for call in calls]
    assert worker.calls == 1
    assert {result["text"] for result in results} == {"what is the answer"}
    assert sorted(result["coalesced"] for result in results) == [False] + [True] * 24
    assert len({result["request_id"] for result in results}) == 25
    assert all(not result["cached"] for result in results)
    assert totals["coalesced"] == 24
    assert totals["backend_calls_saved"] == 24
    assert totals["completed"] == 25
    assert totals["submitted"] == 25
    assert "orchestrator_coalesced_total 24.0" in metrics


DIFFERENT = [
    pytest.param({"temperature": 0.2}, id="temperature"),
    pytest.param({"max_tokens": 5}, id="max_tokens"),
    pytest.param({"top_p": 0.5}, id="top_p"),
    pytest.param({"seed": 7}, id="seed"),
    pytest.param({"stop": ["x"]}, id="stop"),
    pytest.param({"system": "be terse"}, id="system"),
    pytest.param({"prompt": "a different question"}, id="prompt"),
]


@pytest.mark.parametrize("change", DIFFERENT)
async def test_calls_that_could_get_different_answers_never_share(change: dict[str, Any]) -> None:
    worker = GatedWorker()
    base = {"prompt": "same question"}
    async with serving(worker=worker) as (_, client):
        with anyio.fail_after(TEST_TIMEOUT_S):
            async with anyio.create_task_group() as tg:
                first = start_call(tg, client, base)
                await wait_for(lambda: worker.calls == 1)
                second = start_call(tg, client, {**base, **change})
                await wait_for(lambda: worker.calls == 2)
                worker.open()
            totals = await totals_of(client)
    assert not first.structured["coalesced"] and not second.structured["coalesced"]
    assert totals["coalesced"] == 0
    assert totals["cache_hits"] == 0


async def test_a_waiter_that_cancels_leaves_the_others_and_the_backend_call_alone() -> None:
    worker = GatedWorker()
    async with serving(worker=worker) as (orchestrator, client):
        with anyio.fail_after(TEST_TIMEOUT_S):
            async with anyio.create_task_group() as tg:
                calls = [start_call(tg, client, {"prompt": "shared"}) for _ in range(3)]
                await wait_for(lambda: followers(orchestrator) == 2)
                leaver = next(call for call in calls[1:])
                leaver.scope.cancel()
                await leaver.done.wait()
                assert worker.cancelled == 0
                worker.open()
            totals = await totals_of(client)
    assert leaver.cancelled
    stayers = [call for call in calls if call is not leaver]
    assert all(call.structured["text"] == "shared" for call in stayers)
    assert worker.calls == 1 and worker.finished == 1 and worker.cancelled == 0
    assert totals["cancelled"] == 1
    assert totals["completed"] == 2
    assert totals["coalesced"] == 1


async def test_the_leaders_caller_leaving_does_not_stop_the_flight_for_waiters() -> None:
    worker = GatedWorker()
    async with serving(worker=worker) as (orchestrator, client):
        with anyio.fail_after(TEST_TIMEOUT_S):
            async with anyio.create_task_group() as tg:
                leader = start_call(tg, client, {"prompt": "carry on"})
                await wait_for(lambda: worker.calls == 1)
                waiters = [start_call(tg, client, {"prompt": "carry on"}) for _ in range(2)]
                await wait_for(lambda: followers(orchestrator) == 2)
                leader.scope.cancel()
                await leader.done.wait()
                await wait_for(lambda: orchestrator.status().totals.cancelled == 1)
                assert worker.cancelled == 0
                worker.open()
            totals = await totals_of(client)
    assert leader.cancelled
    assert [waiter.structured["text"] for waiter in waiters] == ["carry on", "carry on"]
    assert all(waiter.structured["coalesced"] for waiter in waiters)
    assert worker.calls == 1 and worker.finished == 1
    assert totals["cancelled"] == 1
    assert totals["completed"] == 2
    assert totals["in_flight"] == 0


async def test_the_backend_call_is_cancelled_when_every_caller_has_left() -> None:
    worker = GatedWorker()
    async with serving(worker=worker) as (orchestrator, client):
        with anyio.fail_after(TEST_TIMEOUT_S):
            async with anyio.create_task_group() as tg:
                calls = [start_call(tg, client, {"prompt": "nobody stays"}) for _ in range(3)]
                await wait_for(lambda: followers(orchestrator) == 2 and worker.calls == 1)
                calls[0].scope.cancel()  # the leader's caller first: the flight goes on
                await calls[0].done.wait()
                assert worker.cancelled == 0
                calls[1].scope.cancel()
                await calls[1].done.wait()
                assert worker.cancelled == 0
                calls[2].scope.cancel()  # the last one: now the backend call stops
                await wait_for(lambda: worker.cancelled == 1)
            totals = await totals_of(client)
    assert all(call.cancelled for call in calls)
    assert worker.finished == 0
    assert totals["cancelled"] == 3
    assert totals["in_flight"] == 0
    assert orchestrator.status().cache.flights == 0


async def test_a_waiter_with_more_time_keeps_the_trip_going_when_the_first_caller_runs_out() -> None:
    """The first caller's own deadline ends its own request only: the trip (and its backend
    call) goes on for the waiter that still has time, so it costs one backend call, not two."""
    worker = GatedWorker()
    async with serving(worker=worker) as (orchestrator, client):
        with anyio.fail_after(TEST_TIMEOUT_S):
            async with anyio.create_task_group() as tg:
                first = start_call(tg, client, {"prompt": "slow answer", "deadline_ms": 300})
                await wait_for(lambda: worker.calls == 1)
                waiter = start_call(tg, client, {"prompt": "slow answer"})
                await wait_for(lambda: followers(orchestrator) == 1)
                await first.done.wait()
                assert worker.cancelled == 0
                worker.open()
            totals = await totals_of(client)
            letters = (await client.call_tool("dead_letters", {})).structured_content
    assert "deadline of 300 ms exceeded while in the inference stage" in error_text(first.result)
    assert waiter.structured["text"] == "slow answer"
    assert waiter.structured["coalesced"] is True
    assert worker.calls == 1 and worker.cancelled == 0 and worker.finished == 1
    assert totals["failed"] == 1 and totals["completed"] == 1
    assert letters is not None and [entry["reason"] for entry in letters["entries"]] == ["deadline_exceeded"]


async def test_a_failure_reaches_every_waiter_and_is_not_cached() -> None:
    worker = GatedWorker(WorkerError("gated", "model exploded", retryable=False, status=400))
    async with serving(NO_CACHE, worker) as (orchestrator, client):
        with anyio.fail_after(TEST_TIMEOUT_S):
            async with anyio.create_task_group() as tg:
                calls = [start_call(tg, client, {"prompt": "doomed"}) for _ in range(4)]
                await wait_for(lambda: followers(orchestrator) == 3)
                worker.open()
            assert all("model exploded" in error_text(call.result) for call in calls)
            worker.error = None
            again = await client.call_tool("infer", {"prompt": "doomed"})
            totals = await totals_of(client)
    assert not again.is_error and again.structured_content is not None
    assert again.structured_content["cached"] is False
    assert worker.calls == 2
    assert totals["failed"] == 4
    assert totals["cache_hits"] == 0 and totals["coalesced"] == 0
    assert totals["dead_letters"] == 1  # one failed trip, one dead letter


async def test_dedup_false_neither_joins_nor_leads_a_flight() -> None:
    worker = GatedWorker()
    async with serving(worker=worker) as (_, client):
        with anyio.fail_after(TEST_TIMEOUT_S):
            async with anyio.create_task_group() as tg:
                leader = start_call(tg, client, {"prompt": "q"})
                await wait_for(lambda: worker.calls == 1)
                loner = start_call(tg, client, {"prompt": "q", "dedup": False, "cache": False})
                await wait_for(lambda: worker.calls == 2)
                independent = start_call(tg, client, {"prompt": "other", "dedup": False})
                await wait_for(lambda: worker.calls == 3)
                joiner = start_call(tg, client, {"prompt": "other"})  # no flight to join: it leads its own
                await wait_for(lambda: worker.calls == 4)
                worker.open()
    assert not any(call.structured["coalesced"] for call in (leader, loner, independent, joiner))


async def test_waiters_get_the_streamed_chunks_too() -> None:
    worker = GatedWorker()
    chunks: dict[str, list[str]] = {"leader": [], "waiter": []}

    async def collect(name: str) -> Any:
        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            chunks[name].append(message or "")

        return on_progress

    async with serving(worker=worker) as (orchestrator, client):
        with anyio.fail_after(TEST_TIMEOUT_S):
            async with anyio.create_task_group() as tg:
                for name in ("leader", "waiter"):
                    callback = await collect(name)
                    tg.start_soon(lambda cb=callback: client.call_tool("infer", {"prompt": "hi"}, **with_progress(cb)))
                    await wait_for(lambda: worker.calls == 1)
                await wait_for(lambda: followers(orchestrator) == 1)
                worker.open()
    assert chunks == {"leader": ["hi"], "waiter": ["hi"]}


async def test_context_source_turns_sharing_off() -> None:
    """With a context source the messages are known only after RAG, so nothing is shared
    (pipeline level: the MCP app has no context source to configure)."""

    class Passages:
        async def retrieve(self, query: str, session_id: str | None, max_tokens: int) -> list[str]:
            return ["retrieved passage"]

    worker = EchoWorker()
    async with Pipeline(Config(), worker, context_source=Passages()) as pipeline:
        with anyio.fail_after(TEST_TIMEOUT_S):
            first = await pipeline.infer(Submission(prompt="q"))
            second = await pipeline.infer(Submission(prompt="q"))
        assert pipeline.reconciles()
    assert worker.calls == 2
    assert not first.cached and not second.cached
    assert "retrieved passage" in first.text
