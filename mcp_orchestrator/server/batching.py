"""batch_infer on the MCP surface: its submissions, running them (for its caller or for a
job), progress as items done of the total, and the result's shape."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from mcp.server.mcpserver import Context
from mcp.types import CallToolResult, TextContent

from mcp_orchestrator.errors import ConfigError, Problem
from mcp_orchestrator.jobs.batch import ItemOutcome, groups_of, run_batch
from mcp_orchestrator.models import BatchItem, BatchItemResult, BatchResult, Submission
from mcp_orchestrator.pipeline.request import Request
from mcp_orchestrator.server.arguments import blank
from mcp_orchestrator.server.background import CURRENT_JOB
from mcp_orchestrator.server.progress import Reporter, with_heartbeat

if TYPE_CHECKING:
    from mcp_orchestrator.orchestrator import Orchestrator


async def run_batch_call(
    ctx: Context[Any, Any], orchestrator: Orchestrator, submissions: list[Submission]
) -> CallToolResult:
    """Run a batch for this call (progress: items done of the total, and heartbeats) or, inside
    a job, for the job (its requests tracked; no progress: the call has returned)."""
    job = CURRENT_JOB.get()
    total = len(submissions)
    shared = orchestrator.pipeline.admission.shares_answers()
    done = 0

    def submit(submission: Submission) -> Request:
        request = orchestrator.submit(submission, job_id=job.id if job else None)
        if job is not None:
            job.track(request)
        return request

    async def run(reporter: Reporter | None) -> BatchResult:
        send: MemoryObjectSendStream[ItemOutcome] | None = None
        if job is not None:
            job.items_total = total

        def on_item(outcome: ItemOutcome) -> None:
            nonlocal done
            done += 1
            if job is not None:
                job.item_done()
            if send is not None:
                send.send_nowait(outcome)  # the stream holds every item: never blocks

        async with anyio.create_task_group() as tg:
            if reporter is not None:
                send, receive = anyio.create_memory_object_stream[ItemOutcome](total)
                tg.start_soon(report_items, receive, reporter, total)
            outcomes = await run_batch(
                submissions, submit, orchestrator.wait, orchestrator.config.batch.concurrency, shared, on_item
            )
            if send is not None:
                send.close()
        return batch_result(outcomes, len(groups_of(submissions, shared)))

    def where() -> str:
        return f"{done}/{total} items done"

    result = await run(None) if job is not None else await with_heartbeat(ctx, run, where, total)
    return CallToolResult(
        content=[TextContent(type="text", text=result.model_dump_json(exclude_none=True))],
        structured_content=result.model_dump(mode="json"),
    )


async def report_items(receive: MemoryObjectReceiveStream[ItemOutcome], reporter: Reporter, total: int) -> None:
    """Progress of a batch: one notification per item ended, items done of the total."""
    async with receive:
        async for outcome in receive:
            state = "completed" if outcome.result is not None else "failed"
            done = reporter.items + 1
            await reporter.send(f"{done}/{total} items done (item {outcome.index} {state})", progress=done)


def batch_submissions(
    shared: Submission, prompts: list[str] | None, items: list[BatchItem] | None, max_chars: int
) -> list[Submission]:
    """One submission per item: the shared values, with what an item sets of its own. An
    item's prompt and system prompt are held to infer's rules (ConfigError names them all)."""
    if prompts is None and items is None:
        raise ConfigError(
            "batch_infer", [Problem("prompts", "give prompts (a list of strings) or items (a list of objects)")]
        )
    if prompts is not None and items is not None:
        message = "give either prompts or items, not both"
        raise ConfigError("batch_infer", [Problem("prompts", message), Problem("items", message)])
    if prompts is not None:
        return [shared.model_copy(update={"prompt": prompt}) for prompt in prompts]
    assert items is not None
    texts = [{"prompt": item.prompt, "system": item.system} for item in items]
    problems = [problem for index, item in enumerate(texts) for problem in item_problems(index, item, max_chars)]
    if problems:
        raise ConfigError("batch_infer", problems)
    return [item_submission(shared, item) for item in items]


def item_problems(index: int, item: Mapping[str, Any], max_chars: int) -> list[Problem]:
    """What is wrong with an item's prompt and system prompt beyond their type (a value that is
    not text is the arguments model's to report)."""
    problems = []
    for name in ("prompt", "system"):
        text = item.get(name)
        if not isinstance(text, str):
            continue
        if len(text) > max_chars:
            problems.append(Problem(f"items.{index}.{name}", f"at most {max_chars} characters (got {len(text)})"))
        elif blank(text):
            problems.append(Problem(f"items.{index}.{name}", "must contain some non-whitespace text"))
    return problems


def raw_item_problems(arguments: Mapping[str, Any], max_chars: int) -> list[Problem]:
    """item_problems of a call's raw `items`, so that they are named along with the problems
    the arguments model finds (which stop the tool from running)."""
    items = arguments.get("items")
    if not isinstance(items, list):
        return []
    return [
        problem
        for index, item in enumerate(items)
        if isinstance(item, dict)
        for problem in item_problems(index, item, max_chars)
    ]


def item_submission(shared: Submission, item: BatchItem) -> Submission:
    params = shared.params.model_copy(
        update={
            name: value
            for name, value in (
                ("max_tokens", item.max_tokens),
                ("temperature", item.temperature),
                ("top_p", item.top_p),
                ("seed", item.seed),
                ("stop", None if item.stop is None else tuple(item.stop)),
            )
            if value is not None
        }
    )
    update: dict[str, Any] = {"prompt": item.prompt, "params": params}
    if item.system is not None:
        update["system"] = item.system
    if item.priority is not None:
        update["priority"] = item.priority
    return shared.model_copy(update=update)


def batch_result(outcomes: list[ItemOutcome], distinct: int) -> BatchResult:
    results = [item_result(outcome) for outcome in outcomes]
    return BatchResult(
        total=len(results),
        completed=sum(1 for item in results if item.status == "completed"),
        failed=sum(1 for item in results if item.status == "failed"),
        cancelled=sum(1 for item in results if item.status == "cancelled"),
        distinct=distinct,
        items=results,
    )


def item_result(outcome: ItemOutcome) -> BatchItemResult:
    result = outcome.result
    if result is not None:
        return BatchItemResult(
            index=outcome.index,
            status="completed",
            text=result.text,
            request_id=result.request_id,
            coalesced=result.coalesced,
            cached=result.cached,
            usage=result.usage,
            finish_reason=result.finish_reason,
            latency_ms=result.latency_ms,
        )
    error = outcome.error
    return BatchItemResult(
        index=outcome.index,
        status="cancelled" if outcome.cancelled or error is None else "failed",
        error=str(error) if error is not None else "cancelled before it ended",
        dead_letter_id=error.dead_letter_id if error is not None else None,
        request_id=outcome.request_id,
    )
