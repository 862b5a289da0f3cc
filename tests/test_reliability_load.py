"""Load with faults through the real MCP surface (RELIABILITY.md, "load with faults").

10,000 `infer` calls from 200 concurrent in-memory MCP clients, against a backend speaking
the real llama-server's OpenAI-compatible bytes of which 20% of answers fail at random
(seeded): 429 with Retry-After, 500, the connection dropped before any answer, reset after
the head or in the middle of the body, a stall that only the read timeout ends. Checked:
every call ends as an answer or a clear error (with its dead letter); the ledger's counters
reconcile; no request cost more than retry_attempts + 1 backend calls, and each cost exactly
what its provenance (or its error) says; nothing is left in flight and no task outlives the
orchestrator. The figures are printed for RELIABILITY.md (`pytest -s` shows them).
"""

from __future__ import annotations

import asyncio
import random
import re
from collections import Counter
from typing import TYPE_CHECKING, Any

import anyio
import pytest
from mcp import Client

from mcp_orchestrator import Orchestrator
from testbeds.processes import rss_bytes
from tests.conftest import make_config

if TYPE_CHECKING:
    from tests.support_faults_extra import ScriptedFaultServer

pytestmark = pytest.mark.anyio
pytest_plugins = ("tests.support_llama", "tests.support_faults_extra")

CALLS = 10_000
MIB = 1024 * 1024
CLIENTS = 200
RETRIES = 3
FAULTS = ("429@1", "500", "drop", "reset:0", "reset:2", "stall:1")
FAULT_SHARE = 0.20
SEED = 20261202
TEST_TIMEOUT_S = 400.0
GAVE_UP = re.compile(r"gave up after (\d+) call\(s\)")


def chaos_script(steps: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [rng.choice(FAULTS) if rng.random() < FAULT_SHARE else "ok" for _ in range(steps)]


async def test_ten_thousand_calls_against_a_backend_failing_one_in_five(
    scripted_faults: ScriptedFaultServer,
) -> None:
    script = chaos_script(CALLS * (RETRIES + 1), SEED)
    scripted_faults.script("chaos", *script)
    scripted_faults.requests.clear()
    config = make_config(
        stages={
            "inference": {
                "worker": "open_ai",
                "base_url": scripted_faults.url("script", "chaos") + "/v1",
                "max_tokens": 4,
                "http": {"read_timeout_s": 0.5},
            }
        },
        resilience={
            "retry_attempts": RETRIES,
            "retry_base_ms": 1,
            "retry_max_ms": 5,
            "circuit_breaker_threshold": 1000,  # the breaker is not what this test is about
        },
        pipeline={"dead_letter_capacity": CALLS},
        security={"worker_origins": [scripted_faults.root.removeprefix("http://")]},
    )
    results: dict[str, tuple[bool, Any]] = {}
    tasks_before = len(asyncio.all_tasks())
    rss_before = rss_bytes() / MIB
    orchestrator = Orchestrator(config)
    with anyio.fail_after(TEST_TIMEOUT_S):
        async with orchestrator:

            async def one_client(index: int) -> None:
                async with Client(orchestrator.server) as client:
                    for call in range(CALLS // CLIENTS):
                        prompt = f"load {index} {call}"
                        result = await client.call_tool("infer", {"prompt": prompt, "cache": False, "dedup": False})
                        if result.is_error:
                            results[prompt] = (False, result.content[0].text)  # type: ignore[union-attr]
                        else:
                            assert result.structured_content is not None
                            results[prompt] = (True, result.structured_content["provenance"])

            async with anyio.create_task_group() as tg:
                for index in range(CLIENTS):
                    tg.start_soon(one_client, index)
            status = orchestrator.status()
            letters = len(orchestrator.pipeline.dead_letters)
        rss_after = rss_bytes() / MIB
    tasks_after = len(asyncio.all_tasks())

    calls_per_prompt = Counter(
        request.body["messages"][-1]["content"]
        for request in scripted_faults.recorded("chaos")
        if isinstance(request.body, dict) and "messages" in request.body
    )
    outcomes = Counter("answer" if ok else "error" for ok, _ in results.values())
    mismatches = []
    for prompt, (ok, detail) in results.items():
        sent = calls_per_prompt[prompt]
        if ok:
            said = detail["attempts"]
        else:
            found = GAVE_UP.search(detail)
            assert found is not None, detail  # every error says how many calls it made and why it stopped
            said = int(found.group(1))
        if sent != said:
            mismatches.append((prompt, sent, said))
    totals = status.totals
    faults_served = Counter(step for step in scripted_faults.taken["chaos"] if step != "ok")
    print(
        f"\nload with faults: {len(results)} calls, {outcomes['answer']} answers, {outcomes['error']} errors, "
        f"{letters} dead letters; backend calls {sum(calls_per_prompt.values())} "
        f"(max per request {max(calls_per_prompt.values())}, distribution {sorted(Counter(calls_per_prompt.values()).items())}); "
        f"faults served {dict(faults_served)}; totals submitted {totals.submitted} completed {totals.completed} "
        f"failed {totals.failed} shed {totals.shed} cancelled {totals.cancelled} in_flight {totals.in_flight}; "
        f"RSS {rss_before:.0f} -> {rss_after:.0f} MiB; tasks {tasks_before} -> {tasks_after}"
    )
    assert len(results) == CALLS  # every call ended
    assert outcomes["error"] == letters == totals.failed  # every error left its dead letter
    assert totals.submitted == CALLS == totals.completed + totals.failed + totals.shed + totals.cancelled
    assert totals.in_flight == 0 and orchestrator.pipeline.reconciles()
    assert max(calls_per_prompt.values()) <= RETRIES + 1
    assert not mismatches, mismatches[:10]
    assert sum(faults_served.values()) > CALLS * FAULT_SHARE * 0.8  # the faults really happened
    assert tasks_after <= tasks_before  # no task outlived the orchestrator
