"""Admission control seen through MCP: the rate limit refuses with retry_after_ms when a
token cannot come in time, waiting requests are admitted by priority, one noisy session
cannot starve another, and only requests that call the backend spend tokens.

The limiter runs on a hand-moved clock: tokens refill only when the test moves it, so
order and refusals never depend on timing."""

from __future__ import annotations

import re
from functools import partial
from typing import Any

import anyio
import pytest

from mcp_orchestrator.errors import WorkerError
from tests.conftest import error_text, make_config, status_of, totals_of, wait_for
from tests.support_admission import Call, ManualClock, serving, start_call
from tests.support_workers import Scripted

pytestmark = pytest.mark.anyio

TEST_TIMEOUT_S = 30.0


def limits(**rate_limits: Any) -> Any:
    return make_config(rate_limits={"enabled": True, **rate_limits})


def waiting(orchestrator: Any) -> int:
    return orchestrator.status().rate_limit.waiting


def has_waiting(orchestrator: Any, count: int) -> bool:
    return waiting(orchestrator) == count


def has_done(calls: dict[str, Call], count: int) -> bool:
    return sum(call.done.is_set() for call in calls.values()) == count


async def test_a_replay_refused_before_it_ran_can_be_replayed_later_and_only_once() -> None:
    """The rate limit refuses a replay at admission: its claim is given back. The next one runs,
    and keeps the claim."""
    clock = ManualClock()
    worker = Scripted(WorkerError("scripted", "the backend said no", retryable=False), "ok")
    config = make_config(
        rate_limits={"enabled": True, "requests_per_second": 0.5, "burst_capacity": 1},
        resilience={"retry_attempts": 0},
    )
    async with serving(config, worker=worker, clock=clock) as (_, client):
        with anyio.fail_after(TEST_TIMEOUT_S):
            failed = await client.call_tool("infer", {"prompt": "fails", "deadline_ms": 1000, "cache": False})
            refused = await client.call_tool("replay_dead_letter", {"id": "dl-1"})  # no token within 1 s
            clock.advance(2.0)  # one token per 2 s
            replayed = await client.call_tool("replay_dead_letter", {"id": "dl-1"})
            again = await client.call_tool("replay_dead_letter", {"id": "dl-1"})
    assert "the backend said no" in error_text(failed)
    assert "rate limited" in error_text(refused)
    assert not replayed.is_error and replayed.content[0].text == "hello world"  # type: ignore[union-attr]
    assert "already replayed by this process" in error_text(again)
    assert worker.calls == 2


async def test_a_request_that_cannot_get_a_token_in_time_is_refused_with_retry_after() -> None:
    clock = ManualClock()
    async with serving(limits(requests_per_second=0.5, burst_capacity=1), clock=clock) as (orchestrator, client):
        with anyio.fail_after(TEST_TIMEOUT_S):
            first = await client.call_tool("infer", {"prompt": "takes the only token"})
            refused = await client.call_tool("infer", {"prompt": "too late", "deadline_ms": 1000})
            status = await status_of(client)
            metrics = orchestrator.pipeline.metrics.render().decode()
    assert not first.is_error
    message = error_text(refused)
    assert "rate limited: the global limit (0.5 requests/s, burst 1)" in message
    match = re.search(r"retry_after_ms=(\d+)", message)
    assert match is not None and int(match.group(1)) == 2000  # one token per 2 s
    assert status["totals"]["rate_limited"] == 1
    assert status["totals"]["failed"] == 1
    assert status["rate_limit"]["tokens_available"] == 0
    assert status["rate_limit"]["enabled"] is True
    assert 'orchestrator_rate_limited_total{scope="global"} 1.0' in metrics


async def test_waiting_requests_are_admitted_by_priority_then_arrival() -> None:
    clock = ManualClock()
    config = limits(requests_per_second=0.1, burst_capacity=1)  # a token per 10 s of the hand-moved clock
    async with serving(config, clock=clock) as (orchestrator, client):
        with anyio.fail_after(TEST_TIMEOUT_S):
            await client.call_tool("infer", {"prompt": "empties the bucket"})
            order = [("low", "low"), ("normal-1", "normal"), ("high", "high"), ("normal-2", "normal")]
            order.append(("critical", "critical"))
            async with anyio.create_task_group() as tg:
                calls: dict[str, Call] = {}
                for name, priority in order:
                    calls[name] = start_call(tg, client, {"prompt": name, "priority": priority})
                    await wait_for(partial(has_waiting, orchestrator, len(calls)))
                status = (await status_of(client))["rate_limit"]
                finished: list[str] = []
                for _ in order:
                    clock.advance(10)
                    orchestrator.pipeline.clock_advanced()
                    await wait_for(partial(has_done, calls, len(finished) + 1))
                    finished += [n for n, call in calls.items() if call.done.is_set() and n not in finished]
    assert status["waiting"] == 5
    assert finished == ["critical", "high", "normal-1", "normal-2", "low"]
    assert all(call.structured["text"] == name for name, call in calls.items())
    assert all(call.structured["stage_ms"]["admission"] > 0 for call in calls.values())


async def test_one_noisy_session_cannot_starve_another() -> None:
    """Session A floods; its excess waits behind A's own bucket, so B is admitted at once
    and A's flood holds no global tokens hostage."""
    clock = ManualClock()
    config = limits(requests_per_second=1, burst_capacity=3, per_session_rps=0.1, per_session_burst=2)
    async with serving(config, clock=clock) as (orchestrator, client):
        with anyio.fail_after(TEST_TIMEOUT_S):
            async with anyio.create_task_group() as tg:
                flood = [start_call(tg, client, {"prompt": f"a{i}", "session_id": "A"}) for i in range(10)]
                await wait_for(lambda: sum(call.done.is_set() for call in flood) == 2 and waiting(orchestrator) == 8)
                quiet = await client.call_tool("infer", {"prompt": "b", "session_id": "B"})
                status = await status_of(client)
                tg.cancel_scope.cancel()  # the rest of A's flood gives up
            totals = await totals_of(client)
    assert not quiet.is_error, quiet.content
    assert status["rate_limit"]["per_session_rps"] == 0.1
    assert status["rate_limit"]["sessions_tracked"] == 2
    assert status["rate_limit"]["tokens_available"] == 0  # 2 for A, 1 for B: A's waiters took none
    assert totals["completed"] == 3
    assert totals["cancelled"] == 8


async def test_a_sessions_refusal_names_the_per_session_limit() -> None:
    config = limits(requests_per_second=100, burst_capacity=100, per_session_rps=0.01, per_session_burst=1)
    async with serving(config, clock=ManualClock()) as (_, client):
        with anyio.fail_after(TEST_TIMEOUT_S):
            await client.call_tool("infer", {"prompt": "one", "session_id": "A"})
            refused = await client.call_tool("infer", {"prompt": "two", "session_id": "A", "deadline_ms": 5000})
            other = await client.call_tool("infer", {"prompt": "two", "session_id": "B"})
            anonymous = await client.call_tool("infer", {"prompt": "three"})
    assert "the per-session limit (0.01 requests/s, burst 1)" in error_text(refused)
    assert not other.is_error and not anonymous.is_error


async def test_cache_hits_and_coalesced_calls_spend_no_token() -> None:
    clock = ManualClock()
    async with serving(limits(requests_per_second=0.01, burst_capacity=1), clock=clock) as (_, client):
        with anyio.fail_after(TEST_TIMEOUT_S):
            first = await client.call_tool("infer", {"prompt": "popular"})
            hits = [await client.call_tool("infer", {"prompt": "popular"}) for _ in range(3)]
            new = await client.call_tool("infer", {"prompt": "unpopular", "deadline_ms": 1000})
            totals = await totals_of(client)
    assert not first.is_error
    assert all(hit.structured_content is not None and hit.structured_content["cached"] for hit in hits)
    assert "rate limited" in error_text(new)
    assert totals["cache_hits"] == 3 and totals["rate_limited"] == 1


async def test_disabled_rate_limits_admit_everything() -> None:
    async with serving(make_config(rate_limits={"requests_per_second": 0.01, "burst_capacity": 1})) as (_, client):
        with anyio.fail_after(TEST_TIMEOUT_S):
            results = [await client.call_tool("infer", {"prompt": f"p{i}"}) for i in range(5)]
            status = await status_of(client)
    assert not any(result.is_error for result in results)
    assert status["rate_limit"]["enabled"] is False
    assert status["rate_limit"]["tokens_available"] is None
