"""A caller that reads progress slowly cannot grow the server's memory or delay its answer
(RELIABILITY.md, "slow progress consumer").

Chunks wait for a slow caller in a bounded buffer (server/progress.py, PROGRESS_BUFFER); past
it they are dropped (progress is best effort), the answer itself is never cut, and other
callers are served meanwhile.
"""

from __future__ import annotations

import anyio
import pytest

from mcp_orchestrator.server.progress import PROGRESS_BUFFER
from tests.conftest import running, with_progress

pytestmark = pytest.mark.anyio

WORDS = 3 * PROGRESS_BUFFER
TEST_TIMEOUT_S = 60.0


async def test_a_slow_progress_reader_loses_chunks_not_the_answer_nor_other_callers() -> None:
    prompt = " ".join(f"w{index}" for index in range(WORDS))
    seen: list[str] = []
    first = anyio.Event()
    release = anyio.Event()

    async def slow_reader(progress: float, total: float | None, message: str | None) -> None:
        seen.append(message or "")
        first.set()
        await release.wait()  # a caller that stops reading its progress

    async with running() as (orchestrator, client):
        with anyio.fail_after(TEST_TIMEOUT_S):
            async with anyio.create_task_group() as tg:
                answers: dict[str, str] = {}

                async def slow_call() -> None:
                    result = await client.call_tool(
                        "infer", {"prompt": prompt, "max_tokens": WORDS, "cache": False}, **with_progress(slow_reader)
                    )
                    answers["slow"] = result.content[0].text  # type: ignore[union-attr]

                tg.start_soon(slow_call)
                await first.wait()
                # While the slow reader holds up its stream, the server answers another caller...
                other = await client.call_tool("pipeline_status", {})
                assert not other.is_error
                release.set()  # ...and once it reads again, its answer comes whole
    assert answers["slow"] == prompt
    # What waited for it is bounded: about PROGRESS_BUFFER chunks, the rest were dropped.
    assert PROGRESS_BUFFER <= len(seen) <= PROGRESS_BUFFER + 2 < WORDS
    assert orchestrator.status().totals.completed == 1
