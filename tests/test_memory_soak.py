"""100,000 requests with large prompts keep memory within the byte budgets plus a fixed
overhead (RELIABILITY.md, "memory soak").

Through the public library API (the MCP surface adds per-call work, not memory that stays):
every prompt is distinct and 20,000 characters long, every other request fails for good
(so it leaves a dead letter with its whole request), and the answers are the prompts
echoed back. Before the byte budgets the cache kept 10,000 such answers and the dead-letter
ring 1,000 requests: ~240 MB. With 16 MiB budgets for each, RSS may grow by the two budgets
plus a fixed allowance for the interpreter's own pools, no more.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator

import anyio
import pytest

from mcp_orchestrator import Orchestrator, OrchestratorError
from mcp_orchestrator.errors import WorkerError
from mcp_orchestrator.models import Submission, Usage
from mcp_orchestrator.workers.base import Chunk, WorkerRequest
from testbeds.processes import rss_bytes
from tests.conftest import make_config
from tests.support_workers import StubWorker

pytestmark = pytest.mark.anyio

CALLS = 100_000
WARM_UP = 4_000
PROMPT_CHARS = 20_000
MIB = 1024 * 1024
BUDGET = 16 * MIB
FIXED_ALLOWANCE = 48 * MIB
CONCURRENT = 50
TEST_TIMEOUT_S = 400.0


class HalfFailing(StubWorker):
    """Echoes the prompt; fails for good when the prompt is marked."""

    kind = "half-failing"

    async def generate(self, request: WorkerRequest) -> AsyncGenerator[Chunk, None]:
        prompt = request.messages[-1].content
        if prompt.startswith("fail"):
            raise WorkerError(self.kind, "refused by the test", retryable=False)
        yield Chunk(prompt, Usage(input_tokens=1, output_tokens=1), "stop")


def prompt(index: int) -> str:
    head = ("fail" if index % 2 else "pass") + f" {index:07d} "
    return head + "x" * (PROMPT_CHARS - len(head))


async def test_a_hundred_thousand_large_requests_stay_within_the_byte_budgets() -> None:
    config = make_config(
        deduplication={"max_bytes": BUDGET},
        pipeline={"dead_letter_max_bytes": BUDGET},
        resilience={"retry_attempts": 0, "circuit_breaker_threshold": 10**6},
    )
    orchestrator = Orchestrator(config, HalfFailing())
    outcomes = {"answers": 0, "errors": 0}
    samples: list[int] = []
    with anyio.fail_after(TEST_TIMEOUT_S):
        async with orchestrator:

            async def run(first: int) -> None:
                for index in range(first, CALLS, CONCURRENT):
                    try:
                        await orchestrator.infer(Submission(prompt=prompt(index)))
                        outcomes["answers"] += 1
                    except OrchestratorError:
                        outcomes["errors"] += 1
                    if index == WARM_UP:
                        samples.append(rss_bytes())  # the budgets are full by now

            samples.append(rss_bytes())
            async with anyio.create_task_group() as tg:
                for first in range(CONCURRENT):
                    tg.start_soon(run, first)
            samples.append(rss_bytes())
            status = orchestrator.status()
    start, warm, end = samples
    grown = end - start
    print(
        f"\nmemory soak: {CALLS} requests of {PROMPT_CHARS} characters, {outcomes['answers']} answers, "
        f"{outcomes['errors']} errors; cache {status.cache.entries} entries / {status.cache.bytes / MIB:.1f} MiB, "
        f"dead letters {status.dead_letters.held} / {status.dead_letters.bytes / MIB:.1f} MiB; "
        f"RSS at start {start / MIB:.0f} MiB, after {WARM_UP} requests {warm / MIB:.0f} MiB, "
        f"at the end {end / MIB:.0f} MiB (+{grown / MIB:.1f} MiB in all, +{(end - warm) / MIB:.1f} after the warm-up)"
    )
    assert outcomes == {"answers": CALLS // 2, "errors": CALLS // 2}
    assert status.cache.bytes <= BUDGET and status.dead_letters.bytes <= BUDGET
    assert status.totals.submitted == CALLS and status.totals.in_flight == 0
    assert grown < 2 * BUDGET + FIXED_ALLOWANCE
    assert end - warm < FIXED_ALLOWANCE  # once the budgets are full, memory stays put
