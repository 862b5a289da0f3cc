"""Pipeline behaviour seen through the tools: shedding and dead letters, replay, deadlines,
cancellation, priorities, worker swaps. Slow backends are the echo worker with delays;
ordering is read from the pipeline (chunk order), never from timing thresholds."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest
from anyio.abc import TaskGroup
from mcp import Client
from mcp.types import CallToolResult

from mcp_orchestrator import Orchestrator
from mcp_orchestrator.errors import OrchestratorError, RequestShed
from mcp_orchestrator.logs import Sampled
from mcp_orchestrator.models import Outcome, Priority, Submission
from mcp_orchestrator.pipeline import Pipeline, stages
from mcp_orchestrator.pipeline.prompt import post_process
from mcp_orchestrator.pipeline.stages import SHED_LOG_INTERVAL_S
from mcp_orchestrator.workers.echo import EchoWorker
from tests.conftest import error_text, make_config, running, status_of, totals_of, wait_for, with_progress
from tests.support_faults_extra import FakeClock

pytestmark = pytest.mark.anyio

TEST_TIMEOUT_S = 30.0
SLOW_MS = 60_000
"""A worker delay no test ever waits for: requests on it end by cancellation or deadline."""


@dataclass
class Call:
    """One tool call running in the background, cancellable on its own."""

    label: str
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    result: CallToolResult | None = None
    chunks: list[str] = field(default_factory=list)
    first_chunk: anyio.Event = field(default_factory=anyio.Event)
    done: anyio.Event = field(default_factory=anyio.Event)

    @property
    def cancelled(self) -> bool:
        return self.done.is_set() and self.result is None


def start_call(
    tg: TaskGroup,
    client: Client,
    label: str,
    arguments: dict[str, Any],
    *,
    tool: str = "infer",
    on_first_chunk: Callable[[str], None] | None = None,
) -> Call:
    call = Call(label)

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        if not call.chunks and on_first_chunk is not None:
            on_first_chunk(label)
        call.chunks.append(message or "")
        call.first_chunk.set()

    async def run() -> None:
        try:
            with call.scope:
                call.result = await client.call_tool(tool, arguments, **with_progress(on_progress))
        finally:
            call.done.set()

    tg.start_soon(run, name=f"call:{label}")
    return call


def busy(orchestrator: Any) -> int:
    return int(orchestrator.status().concurrency["busy"])


def inference_depth(orchestrator: Any) -> int:
    return int(orchestrator.status().stages[2].depth)


async def dead_letters(client: Client, **arguments: Any) -> dict[str, Any]:
    result = await client.call_tool("dead_letters", arguments)
    assert not result.is_error, result.content
    assert result.structured_content is not None
    return result.structured_content


def ids(listing: dict[str, Any]) -> list[str]:
    return [entry["id"] for entry in listing["entries"]]


# ---------------------------------------------------------------------------- shedding, dead letters, replay


async def test_full_inference_queue_sheds_with_a_dead_letter_that_replays() -> None:
    config = make_config(
        stages={"inference": {"concurrency": 1, "channel_capacity": 1, "delay_ms": SLOW_MS}},
    )
    async with running(config) as (orchestrator, client):
        with anyio.fail_after(TEST_TIMEOUT_S):
            async with anyio.create_task_group() as tg:
                blocker = start_call(tg, client, "blocker", {"prompt": "occupies the only slot"})
                await wait_for(lambda: busy(orchestrator) == 1)
                queued = start_call(tg, client, "queued", {"prompt": "waits in the queue"})
                await wait_for(lambda: inference_depth(orchestrator) == 1)

                shed_arguments = {"prompt": "one too many", "session_id": "shed-me", "stop": ["many"]}
                shed = await client.call_tool("infer", shed_arguments)
                message = error_text(shed)
                assert "shed" in message
                assert "inference" in message
                assert "dl-1" in message

                listing = await dead_letters(client)
                assert listing["total"] == 1
                (letter,) = listing["entries"]
                assert letter["id"] == "dl-1"
                assert letter["stage"] == "inference"
                assert letter["reason"] == "queue_full"
                assert letter["session_id"] == "shed-me"
                assert letter["prompt_preview"] == "one too many"
                assert letter["request_id"]
                assert letter["created_at"] > 0
                status = await status_of(client)
                assert status["stages"][2]["shed"] == 1
                assert status["totals"]["shed"] == 1

                # A fast worker for new work; the blocker stays on the slow one until cancelled,
                # after which the queued request and the replay run on the fast one.
                configured = await client.call_tool("configure_worker", {"kind": "echo", "delay_ms": 0})
                assert not configured.is_error, configured.content
                blocker.scope.cancel()
                await queued.done.wait()
                replayed = await client.call_tool("replay_dead_letter", {"id": "dl-1"})
                again = await client.call_tool("replay_dead_letter", {"id": "dl-1"})
        totals = await totals_of(client)
    assert blocker.cancelled
    assert queued.result is not None and not queued.result.is_error, queued.result
    assert not replayed.is_error, replayed.content
    # The replay is the original request, parameters included (its stop sequence cuts the echo).
    assert replayed.content[0].text == "one too"
    assert replayed.structured_content is not None
    assert replayed.structured_content["text"] == "one too"
    # A letter is replayed once, as with Redis (a second replay could repeat a side effect).
    assert "dead letter dl-1 not replayed: already replayed by this process" in error_text(again)
    assert totals["submitted"] == 4
    assert totals["shed"] == 1
    assert totals["cancelled"] == 1
    assert totals["completed"] == 2
    assert totals["in_flight"] == 0


def quick_submissions(pipeline: Pipeline, count: int) -> list[Any]:
    """Submit `count` requests without yielding in between, so a tiny RAG queue must shed."""
    return [
        pipeline.submit(Submission(prompt=f"request {index}", session_id=f"s{index}", cache=False, dedup=False))
        for index in range(count)
    ]


class HeldRetrieval:
    """A context source that holds every retrieval until released: the RAG stage stays busy
    (as with a slow vector store), so its queue fills."""

    def __init__(self) -> None:
        self.release = anyio.Event()

    async def retrieve(self, query: str, session_id: str | None, max_tokens: int) -> list[str]:
        await self.release.wait()
        return []


async def test_full_rag_queue_sheds_and_the_ring_keeps_only_the_newest() -> None:
    """RAG queue of 1 behind a slow context source: the idle RAG task takes the first request,
    the queue holds the second, the next five are shed (dl-1 .. dl-5) and a ring of 3 keeps
    dl-3 .. dl-5."""
    config = make_config(stages={"rag": {"channel_capacity": 1}}, pipeline={"dead_letter_capacity": 3})
    held = HeldRetrieval()
    async with running(config, context_source=held) as (orchestrator, client):
        with anyio.fail_after(TEST_TIMEOUT_S):
            requests = quick_submissions(orchestrator.pipeline, 7)
            for request in requests[2:]:
                assert request.outcome is Outcome.shed
                assert isinstance(request.error, RequestShed)
                assert request.error.stage == "rag"
            held.release.set()
            accepted = [await orchestrator.pipeline.wait(request) for request in requests[:2]]
            everything = await dead_letters(client)
            newest_two = await dead_letters(client, limit=2)
            one_session = await dead_letters(client, session_id="s5")
            dropped_session = await dead_letters(client, session_id="s2")
            by_reason = await dead_letters(client, reason="queue_full")
            other_reason = await dead_letters(client, reason="deadline_exceeded")
            replay_dropped = await client.call_tool("replay_dead_letter", {"id": "dl-1"})
            status = await status_of(client)
    assert [result.text for result in accepted] == ["request 0", "request 1"]
    assert [request.error.dead_letter_id for request in requests[2:]] == ["dl-1", "dl-2", "dl-3", "dl-4", "dl-5"]
    assert ids(everything) == ["dl-5", "dl-4", "dl-3"]
    assert everything["total"] == 3
    assert everything["capacity"] == 3
    assert [entry["stage"] for entry in everything["entries"]] == ["rag"] * 3
    assert [entry["reason"] for entry in everything["entries"]] == ["queue_full"] * 3
    assert [entry["session_id"] for entry in everything["entries"]] == ["s6", "s5", "s4"]
    assert [entry["prompt_preview"] for entry in everything["entries"]] == ["request 6", "request 5", "request 4"]
    assert ids(newest_two) == ["dl-5", "dl-4"]
    assert ids(one_session) == ["dl-4"]
    assert ids(dropped_session) == []
    assert ids(by_reason) == ["dl-5", "dl-4", "dl-3"]
    assert ids(other_reason) == []
    assert "dl-1" in error_text(replay_dropped)
    assert status["stages"][0]["shed"] == 5
    assert status["totals"]["shed"] == 5
    assert status["totals"]["completed"] == 2


async def test_shedding_logs_one_warning_per_stage_and_interval(caplog: pytest.LogCaptureFixture) -> None:
    """Under overload every shed request is a dead letter and a metric, but not a log line:
    one warning per stage per interval, the next one counting those left out."""
    clock = FakeClock()
    held = HeldRetrieval()
    orchestrator = Orchestrator(make_config(stages={"rag": {"channel_capacity": 1}}), context_source=held, clock=clock)
    caplog.set_level(logging.WARNING, logger="mcp_orchestrator.pipeline.stages")
    async with orchestrator:  # running: every stage's task waits for work
        with anyio.fail_after(TEST_TIMEOUT_S):
            first = quick_submissions(orchestrator.pipeline, 7)  # 1 retrieving, 1 queued, 5 shed
            clock.advance(SHED_LOG_INTERVAL_S)
            later = orchestrator.pipeline.submit(Submission(prompt="one more", cache=False, dedup=False))
            held.release.set()
            for request in first[:2]:
                await orchestrator.pipeline.wait(request)
    warnings = [record.getMessage() for record in caplog.records if "shed at rag" in record.getMessage()]
    assert later.outcome is Outcome.shed
    assert orchestrator.status().totals.shed == 6
    assert len(warnings) == 2
    assert "more shed" not in warnings[0]
    assert warnings[1].endswith("(4 more shed there since the last such line)")


def test_sampled_takes_one_record_per_key_and_interval() -> None:
    now = [0.0]
    sampled = Sampled(1.0, clock=lambda: now[0])
    assert [sampled.take("a"), sampled.take("a"), sampled.take("b"), sampled.take("a")] == [0, None, 0, None]
    now[0] = 1.0
    assert [sampled.take("a"), sampled.take("a"), sampled.take("b")] == [2, None, 0]


async def test_a_bug_in_a_stage_fails_that_request_only_whether_it_queued_or_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Light stages run a request at once when their task is idle, or from their queue when
    it is not: either way a stage that raises fails that one request with a dead letter."""

    def fragile(text: str, *args: Any) -> tuple[str, bool]:
        if "boom" in text:
            raise RuntimeError("post-processor bug")
        return post_process(text, *args)

    monkeypatch.setattr(stages, "post_process", fragile)  # a bug in the stage's own work
    async with running() as (orchestrator, client):
        pipeline = orchestrator.pipeline
        with anyio.fail_after(TEST_TIMEOUT_S):
            direct = await client.call_tool("infer", {"prompt": "boom now", "cache": False})
            fine = await client.call_tool("infer", {"prompt": "fine now", "cache": False})
            # Many at once: later ones queue behind the first while the stage task is busy.
            burst = quick_submissions(pipeline, 20)
            booms = [pipeline.submit(Submission(prompt=f"boom {index}", dedup=False)) for index in range(3)]
            outcomes = []
            for request in [*burst, *booms]:
                try:
                    outcomes.append((await pipeline.wait(request)).text)
                except OrchestratorError as exc:
                    outcomes.append(str(exc))
            letters = await dead_letters(client, reason="internal_error")
            status = await status_of(client)
    assert "internal error in the post_process stage: post-processor bug" in error_text(direct)
    assert not fine.is_error and fine.content[0].text == "fine now"
    assert outcomes[:20] == [f"request {index}" for index in range(20)]
    assert all("post-processor bug" in outcome for outcome in outcomes[20:])
    assert letters["total"] == 4 and {entry["stage"] for entry in letters["entries"]} == {"post_process"}
    assert status["totals"]["completed"] == 21 and status["totals"]["failed"] == 4


# ---------------------------------------------------------------------------- deadlines and timeouts


async def test_deadline_expiry_fails_the_request_with_a_dead_letter() -> None:
    config = make_config(stages={"inference": {"delay_ms": SLOW_MS}})
    async with running(config) as (orchestrator, client):
        with anyio.fail_after(TEST_TIMEOUT_S):
            result = await client.call_tool("infer", {"prompt": "too slow", "deadline_ms": 40, "session_id": "d"})
            await wait_for(lambda: busy(orchestrator) == 0)  # the worker call was stopped too
            letters = await dead_letters(client, reason="deadline_exceeded")
            totals = await totals_of(client)
    message = error_text(result)
    assert "deadline" in message
    assert "40 ms" in message
    assert "inference" in message
    (letter,) = letters["entries"]
    assert letter["stage"] == "inference"
    assert letter["session_id"] == "d"
    assert letter["prompt_preview"] == "too slow"
    assert totals["failed"] == 1
    assert totals["completed"] == 0
    assert totals["in_flight"] == 0


async def test_stage_timeout_is_reported_separately_from_the_deadline() -> None:
    config = make_config(
        stages={"inference": {"delay_ms": SLOW_MS, "timeout_ms": 40}},
        resilience={"retry_attempts": 0},
    )
    async with running(config) as (_, client):
        with anyio.fail_after(TEST_TIMEOUT_S):
            result = await client.call_tool("infer", {"prompt": "stage too slow"})
            letters = await dead_letters(client)
            totals = await totals_of(client)
    message = error_text(result)
    assert "inference" in message
    assert "timed out" in message
    assert letters["entries"][0]["reason"] == "stage_timeout"
    assert totals["failed"] == 1


async def test_default_deadline_comes_from_the_config() -> None:
    config = make_config(stages={"inference": {"delay_ms": SLOW_MS}}, pipeline={"default_deadline_ms": 30})
    async with running(config) as (_, client):
        with anyio.fail_after(TEST_TIMEOUT_S):
            result = await client.call_tool("infer", {"prompt": "no explicit deadline"})
    assert "deadline of 30 ms exceeded" in error_text(result)


# ---------------------------------------------------------------------------- cancellation


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_cancelling_one_call_leaves_the_others_intact(mode: str) -> None:
    """auto: the in-memory client runs the handler in the caller's task, so cancelling the
    caller cancels the handler directly. legacy: JSON-RPC over memory streams, so the
    cancellation must travel as a notifications/cancelled message."""
    config = make_config(stages={"inference": {"concurrency": 8}})
    async with running(config, mode=mode) as (orchestrator, client):
        with anyio.fail_after(TEST_TIMEOUT_S):
            slow = await client.call_tool("configure_worker", {"kind": "echo", "chunk_delay_ms": 25})
            assert not slow.is_error, slow.content
            async with anyio.create_task_group() as tg:
                calls = [
                    start_call(tg, client, f"c{i}", {"prompt": f"call {i} streams eight words slowly ok"})
                    for i in range(4)
                ]
                for call in calls:
                    await call.first_chunk.wait()
                calls[1].scope.cancel()
                await wait_for(lambda: orchestrator.status().totals.cancelled == 1)
            totals = await totals_of(client)
    assert calls[1].cancelled
    for index in (0, 2, 3):
        result = calls[index].result
        assert result is not None and not result.is_error, result
        assert result.content[0].text == f"call {index} streams eight words slowly ok"
    assert totals["cancelled"] == 1
    assert totals["completed"] == 3
    assert totals["failed"] == 0
    assert totals["submitted"] == 4
    assert totals["in_flight"] == 0


async def test_cancelling_a_queued_request_frees_its_place() -> None:
    config = make_config(stages={"inference": {"concurrency": 1, "channel_capacity": 1, "delay_ms": SLOW_MS}})
    async with running(config) as (orchestrator, client):
        with anyio.fail_after(TEST_TIMEOUT_S):
            async with anyio.create_task_group() as tg:
                blocker = start_call(tg, client, "blocker", {"prompt": "holds the slot"})
                await wait_for(lambda: busy(orchestrator) == 1)
                queued = start_call(tg, client, "queued", {"prompt": "gives up while queued"})
                await wait_for(lambda: inference_depth(orchestrator) == 1)
                queued.scope.cancel()
                await queued.done.wait()
                depth_after_cancel = inference_depth(orchestrator)
                # The cancelled request no longer holds the only queue place: a new one is admitted.
                successor = start_call(tg, client, "successor", {"prompt": "takes the freed place"})
                await wait_for(lambda: inference_depth(orchestrator) == 1 or successor.done.is_set())
                successor_shed = successor.done.is_set()
                successor.scope.cancel()
                blocker.scope.cancel()
            totals = await totals_of(client)
    assert queued.cancelled and blocker.cancelled
    assert depth_after_cancel == 0
    assert not successor_shed, successor.result
    assert totals["cancelled"] == 3
    assert totals["shed"] == 0


async def test_a_request_whose_deadline_passed_in_the_queue_frees_its_place() -> None:
    config = make_config(stages={"inference": {"concurrency": 1, "channel_capacity": 1, "delay_ms": SLOW_MS}})
    async with running(config) as (orchestrator, client):
        with anyio.fail_after(TEST_TIMEOUT_S):
            async with anyio.create_task_group() as tg:
                blocker = start_call(tg, client, "blocker", {"prompt": "holds the slot"})
                await wait_for(lambda: busy(orchestrator) == 1)
                expired = await client.call_tool("infer", {"prompt": "expires in the queue", "deadline_ms": 30})
                letters = await dead_letters(client)
                depth = inference_depth(orchestrator)
                blocker.scope.cancel()
    assert "deadline of 30 ms exceeded while in the inference stage" in error_text(expired)
    assert letters["entries"][0]["reason"] == "deadline_exceeded"
    assert depth == 0


# ---------------------------------------------------------------------------- priorities

MIXED_ORDER = [
    ("low-1", "low"),
    ("normal-1", "normal"),
    ("critical-1", "critical"),
    ("high-1", "high"),
    ("low-2", "low"),
    ("normal-2", "normal"),
    ("high-2", "high"),
    ("critical-2", "critical"),
]
EXPECTED_ORDER = ["critical-1", "critical-2", "high-1", "high-2", "normal-1", "normal-2", "low-1", "low-2"]


async def test_saturated_inference_serves_higher_priority_first() -> None:
    config = make_config(stages={"inference": {"concurrency": 1, "delay_ms": SLOW_MS}})
    started: list[str] = []
    async with running(config) as (orchestrator, client):
        with anyio.fail_after(TEST_TIMEOUT_S):
            async with anyio.create_task_group() as tg:
                blocker = start_call(tg, client, "blocker", {"prompt": "occupies the slot"})
                await wait_for(lambda: busy(orchestrator) == 1)
                fast = await client.call_tool("configure_worker", {"kind": "echo", "delay_ms": 0})
                assert not fast.is_error, fast.content
                calls = []
                for position, (label, priority) in enumerate(MIXED_ORDER, start=1):
                    arguments = {"prompt": f"{label} answers", "priority": priority}
                    calls.append(start_call(tg, client, label, arguments, on_first_chunk=started.append))
                    await wait_for(lambda position=position: inference_depth(orchestrator) == position)
                blocker.scope.cancel()
            totals = await totals_of(client)
    assert started == EXPECTED_ORDER
    for call in calls:
        assert call.result is not None and call.result.content[0].text == f"{call.label} answers"
    assert totals["completed"] == len(MIXED_ORDER)
    assert totals["cancelled"] == 1


async def test_a_critical_caller_joining_a_low_flight_moves_it_up_the_queue() -> None:
    """Coalescing must not make an urgent caller wait in a slow class: the shared trip
    takes the best class of the callers waiting on it."""
    config = make_config(stages={"inference": {"concurrency": 1, "delay_ms": SLOW_MS}})
    started: list[str] = []
    async with running(config) as (orchestrator, client):
        with anyio.fail_after(TEST_TIMEOUT_S):
            async with anyio.create_task_group() as tg:
                blocker = start_call(tg, client, "blocker", {"prompt": "occupies the slot"})
                await wait_for(lambda: busy(orchestrator) == 1)
                fast = await client.call_tool("configure_worker", {"kind": "echo", "delay_ms": 0})
                assert not fast.is_error, fast.content
                queued = [("shared-low", "shared question", "low"), ("normal", "normal question", "normal")]
                queued.append(("high", "high question", "high"))
                calls = []
                for position, (label, prompt, priority) in enumerate(queued, start=1):
                    arguments = {"prompt": prompt, "priority": priority}
                    calls.append(start_call(tg, client, label, arguments, on_first_chunk=started.append))
                    await wait_for(lambda position=position: inference_depth(orchestrator) == position)
                arguments = {"prompt": "shared question", "priority": "critical"}
                calls.append(start_call(tg, client, "shared-critical", arguments, on_first_chunk=started.append))
                await wait_for(lambda: orchestrator.status().totals.in_flight == 5)  # joined the low flight
                assert inference_depth(orchestrator) == 3  # a follower takes no queue place
                blocker.scope.cancel()
            totals = await totals_of(client)
    assert set(started[:2]) == {"shared-low", "shared-critical"}
    assert started[2:] == ["high", "normal"]
    by_label = {call.label: call.result for call in calls}
    follower = by_label["shared-critical"]
    assert follower is not None and follower.structured_content is not None
    assert follower.structured_content["coalesced"] is True
    assert totals["completed"] == 4 and totals["coalesced"] == 1


async def test_priority_order_at_the_pipeline_level() -> None:
    """The same law without MCP in between: the worker's chunk order is the service order."""
    config = make_config(stages={"inference": {"concurrency": 1}})
    served: list[str] = []
    async with running(config) as (orchestrator, _):
        pipeline = orchestrator.pipeline
        with anyio.fail_after(TEST_TIMEOUT_S):
            await pipeline.swap_worker(EchoWorker(delay_ms=SLOW_MS))
            blocker = pipeline.submit(Submission(prompt="blocker"))
            await wait_for(lambda: busy(orchestrator) == 1)
            await pipeline.swap_worker(EchoWorker())
            requests = []
            for label, priority in MIXED_ORDER:

                def record(text: str, label: str = label) -> None:
                    if label not in served:
                        served.append(label)

                submission = Submission(prompt=label, priority=Priority(priority))
                requests.append(pipeline.submit(submission, on_chunk=record))
            await wait_for(lambda: inference_depth(orchestrator) == len(MIXED_ORDER))
            with anyio.CancelScope() as scope:
                scope.cancel()
                await pipeline.wait(blocker)
            results = [await pipeline.wait(request) for request in requests]
    assert served == EXPECTED_ORDER
    assert [result.text for result in results] == [label for label, _ in MIXED_ORDER]
    assert blocker.outcome is Outcome.cancelled


# ---------------------------------------------------------------------------- worker swap under load


async def test_configure_worker_swap_while_requests_are_in_flight() -> None:
    config = make_config(stages={"inference": {"model": "old-model"}})
    async with running(config) as (_, client):
        with anyio.fail_after(TEST_TIMEOUT_S):
            slow = await client.call_tool("configure_worker", {"kind": "echo", "model": "old", "chunk_delay_ms": 20})
            assert not slow.is_error, slow.content
            async with anyio.create_task_group() as tg:
                in_flight = [start_call(tg, client, f"old-{i}", {"prompt": f"old {i} a b c d e f g"}) for i in range(3)]
                for call in in_flight:
                    await call.first_chunk.wait()
                swapped = await client.call_tool("configure_worker", {"kind": "echo", "model": "new"})
                status = await status_of(client)
                fresh = await client.call_tool("infer", {"prompt": "after the swap"})
            totals = await totals_of(client)
    assert swapped.structured_content is not None
    assert swapped.structured_content["model"] == "new"
    assert swapped.structured_content["previous"]["model"] == "old"
    assert status["worker"]["model"] == "new"
    for index, call in enumerate(in_flight):
        assert call.result is not None and not call.result.is_error, call.result
        assert call.result.structured_content is not None
        assert call.result.structured_content["model"] == "old"
        assert call.result.structured_content["text"] == f"old {index} a b c d e f g"
    assert fresh.structured_content is not None
    assert fresh.structured_content["model"] == "new"
    assert totals["completed"] == 4
