"""The result cache and the dead letters are bounded by bytes, not only by entries: large
prompts cannot grow memory past the budgets, and pipeline_status and /metrics show the
bytes held (a probe once reached 2.1 GB with 10,000 cached answers of ~210 KB)."""

from __future__ import annotations

import sys

import anyio
import pytest

from mcp_orchestrator.errors import WorkerError
from mcp_orchestrator.models import Submission
from mcp_orchestrator.pipeline.dead_letters import DeadLetterQueue
from mcp_orchestrator.resilience.cache import ResultCache
from mcp_orchestrator.workers.echo import EchoWorker
from tests.conftest import make_config, status_of
from tests.support_admission import serving
from tests.support_workers import Scripted

pytestmark = pytest.mark.anyio

MIB = 1024 * 1024
TEST_TIMEOUT_S = 60.0
PROMPT_CHARS = 100_000


def big_prompt(index: int) -> str:
    return f"{index:06d} " + "x" * (PROMPT_CHARS - 7)


async def test_cached_answers_stay_within_the_byte_budget() -> None:
    """40 distinct 100,000-character answers (~4 MB) against a 1 MiB budget: the least
    recently used go, the newest are still answered from the cache."""
    config = make_config(deduplication={"max_bytes": MIB, "max_entries": 10_000})
    async with serving(config, worker=EchoWorker()) as (orchestrator, client):
        with anyio.fail_after(TEST_TIMEOUT_S):
            for index in range(40):
                result = await client.call_tool("infer", {"prompt": big_prompt(index), "max_tokens": 2})
                assert not result.is_error, result.content
            cache = (await status_of(client))["cache"]
            newest = await client.call_tool("infer", {"prompt": big_prompt(39), "max_tokens": 2})
            oldest = await client.call_tool("infer", {"prompt": big_prompt(0), "max_tokens": 2})
        metrics = orchestrator.pipeline.metrics.render().decode()
    assert cache["max_bytes"] == MIB
    assert 0 < cache["bytes"] <= MIB
    assert cache["entries"] == cache["bytes"] // (sys.getsizeof(big_prompt(0)) + 512)  # as many as fit
    assert 5 <= cache["entries"] < 40
    assert newest.structured_content is not None and newest.structured_content["cached"] is True
    assert oldest.structured_content is not None and oldest.structured_content["cached"] is False
    assert "orchestrator_cache_bytes " in metrics


async def test_dead_letters_stay_within_the_byte_budget() -> None:
    """Failed requests with 100,000-character prompts and system prompts (each letter keeps
    its whole request for replay): the oldest letters go, the newest can still be replayed."""
    failing = Scripted(WorkerError("scripted", "the backend said no", retryable=False))
    config = make_config(pipeline={"dead_letter_max_bytes": 2 * MIB}, resilience={"retry_attempts": 0})
    async with serving(config, worker=failing) as (orchestrator, client):
        with anyio.fail_after(TEST_TIMEOUT_S):
            for index in range(30):
                arguments = {"prompt": big_prompt(index), "system": big_prompt(index), "cache": False}
                failed = await client.call_tool("infer", arguments)
                assert failed.is_error
            status = await status_of(client)
            listed = await client.call_tool("dead_letters", {"limit": 100})
            assert listed.structured_content is not None
            entries = listed.structured_content["entries"]
            replayed = await client.call_tool("replay_dead_letter", {"id": entries[0]["id"]})
        metrics = orchestrator.pipeline.metrics.render().decode()
    letters = status["dead_letters"]
    assert letters["max_bytes"] == 2 * MIB
    assert 0 < letters["bytes"] <= 2 * MIB
    assert letters["held"] == len(entries) < 30
    assert letters["dropped"] == 30 - letters["held"]
    assert replayed.is_error and "the backend said no" in replayed.content[0].text  # type: ignore[union-attr]
    assert "orchestrator_dead_letters_bytes " in metrics


def test_a_smaller_dead_letter_budget_applies_at_once_and_keeps_the_newest() -> None:
    letters = DeadLetterQueue(capacity=100, max_bytes=10 * MIB)
    for index in range(5):
        letters.add(f"r{index}", Submission(prompt=big_prompt(index)), "inference", "worker_error", "no")
    assert len(letters) == 5
    letters.max_bytes = 1  # below one letter: only the newest is kept
    assert len(letters) == 1 and letters.dropped == 4
    newest = letters.list(10)[0]
    assert newest.request_id == "r4"
    entry = letters.get(newest.id)
    assert entry is not None and letters.held_bytes == entry.size


def test_a_letter_is_claimed_for_replay_once_and_the_claim_goes_with_the_letter() -> None:
    letters = DeadLetterQueue(capacity=2, max_bytes=10 * MIB)
    first = letters.add("r0", Submission(prompt="first"), "inference", "worker_error", "no")
    assert letters.claim(first.id) and not letters.claim(first.id)
    assert not letters.claim("dl-404")  # nothing to replay
    for index in (1, 2):  # the first letter is dropped from the ring, and its claim with it
        letters.add(f"r{index}", Submission(prompt=f"p{index}"), "inference", "worker_error", "no")
    assert letters.get(first.id) is None and not letters.claim(first.id)
    assert letters._replayed == set()  # nothing kept for a dropped letter


def test_the_cache_refuses_an_answer_larger_than_its_whole_budget() -> None:
    cache: ResultCache[str] = ResultCache(10, 60, max_bytes=1000, size_of=len)
    cache.put("small", "s" * 400)
    cache.put("huge", "h" * 1001)
    assert cache.get("huge") is None and cache.get("small") == "s" * 400
    assert (cache.too_large, cache.stored, cache.held_bytes) == (1, 1, 400)
    cache.put("second", "t" * 400)
    cache.put("third", "u" * 400)  # over 1000 bytes: the least recently used goes
    assert len(cache) == 2 and cache.held_bytes == 800
    with pytest.raises(ValueError, match="go together"):
        ResultCache(10, 60, max_bytes=1000)
