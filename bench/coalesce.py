"""Coalescing under a thundering herd: 1,000 identical concurrent calls, echo with 200 ms delay.

All 1,000 are started at once in-process (each its own task calling `Orchestrator.infer`,
as 1,000 tool calls would). Figures:
- backend calls (the echo worker counts them): target exactly 1;
- waiter overhead (target p99 <= 1 ms): when each waiter had its answer minus when the
  leader had its own (answers are handed out one waiter after the other). The verdict is
  its p99 with a bootstrap interval, passing only when the interval's upper end meets the
  target. Printed beside it, not a verdict: each waiter's latency beyond the leader's
  (waiters start later, so it is mostly negative: it says nothing about the overhead);
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

from bench.common import at_most, bootstrap, header, percentile, row, verdict
from mcp_orchestrator import Config, InferResult, Orchestrator, Submission
from mcp_orchestrator.workers.echo import EchoWorker

TARGET_OVERHEAD_MS = 1.0


async def herd(callers: int, delay_ms: int) -> None:
    worker = EchoWorker(delay_ms=delay_ms)
    submission = Submission(prompt="what does everybody want to know at the same time?")
    async with Orchestrator(Config(), worker) as orchestrator:
        alone_started = time.perf_counter()
        await orchestrator.infer(Submission(prompt="a warm-up call, alone"))
        alone_ms = (time.perf_counter() - alone_started) * 1000

        results: list[tuple[float, float, InferResult]] = []  # (started, finished, result)

        async def call() -> None:
            started = time.perf_counter()
            result = await orchestrator.infer(submission)
            results.append((started, time.perf_counter(), result))

        async with anyio.create_task_group() as tg:
            for _ in range(callers):
                tg.start_soon(call)
        totals = orchestrator.status().totals
        assert totals.completed == callers + 1 and totals.in_flight == 0, totals

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
    row("waiter answered after the leader", spread(after_leader))
    row("   per waiter (max / waiters)", f"{max(after_leader) * 1000 / len(waiters):.1f} µs")
    row("   floor: bare tasks woken from their events", spread(floor))
    floor_p99 = percentile(floor, 0.99)
    row("   beyond the floor (p99 - floor p99)", f"{percentile(after_leader, 0.99) - floor_p99:.3f} ms")
    row("(not a verdict) waiter latency beyond the leader's", spread(beyond_latency))
    verdict("backend calls == 1", worker.calls - 1 == 1, f"{worker.calls - 1}")
    p99 = percentile(after_leader, 0.99)
    interval = bootstrap(after_leader, lambda values: percentile(values, 0.99))
    at_most("waiter answered after the leader, p99", p99, interval, TARGET_OVERHEAD_MS, " ms")


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
