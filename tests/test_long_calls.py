"""Long calls through a real (in-memory) MCP client: the tasks extension, background requests
(infer(background=true), request_status, cancel_request) and batch_infer.

Every scenario ends with the conservation law checked by `serving` (each request ended once,
the counters reconcile), background and task requests included.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp.types import CallToolResult

from mcp_orchestrator.models import StageName, Usage
from mcp_orchestrator.server import progress
from mcp_orchestrator.shutdown import Shutdown
from mcp_orchestrator.workers.base import Chunk, WorkerError, WorkerRequest
from mcp_orchestrator.workers.echo import EchoWorker
from tests.conftest import error_text, make_config, status_of, totals_of, wait_for, with_progress
from tests.support_admission import GatedWorker, serving, start_call
from tests.support_tasks import (
    TaskHandle,
    TasksClient,
    call,
    cancel_task,
    error_of,
    get_task,
    poll_until_ended,
    update_task,
)
from tests.support_workers import StubWorker

pytestmark = pytest.mark.anyio

TEST_TIMEOUT_S = 30.0
TASKS_AT_ONCE = make_config(tasks={"inline_ms": 0})
"""Every task-capable call becomes a task (the inline wait is 0)."""
SLOW = 300
"""Milliseconds the slow echo worker takes: far beyond an inline wait of 0, and quick for a test."""


def answer_fields(result: dict[str, Any]) -> dict[str, Any]:
    """What two runs of the same prompt have in common (ids and timings differ)."""
    return {key: value for key, value in result.items() if key not in ("request_id", "latency_ms", "stage_ms")}


# ---------------------------------------------------------------------------- the tasks extension


async def test_a_slow_call_becomes_a_task_whose_result_is_the_inline_one() -> None:
    async with (
        serving(TASKS_AT_ONCE, EchoWorker(delay_ms=SLOW)) as (orchestrator, client),
        Client(orchestrator.server, extensions=[TasksClient()]) as tasks_client,
    ):
        with anyio.fail_after(TEST_TIMEOUT_S):
            handle = await call(tasks_client, "infer", {"prompt": "tell me a story", "cache": False})
            assert isinstance(handle, TaskHandle), handle
            assert handle.status == "working"
            assert handle.ttl_ms is None and handle.poll_interval_ms == 2_000  # kept while it runs
            assert handle.created_at.endswith("Z") and handle.status_message
            first = await get_task(tasks_client, handle.task_id)  # resolves at once: never "not found"
            assert first.status in ("working", "completed")
            ended = await poll_until_ended(tasks_client, handle.task_id)
            inline = await client.call_tool("infer", {"prompt": "tell me a story", "cache": False})
    assert ended.status == "completed"
    assert ended.ttl_ms is not None and ended.ttl_ms >= 900_000 + SLOW  # from creation: its run time + ttl_s
    assert ended.result is not None and ended.result["isError"] is False
    assert ended.result["content"] == [{"type": "text", "text": "tell me a story"}]
    assert inline.structured_content is not None
    assert answer_fields(ended.result["structuredContent"]) == answer_fields(inline.structured_content)
    assert ended.result["content"][0]["text"] == inline.content[0].text  # type: ignore[union-attr]


async def test_a_quick_call_is_answered_inline_even_when_the_client_supports_tasks() -> None:
    async with (
        serving(make_config(tasks={"inline_ms": 10_000})) as (orchestrator, _),
        Client(orchestrator.server, extensions=[TasksClient()]) as tasks_client,
    ):
        result = await call(tasks_client, "infer", {"prompt": "quick"})
        status = orchestrator.status()
    assert isinstance(result, CallToolResult) and not result.is_error
    assert result.structured_content is not None and result.structured_content["text"] == "quick"
    assert status.jobs is not None and status.jobs.kept == 0  # answered inline: no task left behind


async def test_a_client_without_the_extension_never_gets_a_task() -> None:
    async with serving(TASKS_AT_ONCE, EchoWorker(delay_ms=SLOW)) as (_, client):
        result = await client.call_tool("infer", {"prompt": "no tasks here"})
        batch = await client.call_tool("batch_infer", {"prompts": ["a", "b"]})
        refused = await error_of(get_task(client, "00000000-0000-0000-0000-000000000000"))
    assert isinstance(result, CallToolResult) and result.structured_content is not None
    assert result.structured_content["text"] == "no tasks here"
    assert batch.structured_content is not None and batch.structured_content["completed"] == 2
    assert refused.error.code == -32021
    assert refused.error.data == {"requiredCapabilities": {"extensions": {"io.modelcontextprotocol/tasks": {}}}}


async def test_unknown_and_other_callers_task_ids_are_invalid_params() -> None:
    async with (
        serving(TASKS_AT_ONCE, EchoWorker(delay_ms=SLOW)) as (orchestrator, _),
        Client(orchestrator.server, extensions=[TasksClient()]) as tasks_client,
    ):
        unknown = await error_of(get_task(tasks_client, "no-such-task"))
        cancel_unknown = await error_of(cancel_task(tasks_client, "no-such-task"))
        handle = await call(tasks_client, "infer", {"prompt": "hi"})
        assert isinstance(handle, TaskHandle)
        await update_task(tasks_client, handle.task_id)  # acknowledged: nothing here asks for input
        await poll_until_ended(tasks_client, handle.task_id)
    assert unknown.error.code == -32602 and "no task or background request 'no-such-task'" in unknown.error.message
    assert cancel_unknown.error.code == -32602


async def test_bad_task_ids_are_named_in_the_error() -> None:
    async with (
        serving() as (orchestrator, _),
        Client(orchestrator.server, extensions=[TasksClient()]) as tasks_client,
    ):
        too_long = await error_of(get_task(tasks_client, "x" * 65))
        empty = await error_of(cancel_task(tasks_client, ""))
    assert too_long.error.code == -32602 and "taskId: required, a string of 1-64 characters" in too_long.error.message
    assert empty.error.code == -32602 and 'got ""' in empty.error.message


async def test_an_ended_task_expires_after_its_ttl_with_a_clear_error() -> None:
    config = make_config(tasks={"inline_ms": 0, "ttl_s": 1})
    async with (
        serving(config, EchoWorker(delay_ms=50)) as (orchestrator, _),
        Client(orchestrator.server, extensions=[TasksClient()]) as tasks_client,
    ):
        handle = await call(tasks_client, "infer", {"prompt": "short lived"})
        assert isinstance(handle, TaskHandle)
        assert (await poll_until_ended(tasks_client, handle.task_id)).status == "completed"
        await anyio.sleep(1.1)  # past ttl_s: the result is dropped
        expired = await error_of(get_task(tasks_client, handle.task_id))
        status = orchestrator.status()
    assert expired.error.code == -32602
    assert "has expired" in expired.error.message and "[tasks] ttl_s" in expired.error.message
    assert status.jobs is not None and status.jobs.expired == 1 and status.jobs.kept == 0


async def test_a_tool_error_is_a_completed_task_with_is_error() -> None:
    async with (
        serving(TASKS_AT_ONCE, EchoWorker(delay_ms=2_000)) as (orchestrator, _),
        Client(orchestrator.server, extensions=[TasksClient()]) as tasks_client,
    ):
        handle = await call(tasks_client, "infer", {"prompt": "too slow", "deadline_ms": 100})
        assert isinstance(handle, TaskHandle)
        ended = await poll_until_ended(tasks_client, handle.task_id)
        letters = await tasks_client.call_tool("dead_letters", {})
    assert ended.status == "completed" and ended.error is None
    assert ended.result is not None and ended.result["isError"] is True
    assert "deadline" in ended.result["content"][0]["text"]
    assert letters.structured_content is not None
    assert letters.structured_content["entries"][0]["job_id"] == handle.task_id  # the letter names its task


async def test_cancelling_a_coalesced_task_leaves_the_other_callers_answer() -> None:
    worker = GatedWorker()
    async with (
        serving(TASKS_AT_ONCE, worker) as (orchestrator, client),
        Client(orchestrator.server, extensions=[TasksClient()]) as tasks_client,
    ):
        with anyio.fail_after(TEST_TIMEOUT_S):
            handle = await call(tasks_client, "infer", {"prompt": "shared question"})
            assert isinstance(handle, TaskHandle)
            async with anyio.create_task_group() as tg:
                other = start_call(tg, client, {"prompt": "shared question"})
                await wait_for(lambda: orchestrator.status().cache.waiting == 1 and worker.calls == 1)
                await cancel_task(tasks_client, handle.task_id)
                cancelled = await poll_until_ended(tasks_client, handle.task_id)
                worker.open()
            totals = await totals_of(client)
    assert cancelled.status == "cancelled"
    assert other.structured["text"] == "shared question"
    assert worker.calls == 1 and worker.finished == 1 and worker.cancelled == 0
    assert totals["cancelled"] == 1 and totals["completed"] == 1


async def test_a_background_call_from_a_tasks_client_answers_with_its_own_id() -> None:
    async with (
        serving(TASKS_AT_ONCE, EchoWorker(delay_ms=SLOW)) as (orchestrator, _),
        Client(orchestrator.server, extensions=[TasksClient()]) as tasks_client,
    ):
        queued = await call(tasks_client, "infer", {"prompt": "mine", "background": True})
        assert isinstance(queued, CallToolResult) and queued.structured_content is not None
        done = await tasks_client.call_tool(
            "request_status", {"request_id": queued.structured_content["request_id"], "wait_ms": 10_000}
        )
    assert done.structured_content is not None and done.structured_content["status"] == "completed"


async def test_a_batch_can_run_as_a_task() -> None:
    async with (
        serving(TASKS_AT_ONCE, EchoWorker(delay_ms=50)) as (orchestrator, _),
        Client(orchestrator.server, extensions=[TasksClient()]) as tasks_client,
    ):
        handle = await call(tasks_client, "batch_infer", {"prompts": ["one", "two", "one"]})
        assert isinstance(handle, TaskHandle)
        ended = await poll_until_ended(tasks_client, handle.task_id)
    assert ended.status == "completed" and ended.result is not None
    batch = ended.result["structuredContent"]
    assert [item["text"] for item in batch["items"]] == ["one", "two", "one"]
    assert batch["distinct"] == 2


# ---------------------------------------------------------------------------- background requests


async def test_a_background_request_outlives_a_short_client_timeout_and_is_fetched_by_id() -> None:
    async with serving(worker=EchoWorker(delay_ms=1_000)) as (_, client):
        with anyio.fail_after(TEST_TIMEOUT_S):
            timed_out = await error_of(
                client.session.call_tool("infer", {"prompt": "a long answer"}, read_timeout_seconds=0.2)
            )
            queued = await client.session.call_tool(
                "infer", {"prompt": "a long answer", "background": True}, read_timeout_seconds=0.2
            )
            assert isinstance(queued, CallToolResult) and queued.structured_content is not None
            request_id = queued.structured_content["request_id"]
            fetched = await client.call_tool("request_status", {"request_id": request_id, "wait_ms": 10_000})
    assert "Timed out" in timed_out.error.message or timed_out.error.code != 0
    assert queued.structured_content["status"] == "queued"
    assert "request_status" in queued.content[0].text  # type: ignore[union-attr]
    assert fetched.structured_content is not None
    assert fetched.structured_content["status"] == "completed"
    assert fetched.content[0].text == "a long answer"  # type: ignore[union-attr]
    assert fetched.structured_content["result"]["text"] == "a long answer"


async def test_request_status_shows_where_a_queued_request_is() -> None:
    worker = GatedWorker()
    config = make_config(stages={"inference": {"concurrency": 1}})
    async with serving(config, worker) as (orchestrator, client):
        with anyio.fail_after(TEST_TIMEOUT_S):
            first = await client.call_tool("infer", {"prompt": "first", "background": True})
            second = await client.call_tool("infer", {"prompt": "second", "background": True})
            assert first.structured_content is not None and second.structured_content is not None
            await wait_for(lambda: worker.calls == 1 and orchestrator.pipeline.stages.depth(StageName.inference) == 1)
            waiting = await client.call_tool("request_status", {"request_id": second.structured_content["request_id"]})
            running = await client.call_tool("request_status", {"request_id": first.structured_content["request_id"]})
            status = await status_of(client)
            metrics = orchestrator.pipeline.metrics.render().decode()
            worker.open()
            for queued in (first, second):
                assert queued.structured_content is not None
                done = await client.call_tool(
                    "request_status", {"request_id": queued.structured_content["request_id"], "wait_ms": 10_000}
                )
                assert done.structured_content is not None and done.structured_content["status"] == "completed"
    assert waiting.structured_content is not None and running.structured_content is not None
    assert waiting.structured_content["status"] == "queued"
    assert waiting.structured_content["stage"] == "inference" and waiting.structured_content["position"] == 1
    assert "position 1" in waiting.structured_content["message"]
    assert running.structured_content["status"] == "working" and running.structured_content["position"] is None
    assert status["jobs"]["running_background"] == 2
    assert 'orchestrator_jobs_running{kind="background"} 2.0' in metrics


async def test_cancel_request_leaves_an_identical_request_of_another_caller_alone() -> None:
    worker = GatedWorker()
    async with serving(worker=worker) as (orchestrator, client):
        with anyio.fail_after(TEST_TIMEOUT_S):
            queued = await client.call_tool("infer", {"prompt": "same", "background": True})
            assert queued.structured_content is not None
            request_id = queued.structured_content["request_id"]
            async with anyio.create_task_group() as tg:
                other = start_call(tg, client, {"prompt": "same"})
                await wait_for(lambda: orchestrator.status().cache.waiting == 1)
                cancelled = await client.call_tool("cancel_request", {"request_id": request_id})
                worker.open()
            again = await client.call_tool("cancel_request", {"request_id": request_id})  # already ended: no change
            totals = await totals_of(client)
    assert cancelled.structured_content is not None and cancelled.structured_content["status"] == "cancelled"
    assert again.structured_content is not None and again.structured_content["status"] == "cancelled"
    assert other.structured["text"] == "same" and worker.calls == 1 and worker.cancelled == 0
    assert totals["cancelled"] == 1 and totals["completed"] == 1


async def test_waiting_calls_send_progress_heartbeats(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "HEARTBEAT_S", 0.05)
    worker = GatedWorker()
    beats: list[tuple[float, float | None, str | None]] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        beats.append((value, total, message))
        if len(beats) >= 3:
            worker.open()

    async with serving(worker=worker) as (_, client):
        with anyio.fail_after(TEST_TIMEOUT_S):
            queued = await client.call_tool("infer", {"prompt": "slow one", "background": True})
            assert queued.structured_content is not None
            done = await client.call_tool(
                "request_status",
                {"request_id": queued.structured_content["request_id"], "wait_ms": 20_000},
                **with_progress(on_progress),
            )
    assert done.structured_content is not None and done.structured_content["status"] == "completed"
    assert len(beats) >= 3
    values = [value for value, _, _ in beats]
    assert values == sorted(values) and len(set(values)) == len(values)  # strictly increasing
    assert all(message and "inference" in message for _, _, message in beats)


async def test_inline_infer_sends_heartbeats_while_it_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "HEARTBEAT_S", 0.05)
    worker = GatedWorker()
    beats: list[str | None] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        beats.append(message)
        if len(beats) >= 2:
            worker.open()

    async with serving(worker=worker) as (_, client):
        with anyio.fail_after(TEST_TIMEOUT_S):
            result = await client.call_tool("infer", {"prompt": "wait for it"}, **with_progress(on_progress))
    assert not result.is_error
    assert beats[:2] == ["in the inference stage", "in the inference stage"]


async def test_background_ids_are_checked_and_a_failed_background_request_says_why() -> None:
    async with serving(worker=EchoWorker(delay_ms=2_000)) as (_, client):
        unknown = await client.call_tool("request_status", {"request_id": "nope"})
        bad_wait = await client.call_tool("request_status", {"request_id": "x", "wait_ms": 60_001})
        queued = await client.call_tool("infer", {"prompt": "late", "deadline_ms": 50, "background": True})
        assert queued.structured_content is not None
        request_id = queued.structured_content["request_id"]
        failed = await client.call_tool("request_status", {"request_id": request_id, "wait_ms": 10_000})
        letters = await client.call_tool("dead_letters", {})
    assert "no task or background request 'nope'" in error_text(unknown)
    assert "wait_ms" in error_text(bad_wait) and "50000" in error_text(bad_wait)
    assert failed.structured_content is not None
    assert failed.structured_content["status"] == "failed" and "deadline" in failed.structured_content["error"]
    assert letters.structured_content is not None
    assert letters.structured_content["entries"][0]["job_id"] == request_id


async def test_a_drain_ends_running_background_requests_and_the_counters_reconcile() -> None:
    worker = GatedWorker()
    async with serving(worker=worker) as (orchestrator, client):
        queued = await client.call_tool("infer", {"prompt": "never finishes", "background": True})
        assert queued.structured_content is not None
        request_id = queued.structured_content["request_id"]
        await wait_for(lambda: worker.calls == 1)
        report = await Shutdown(orchestrator.pipeline, grace_s=0.05, jobs=orchestrator.jobs).drain("test")
        ended = await client.call_tool("request_status", {"request_id": request_id, "wait_ms": 10_000})
        totals = await totals_of(client)
    assert report.cancelled == 1
    assert ended.structured_content is not None and ended.structured_content["status"] == "failed"
    assert "shut" in ended.structured_content["error"]
    assert totals["cancelled"] == 1 and totals["in_flight"] == 0


async def test_a_drain_gives_background_requests_their_grace() -> None:
    worker = GatedWorker()
    async with serving(worker=worker) as (orchestrator, client):
        queued = await client.call_tool("infer", {"prompt": "nearly done", "background": True})
        assert queued.structured_content is not None
        await wait_for(lambda: worker.calls == 1)
        async with anyio.create_task_group() as tg:
            drained = Shutdown(orchestrator.pipeline, grace_s=30, jobs=orchestrator.jobs)
            tg.start_soon(drained.drain, "test")
            await wait_for(lambda: not orchestrator.pipeline.admission.admitting)
            worker.open()  # the answer comes within the grace
        done = await client.call_tool(
            "request_status", {"request_id": queued.structured_content["request_id"], "wait_ms": 10_000}
        )
        totals = await totals_of(client)
    assert done.structured_content is not None and done.structured_content["status"] == "completed"
    assert totals["completed"] == 1 and totals["cancelled"] == 0


# ---------------------------------------------------------------------------- batch_infer


class PickyWorker(StubWorker):
    """Answers with the prompt, except prompts starting with "fail" (a permanent backend error).
    Counts its calls per prompt."""

    kind = "picky"

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.running = 0
        self.peak = 0
        """Most calls running at once."""

    async def generate(self, request: WorkerRequest) -> AsyncGenerator[Chunk, None]:
        prompt = request.messages[-1].content
        self.calls[prompt] = self.calls.get(prompt, 0) + 1
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            await anyio.sleep(0.01)
        finally:
            self.running -= 1
        if prompt.startswith("fail"):
            raise WorkerError("picky", f"refused {prompt!r}", retryable=False)
        yield Chunk(prompt, Usage(input_tokens=1, output_tokens=1), "stop")


async def test_a_batch_of_50_with_failures_and_duplicates() -> None:
    prompts = [f"fail {index % 3}" if index % 10 == 7 else f"prompt {index % 20}" for index in range(50)]
    worker = PickyWorker()
    done: list[tuple[float, float | None]] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        done.append((value, total))

    config = make_config(batch={"concurrency": 4}, deduplication={"window_s": 300})
    async with serving(config, worker) as (_, client):
        with anyio.fail_after(TEST_TIMEOUT_S):
            result = await client.call_tool(
                "batch_infer", {"prompts": prompts, "cache": False}, **with_progress(on_progress)
            )
            totals = await totals_of(client)
            letters = await client.call_tool("dead_letters", {"limit": 100})
    batch = result.structured_content
    assert batch is not None and not result.is_error
    distinct = set(prompts)
    assert batch["total"] == 50 and batch["distinct"] == len(distinct)
    assert sum(worker.calls.values()) == len(distinct)  # one backend call per distinct item
    assert all(count == 1 for count in worker.calls.values())
    items = batch["items"]
    assert [item["index"] for item in items] == list(range(50))
    for prompt, item in zip(prompts, items, strict=True):
        if prompt.startswith("fail"):
            assert item["status"] == "failed" and "refused" in item["error"] and item["dead_letter_id"]
        else:
            assert item["status"] == "completed" and item["text"] == prompt
    assert batch["failed"] == sum(1 for prompt in prompts if prompt.startswith("fail"))
    assert batch["completed"] == 50 - batch["failed"]
    coalesced = sum(1 for item in items if item["coalesced"])
    assert coalesced == sum(1 for prompt in prompts if not prompt.startswith("fail")) - len(
        {prompt for prompt in prompts if not prompt.startswith("fail")}
    )
    assert totals["submitted"] == 50 and totals["completed"] + totals["failed"] == 50
    assert letters.structured_content is not None
    letter_ids = {entry["id"] for entry in letters.structured_content["entries"]}
    assert {item["dead_letter_id"] for item in items if item["status"] == "failed"} <= letter_ids
    assert [total for _, total in done] == [50.0] * len(done) and done[-1][0] == 50


async def test_batch_items_carry_their_own_settings() -> None:
    async with serving() as (_, client):
        result = await client.call_tool(
            "batch_infer",
            {"items": [{"prompt": "alpha beta gamma", "max_tokens": 1}, {"prompt": "delta"}], "cache": False},
        )
    assert result.structured_content is not None
    first, second = result.structured_content["items"]
    assert first["text"] == "alpha" and first["finish_reason"] == "length"
    assert second["text"] == "delta"


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        pytest.param({"prompts": ["x"] * 6}, "prompts: List should have at most 5 items", id="too many"),
        pytest.param({}, "prompts: give prompts (a list of strings) or items", id="neither"),
        pytest.param({"items": [{"prompt": "x" * 1001}]}, "items.0.prompt: at most 1000 characters", id="long item"),
        pytest.param({"items": [{"prompt": "\u200b "}]}, "items.0.prompt: must contain some", id="blank item"),
        pytest.param({"items": [{"prompt": "a", "system": " "}]}, "items.0.system: must contain", id="blank system"),
        pytest.param({"prompts": ["\u200b\u200b"]}, "prompts.0: must contain some", id="zero-width prompt"),
        pytest.param({"prompts": ["x"], "items": [{"prompt": "y"}]}, "not both", id="both"),
        pytest.param({"prompts": []}, "prompts: List should have at least 1 item", id="empty"),
        pytest.param({"items": [{"prompt": "y", "colour": 1}]}, "colour", id="unknown item key"),
    ],
)
async def test_bad_batches_are_refused_and_change_nothing(arguments: dict[str, Any], expected: str) -> None:
    async with serving(make_config(batch={"max_items": 5}, pipeline={"max_prompt_chars": 1000})) as (_, client):
        result = await client.call_tool("batch_infer", arguments)
        totals = await totals_of(client)
    assert expected in error_text(result)
    assert totals["submitted"] == 0


async def test_a_background_batch_is_fetched_with_request_status() -> None:
    async with serving(worker=EchoWorker(delay_ms=20)) as (_, client):
        queued = await client.call_tool("batch_infer", {"prompts": ["a", "b"], "background": True})
        assert queued.structured_content is not None
        fetched = await client.call_tool(
            "request_status", {"request_id": queued.structured_content["request_id"], "wait_ms": 10_000}
        )
    assert fetched.structured_content is not None and fetched.structured_content["status"] == "completed"
    assert [item["text"] for item in fetched.structured_content["result"]["items"]] == ["a", "b"]
    assert fetched.structured_content["items_done"] == 2 and fetched.structured_content["items_total"] == 2


# ---------------------------------------------------------------------------- bounds


async def test_a_result_larger_than_the_budget_expires_with_the_reason_and_inline_tasks_cost_nothing() -> None:
    config = make_config(
        tasks={"max_kept_bytes": 1024 * 1024, "inline_ms": 10_000}, pipeline={"max_prompt_chars": 2_000_000}
    )
    async with (
        serving(config, EchoWorker()) as (orchestrator, client),
        Client(orchestrator.server, extensions=[TasksClient()]) as tasks_client,
    ):
        small = await client.call_tool("infer", {"prompt": "small", "background": True})
        huge = await client.call_tool("infer", {"prompt": "x" * 1_200_000, "background": True})
        assert small.structured_content is not None and huge.structured_content is not None
        await orchestrator.jobs.idle()
        for _ in range(5):  # answered inline: never kept, never pushes a kept result out
            inline = await call(tasks_client, "infer", {"prompt": "y" * 600_000, "cache": False})
            assert isinstance(inline, CallToolResult)
        kept_small = await client.call_tool("request_status", {"request_id": small.structured_content["request_id"]})
        dropped = await client.call_tool("request_status", {"request_id": huge.structured_content["request_id"]})
        status = orchestrator.status()
    assert kept_small.structured_content is not None and kept_small.structured_content["status"] == "completed"
    assert "larger than [tasks] max_kept_bytes" in error_text(dropped)
    assert status.jobs is not None and status.jobs.kept == 1 and status.jobs.kept_bytes < 1024 * 1024


async def test_a_tasks_client_over_its_bound_is_answered_inline() -> None:
    config = make_config(tasks={"inline_ms": 0, "max_open": 1, "max_open_per_caller": 1})
    async with (
        serving(config, EchoWorker(delay_ms=SLOW)) as (orchestrator, _),
        Client(orchestrator.server, extensions=[TasksClient()]) as tasks_client,
    ):
        first = await call(tasks_client, "infer", {"prompt": "first"})
        second = await call(tasks_client, "infer", {"prompt": "second"})
        assert isinstance(first, TaskHandle)
        await poll_until_ended(tasks_client, first.task_id)
    assert isinstance(second, CallToolResult) and second.structured_content is not None
    assert second.structured_content["text"] == "second"


async def test_a_batch_shares_nothing_when_deduplication_is_off() -> None:
    worker = PickyWorker()
    config = make_config(deduplication={"enabled": False}, batch={"concurrency": 2})
    async with serving(config, worker) as (_, client):
        result = await client.call_tool("batch_infer", {"prompts": ["a", "a", "b", "a"]})
    assert result.structured_content is not None
    assert result.structured_content["distinct"] == 4
    assert sum(worker.calls.values()) == 4 and worker.peak <= 2
    assert not any(item["coalesced"] for item in result.structured_content["items"])


async def test_batch_progress_stays_below_the_next_item_while_it_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "HEARTBEAT_S", 0.001)
    worker = GatedWorker()
    seen: list[tuple[float, float | None]] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        seen.append((value, total))
        if len(seen) == 200:
            worker.open()

    async with serving(worker=worker) as (_, client):
        with anyio.fail_after(TEST_TIMEOUT_S):
            result = await client.call_tool("batch_infer", {"prompts": ["p", "q"]}, **with_progress(on_progress))
    assert not result.is_error
    values = [value for value, _ in seen]
    assert values == sorted(values) and len(set(values)) == len(values)
    assert all(value < 1 for value in values[:200])  # 200 heartbeats before any item: still below item 1
    assert values[-1] == 2 and all(total == 2 for _, total in seen)
