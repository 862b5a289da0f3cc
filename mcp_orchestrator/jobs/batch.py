"""Many submissions through the pipeline at once, results in input order.

Identical items (when they may share an answer) are submitted together, so the pipeline
coalesces them into one trip and says so on each (`coalesced: true`); a group of
identical items takes one of the batch's `[batch] concurrency` slots. Every item is an
ordinary pipeline request: it ends in the ledger like any other, and one item's failure
is that item's alone.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import anyio

from mcp_orchestrator.errors import RequestError
from mcp_orchestrator.models import InferResult, Submission
from mcp_orchestrator.pipeline.request import Request


@dataclass(slots=True)
class ItemOutcome:
    index: int
    result: InferResult | None = None
    error: RequestError | None = None
    cancelled: bool = False
    request_id: str | None = None


Submit = Callable[[Submission], Request]
Wait = Callable[[Request], Awaitable[InferResult]]


def groups_of(submissions: Sequence[Submission], shared: bool) -> list[list[int]]:
    """Indexes of identical items together (in order of first appearance); an item that
    must not share an answer (dedup off for it, or `shared` false: the pipeline shares no
    answers now) is a group of its own."""
    groups: dict[Submission, list[int]] = {}
    alone: list[list[int]] = []
    order: list[list[int]] = []
    for index, submission in enumerate(submissions):
        if not (shared and submission.dedup):
            alone.append([index])
            order.append(alone[-1])
            continue
        group = groups.get(submission)
        if group is None:
            group = groups[submission] = []
            order.append(group)
        group.append(index)
    return order


async def run_batch(
    submissions: Sequence[Submission],
    submit: Submit,
    wait: Wait,
    concurrency: int,
    shared: bool,
    on_item: Callable[[ItemOutcome], None],
) -> list[ItemOutcome]:
    """Run every submission; return one outcome per item, in input order. `on_item` hears
    each as it ends (progress). Cancelling this cancels the items still running."""
    outcomes = [ItemOutcome(index) for index in range(len(submissions))]
    slots = anyio.Semaphore(concurrency)

    async def finish(outcome: ItemOutcome, request: Request) -> None:
        try:
            outcome.result = await wait(request)
        except RequestError as exc:
            outcome.error = exc
        except anyio.get_cancelled_exc_class():
            outcome.cancelled = True
            raise
        on_item(outcome)

    async def run_group(indexes: list[int]) -> None:
        async with slots, anyio.create_task_group() as tg:
            # Submitted in one step, so identical items join the first one's trip.
            for index in indexes:
                outcome = outcomes[index]
                try:
                    request = submit(submissions[index])
                except RequestError as exc:  # refused at the door (shutting down, say)
                    outcome.error = exc
                    on_item(outcome)
                    continue
                outcome.request_id = request.id
                tg.start_soon(finish, outcome, request)

    async with anyio.create_task_group() as tg:
        for indexes in groups_of(submissions, shared):
            tg.start_soon(run_group, indexes)
    return outcomes
