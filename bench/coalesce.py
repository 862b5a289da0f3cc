"""Coalescing under a thundering herd: 1,000 identical concurrent calls, echo with 200 ms delay.

All 1,000 are started at once in-process (each its own task calling `pipeline.infer`,
as 1,000 tool calls would). Figures:
- backend calls (the echo worker counts them): target exactly 1;
- waiter overhead, two ways (target p99 <= 1 ms):
  a) after the leader: when each waiter had its answer minus when the leader had its own
     (the strict reading: answers are handed out one waiter after the other);
  b) latency beyond the leader's: each waiter's latency (its own call to its own answer)
     minus the leader's latency (waiters start later, so this is mostly negative);
- baselines in the same run: one call alone (the leader's latency without a herd), and
  the wake-up floor: as many bare tasks, each waiting on its own anyio Event, all set
  at once: how long after the set the last of them runs. Reading a) can never be below
  it (each waiter is a task that must be resumed in turn), so a) is also shown beyond it.

    .venv/bin/python -m bench.coalesce [--callers 1000] [--delay-ms 200]
"""

from __future__ import annotations

import argparse
import time

import anyio

from bench.common import header, percentile, row, verdict
from mcp_orchestrator.config import Config
from mcp_orchestrator.models import InferResult, Submission
from mcp_orchestrator.pipeline import Pipeline
from mcp_orchestrator.workers.echo import EchoWorker

TARGET_OVERHEAD_MS = 1.0


async def herd(callers: int, delay_ms: int) -> None:
    worker = EchoWorker(delay_ms=delay_ms)
    submission = Submission(prompt="what does everybody want to know at the same time?")
    async with Pipeline(Config(), worker) as pipeline:
        alone_started = time.perf_counter()
        await pipeline.infer(Submission(prompt="a warm-up call, alone"))
        alone_ms = (time.perf_counter() - alone_started) * 1000

        results: list[tuple[float, float, InferResult]] = []  # (started, finished, result)

        async def call() -> None:
            started = time.perf_counter()
            result = await pipeline.infer(submission)
            results.append((started, time.perf_counter(), result))

        async with anyio.create_task_group() as tg:
            for _ in range(callers):
                tg.start_soon(call)
        assert pipeline.reconciles()
        totals = pipeline.status().totals

    floor = await wake_floor(callers - 1)
    leaders = [entry for entry in results if not entry[2].coalesced]
    waiters = [entry for entry in results if entry[2].coalesced]
    assert len(leaders) == 1, f"{len(leaders)} leaders"
    leader_started, leader_finished, _ = leaders[0]
    leader_ms = (leader_finished - leader_started) * 1000
    after_leader = [(finished - leader_finished) * 1000 for _, finished, _ in waiters]
    beyond_latency = [(finished - started) * 1000 - leader_ms for started, finished, _ in waiters]
    texts = {result.text for _, _, result in results}

    header(f"coalescing: {callers:,} identical concurrent calls, echo delay_ms={delay_ms}")
    row("backend calls", f"{worker.calls - 1} (plus 1 warm-up call, alone)")
    row("answers", f"{len(results):,} ({len(waiters):,} coalesced, {len(texts)} distinct text)")
    row("totals", f"coalesced={totals.coalesced} backend_calls_saved={totals.backend_calls_saved}")
    row("baseline: one call alone", f"{alone_ms:.1f} ms")
    row("leader latency in the herd", f"{leader_ms:.1f} ms")
    row("a) waiter answered after the leader", spread(after_leader))
    row("   per waiter (a's max / waiters)", f"{max(after_leader) * 1000 / len(waiters):.1f} µs")
    row("   floor: bare tasks woken from their events", spread(floor))
    floor_p99 = percentile(floor, 0.99)
    row("   a) beyond the floor (p99 - floor p99)", f"{percentile(after_leader, 0.99) - floor_p99:.3f} ms")
    row("b) waiter latency beyond the leader's", spread(beyond_latency))
    verdict("backend calls == 1", worker.calls - 1 == 1, f"{worker.calls - 1}")
    strict, loose = percentile(after_leader, 0.99), percentile(beyond_latency, 0.99)
    verdict("a) waiter overhead p99 <= 1 ms (strict)", strict <= TARGET_OVERHEAD_MS, f"{strict:.3f} ms")
    verdict("b) waiter latency p99 <= leader's + 1 ms", loose <= TARGET_OVERHEAD_MS, f"{loose:.3f} ms")


async def wake_floor(waiters: int) -> list[float]:
    """Milliseconds from setting `waiters` events (each awaited by its own task) to each task running."""
    events = [anyio.Event() for _ in range(waiters)]
    woke: list[float] = []

    async def wait(event: anyio.Event) -> None:
        await event.wait()
        woke.append(time.perf_counter())

    async with anyio.create_task_group() as tg:
        for event in events:
            tg.start_soon(wait, event)
        await anyio.sleep(0.05)  # every task is parked on its event
        set_at = time.perf_counter()
        for event in events:
            event.set()
    return [(moment - set_at) * 1000 for moment in woke]


def spread(values: list[float]) -> str:
    return f"p50 {percentile(values, 0.5):.3f} ms, p99 {percentile(values, 0.99):.3f} ms, max {max(values):.3f} ms"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--callers", type=int, default=1000)
    parser.add_argument("--delay-ms", type=int, default=200)
    args = parser.parse_args()
    anyio.run(herd, args.callers, args.delay_ms)
