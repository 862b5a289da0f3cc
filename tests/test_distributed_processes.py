"""Several orchestrator processes sharing one real Redis behave as one orchestrator.

Real parts only: a Redis-protocol server (testbeds/redis.py), `mcp-orchestrator --transport
http` processes, MCP clients over streamable HTTP, and a counting backend that speaks the
OpenAI wire format (tests/support_distributed.py). No timed assertions: every wait is for
a condition, bounded so that a bug fails instead of hanging.

The tests in this module share one Redis, one backend and three processes, and run in
file order: the Redis outage and the killed leader come last.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from mcp import Client

from tests.support_distributed import Shared, config_text, metric, processes, shared_parts, wait_until
from tests.support_processes import HttpServer
from tests.support_tasks import TaskHandle, TasksClient, poll_until_ended
from tests.support_tasks import call as call_claimed

pytestmark = pytest.mark.anyio

SESSION_RPS = 5
SESSION_BURST = 5


@pytest.fixture(scope="module")
def parts() -> Iterator[Shared]:
    with shared_parts() as shared:
        yield shared


@pytest.fixture(scope="module")
def trio(parts: Shared, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[HttpServer]]:
    config = config_text(
        parts.redis.url,
        parts.backend,
        rate_limits={
            "enabled": True,
            "requests_per_second": 10_000,
            "burst_capacity": 10_000,
            "per_session_rps": SESSION_RPS,
            "per_session_burst": SESSION_BURST,
        },
        tasks={"inline_ms": 0},  # every task-capable call from a tasks client becomes a task
    )
    with processes(3, config, tmp_path_factory.mktemp("trio")) as servers:
        yield servers


async def infer(server: HttpServer, prompts: list[str], **arguments: Any) -> list[Any]:
    """Call `infer` once per prompt, all at once, over one MCP session; the results in order."""
    results: list[Any] = [None] * len(prompts)
    async with Client(server.mcp_url) as client:

        async def one(index: int, prompt: str) -> None:
            results[index] = await client.call_tool("infer", {"prompt": prompt, **arguments})

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for index, prompt in enumerate(prompts):
                    tg.start_soon(one, index, prompt)
    return results


async def call(server: HttpServer, tool: str, arguments: dict[str, Any]) -> Any:
    async with Client(server.mcp_url) as client:
        with anyio.fail_after(60):
            return await client.call_tool(tool, arguments)


async def status(server: HttpServer) -> dict[str, Any]:
    result = await call(server, "pipeline_status", {})
    assert not result.is_error, result.content
    data: dict[str, Any] = result.structured_content
    return data


async def assert_conserved(servers: list[HttpServer]) -> dict[str, int]:
    """Every process reconciles with nothing in flight; returns the totals of all processes."""
    summed: dict[str, int] = {}
    for server in servers:
        totals = (await status(server))["totals"]
        ended = totals["completed"] + totals["failed"] + totals["shed"] + totals["cancelled"]
        assert totals["submitted"] == ended + totals["in_flight"], totals
        assert totals["in_flight"] == 0, totals
        for key in ("submitted", "completed", "failed", "shed", "cancelled", "coalesced", "cache_hits"):
            summed[key] = summed.get(key, 0) + totals[key]
    return summed


def text(result: Any) -> str:
    return str(result.content[0].text)


# ---------------------------------------------------------------------------- coalescing and the cache


async def test_200_identical_calls_on_three_processes_cost_one_backend_call(
    parts: Shared, trio: list[HttpServer]
) -> None:
    before = await assert_conserved(trio)
    prompt = "slow what is shared state"
    batches: list[list[Any]] = [[], [], []]

    async def on(index: int) -> None:
        batches[index] = await infer(trio[index], [prompt] * (67 if index < 2 else 66))

    async with anyio.create_task_group() as tg:
        for index in range(3):
            tg.start_soon(on, index)
    results = [result for batch in batches for result in batch]
    assert len(results) == 200
    assert all(not result.is_error for result in results), [text(r) for r in results if r.is_error][:3]
    assert parts.backend.count(prompt) == 1
    assert {result.structured_content["text"] for result in results} == {f"answer to {prompt}"}
    # One call was the leader's own; every other one shared its answer (coalesced, or cached
    # when it arrived after the answer).
    own = [r for r in results if not (r.structured_content["coalesced"] or r.structured_content["cached"])]
    assert len(own) == 1
    # Each process that did not lead says so in its status.
    shared = [(await status(server))["distributed"] for server in trio]
    assert all(block["state"] == "ok" for block in shared)
    assert sum(block["flights_led"] for block in shared) >= 1
    # The leader's end was sent (the followers were answered through it) and Redis took it.
    assert sum(block["flight_ends_sent"] for block in shared) >= 1
    assert sum(block["flight_end_writes"] for block in shared) >= 1
    assert all(block["flight_ends_refused"] == 0 for block in shared)
    after = await assert_conserved(trio)
    assert after["submitted"] - before["submitted"] == 200
    assert after["completed"] - before["completed"] == 200

    # Later, an identical call on any process is answered from the shared cache.
    again = await infer(trio[2], [prompt])
    assert again[0].structured_content["cached"] is True
    assert parts.backend.count(prompt) == 1


# ---------------------------------------------------------------------------- rate limits


async def test_a_session_limit_holds_across_processes(parts: Shared, trio: list[HttpServer]) -> None:
    """45 calls of one session spread over three processes, each allowed 1 s: at most
    rate * elapsed + burst pass in total (one process alone would let rate * 1 s + burst through
    by itself, so without a shared bucket three would pass about three times as many)."""
    started = anyio.current_time()
    batches: list[list[Any]] = [[], [], []]

    async def on(index: int) -> None:
        prompts = [f"limited {index}-{n}" for n in range(15)]
        batches[index] = await infer(trio[index], prompts, session_id="limited-session", deadline_ms=1000)

    async with anyio.create_task_group() as tg:
        for index in range(3):
            tg.start_soon(on, index)
    elapsed = anyio.current_time() - started
    results = [result for batch in batches for result in batch]
    # A request that got its token may still miss its 1 s deadline on a busy machine: it was
    # admitted all the same (its token is spent), so it counts against the bound.
    refused = [r for r in results if r.is_error and "rate limited" in text(r)]
    admitted = [r for r in results if r not in refused]
    assert all("per-session" in text(r) for r in refused), [text(r) for r in refused]
    assert all(not r.is_error or "deadline" in text(r) for r in admitted), [text(r) for r in admitted if r.is_error]
    blocks = [
        {
            k: v
            for k, v in (await status(server))["distributed"].items()
            if "limit" in k or "fallback" in k or "error" in k
        }
        for server in trio
    ]
    assert SESSION_BURST <= len(admitted) <= SESSION_RPS * elapsed + SESSION_BURST, (len(admitted), elapsed, blocks)
    await assert_conserved(trio)


# ---------------------------------------------------------------------------- dead letters


async def test_dead_letters_are_listed_anywhere_and_replayed_once(parts: Shared, trio: list[HttpServer]) -> None:
    prompt = "flaky letter to the others"
    failed = (await infer(trio[0], [prompt]))[0]
    assert failed.is_error and "the backend said no" in text(failed)
    letter_ids: list[str] = []

    async def listed() -> bool:
        letters = await call(trio[1], "dead_letters", {"limit": 1000})
        found = [e["id"] for e in letters.structured_content["entries"] if e["prompt_preview"] == prompt]
        letter_ids[:] = found
        return bool(found)

    await wait_for(listed, "the dead letter written by process 0 is listed by process 1")
    assert len(letter_ids) == 1

    async def wait_listed_on_2() -> bool:
        letters = await call(trio[2], "dead_letters", {"limit": 1000})
        return any(e["id"] == letter_ids[0] for e in letters.structured_content["entries"])

    await wait_for(wait_listed_on_2, "the dead letter is listed by process 2")

    replays: list[Any] = [None, None]

    async def replay(slot: int, server: HttpServer) -> None:
        replays[slot] = await call(server, "replay_dead_letter", {"id": letter_ids[0]})

    async with anyio.create_task_group() as tg:
        tg.start_soon(replay, 0, trio[1])
        tg.start_soon(replay, 1, trio[2])
    ran = [r for r in replays if not r.is_error]
    refused = [r for r in replays if r.is_error]
    assert len(ran) == 1 and len(refused) == 1, [text(r) for r in replays]
    assert ran[0].structured_content["text"] == f"answer to {prompt}"
    assert "already replayed" in text(refused[0])
    assert parts.backend.count(prompt) == 2  # the failed call and the one replay
    await assert_conserved(trio)


async def wait_for(condition: Any, what: str) -> None:
    """Poll `condition()` (a state in other processes: nothing here can signal it), bounded."""
    with anyio.fail_after(30):
        while True:
            if await condition():
                return
            await anyio.sleep(0.05)


# ---------------------------------------------------------------------------- circuit breakers


async def test_a_breaker_opened_by_one_process_stops_the_others(
    parts: Shared, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Two more processes (their own key prefix), whose breakers open after 2 failures."""
    config = config_text(
        parts.redis.url,
        parts.backend,
        distributed={"key_prefix": "breaker-test"},
        resilience={"circuit_breaker_threshold": 2, "circuit_breaker_timeout_s": 60.0},
    )
    with processes(2, config, tmp_path_factory.mktemp("breakers")) as (first, second):
        for n in range(2):
            failed = (await infer(first, [f"fail breaker {n}"]))[0]
            assert failed.is_error and "the backend said no" in text(failed)

        async def open_on(server: HttpServer) -> bool:
            breakers = (await status(server))["breakers"]
            return bool(breakers) and breakers[0]["state"] == "open"

        assert await open_on(first)
        await wait_for(lambda: open_on(second), "the second process's breaker opened too")
        refused = (await infer(second, ["fresh prompt for a broken backend"]))[0]
        assert refused.is_error and "circuit open" in text(refused)
        assert parts.backend.count("fresh prompt for a broken backend") == 0
        assert (await status(second))["distributed"]["breaker_openings_received"] == 1
        await assert_conserved([first, second])


# ---------------------------------------------------------------------------- Redis goes away and comes back


async def test_tasks_and_background_requests_are_found_and_cancelled_from_any_process(
    parts: Shared, trio: list[HttpServer]
) -> None:
    """A task started on one process is polled to its end on another; a background request
    started on one is seen running from a second and cancelled from a third."""
    starter, poller, canceller = trio
    with anyio.fail_after(60):
        async with (
            Client(starter.mcp_url, extensions=[TasksClient()]) as on_starter,
            Client(poller.mcp_url, extensions=[TasksClient()]) as on_poller,
            Client(canceller.mcp_url) as on_canceller,
        ):
            handle = await call_claimed(on_starter, "infer", {"prompt": "slow task shared", "cache": False})
            assert isinstance(handle, TaskHandle), handle
            ended = await poll_until_ended(on_poller, handle.task_id)
            queued = await on_starter.call_tool("infer", {"prompt": "sleep until cancelled", "background": True})
            assert queued.structured_content is not None
            request_id = queued.structured_content["request_id"]
            seen = await on_poller.call_tool("request_status", {"request_id": request_id})
            cancelled = await on_canceller.call_tool("cancel_request", {"request_id": request_id})
            final = await on_poller.call_tool("request_status", {"request_id": request_id, "wait_ms": 20_000})
            for _ in range(100):  # the owner's end reaches Redis just after the cancel lands there
                if final.structured_content is not None and final.structured_content["status"] != "working":
                    break
                await anyio.sleep(0.05)
                final = await on_poller.call_tool("request_status", {"request_id": request_id})
    assert ended.status == "completed" and ended.result is not None
    assert ended.result["content"][0]["text"] == "answer to slow task shared"
    assert seen.structured_content is not None and seen.structured_content["status"] == "working"
    assert " on " in seen.structured_content["message"]  # which process runs it
    assert cancelled.structured_content is not None  # cancel_request follows the record up to 1 s
    shown = cancelled.structured_content
    assert shown["status"] == "cancelled" or "cancelling" in shown["message"], shown
    assert final.structured_content is not None and final.structured_content["status"] == "cancelled"
    await assert_conserved(trio)


async def test_a_redis_outage_loses_nothing_and_sharing_resumes(parts: Shared, trio: list[HttpServer]) -> None:
    before = await assert_conserved(trio)
    parts.redis.stop()
    try:
        outage = [
            await infer(server, [f"during the outage {i}", "same during the outage"]) for i, server in enumerate(trio)
        ]
        letter = (await infer(trio[0], ["fail while Redis is down"]))[0]
    finally:
        parts.redis.start()  # same port: the processes' URL still points at it
    assert all(not r.is_error for batch in outage for r in batch), [text(r) for b in outage for r in b if r.is_error]
    assert letter.is_error
    # Each process noticed and said so (status, metric); requests ran on local state meanwhile.
    for server in trio:
        block = (await status(server))["distributed"]
        assert block["redis_errors"] >= 1 and block["local_fallbacks"] >= 1, block
    after = await assert_conserved(trio)
    assert after["submitted"] - before["submitted"] == 7
    assert after["completed"] - before["completed"] == 6

    # Sharing resumes by itself: every process is back to ok ...
    for server in trio:
        wait_until(lambda server=server: metric(server, "orchestrator_redis_up") == 1.0, "Redis up again")

        async def subscribed(server: HttpServer = server) -> bool:
            return bool((await status(server))["distributed"]["subscribed"])

        await wait_for(subscribed, "subscribed again")
    # ... the dead letter written during the outage reached the stream and the other processes ...
    letter_id = text(letter).split("dead letter ")[-1].split()[0].strip(").,;:")

    async def listed_elsewhere() -> bool:
        letters = await call(trio[2], "dead_letters", {"limit": 1000})
        return any(e["prompt_preview"] == "fail while Redis is down" for e in letters.structured_content["entries"])

    try:
        await wait_for(listed_elsewhere, f"dead letter {letter_id} from the outage listed by another process")
    except TimeoutError:
        raise AssertionError([(await status(server))["distributed"] for server in trio]) from None
    # ... and identical calls on three processes share one backend call again.
    prompt = "slow after the outage"
    async with anyio.create_task_group() as tg:
        for server in trio:
            tg.start_soon(infer, server, [prompt] * 5)
    assert parts.backend.count(prompt) == 1
    await assert_conserved(trio)


# ---------------------------------------------------------------------------- the leader dies


async def test_a_waiter_takes_over_when_the_leader_process_dies(parts: Shared, trio: list[HttpServer]) -> None:
    """Process 0 leads a call the backend holds; process 1 waits on it. Process 0 is killed:
    its lock expires (lock_ttl_ms = 1000) and process 1 calls the backend itself."""
    prompt = "hold the line"
    leader, waiter = trio[0], trio[1]

    async def lead() -> None:
        try:
            await infer(leader, [prompt])
        except Exception:
            pass  # its process is killed under it

    async def called() -> bool:
        return parts.backend.count(prompt) == 1

    async with anyio.create_task_group() as tg:
        tg.start_soon(lead)
        await wait_for(called, "the leader called the backend")

        async def following() -> bool:
            return bool((await status(waiter))["distributed"]["flights_followed"] >= 1)

        result: list[Any] = []

        async def wait_on_it() -> None:
            result.extend(await infer(waiter, [prompt]))

        tg.start_soon(wait_on_it)
        await wait_for(following, "process 1 follows process 0's flight")
        os.kill(leader.process.pid, signal.SIGKILL)
        leader.process.wait(timeout=10)

        async def answered() -> bool:
            return bool(result)

        await wait_for(answered, "the waiter's answer")
        tg.cancel_scope.cancel()
    assert not result[0].is_error, text(result[0])
    assert result[0].structured_content["text"] == f"answer to {prompt}"
    assert parts.backend.count(prompt) == 2  # the dead leader's call, then the waiter's own
    block = (await status(waiter))["distributed"]
    assert block["flights_taken_over"] >= 1
    await assert_conserved(trio[1:])
