"""Throughput of the in-process pipeline against the raw floor of its queues.

10,000 `infer`-equivalent requests (unique prompts, echo worker, no delay, coalescing and
cache on as by default) are all submitted at once. Two shapes, each against its own
floor measured in the same round:

- like for like with the raw floor: one task submits all 10,000 (`Pipeline.submit`, the
  same call `infer` makes) and then collects every answer (`Pipeline.wait`); the floor
  is 10,000 items put by one task through five bare anyio memory object streams chained
  by one relay task each, with the same capacities, counted by a sink task.
- as tool calls arrive: each request has its own caller task waiting for its answer;
  its floor is the same five hops when each item is put in by its own task that waits
  on an event the last hop sets.

Latency is each request's own time in the pipeline (submitted to answered).
Capacities: to take 10,000 requests at once without shedding, every stage queue is
sized to 10,000 for this run, and the floor's streams get the same capacity.

Target: pipeline throughput >= 0.5x the raw floor (the like-for-like shape). The verdict is
the median of the rounds' ratios, and it passes only when the lower end of its interval (a
distribution-free interval for the median: with 7 rounds, the worst and best round) meets
the target; every round is printed.

    .venv/bin/python -m bench.pipeline [--requests 10000] [--rounds 7] [--no-dedup]
"""

from __future__ import annotations

import argparse
import statistics
import time

import anyio
import anyio.lowlevel
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from bench.common import at_least, header, median_interval, percentile, row
from mcp_orchestrator import Config, InferResult, Orchestrator, Submission
from mcp_orchestrator.config import config_from_mapping
from mcp_orchestrator.workers.echo import EchoWorker

HOPS = 5
TARGET = 0.5


def bench_config(capacity: int, dedup: bool = True) -> Config:
    names = ("rag", "assemble", "inference", "post_process", "stream")
    stages = {name: {"channel_capacity": capacity} for name in names}
    return config_from_mapping({"stages": stages, "deduplication": {"enabled": dedup}})


async def raw_floor(n: int, capacity: int) -> float:
    """Items per second through HOPS bare memory object streams (one relay task per hop)."""
    streams = [anyio.create_memory_object_stream[int](capacity) for _ in range(HOPS)]
    done = anyio.Event()

    async def relay(receive: MemoryObjectReceiveStream[int], send: MemoryObjectSendStream[int]) -> None:
        async with receive, send:
            async for item in receive:
                send.send_nowait(item)

    async def sink(receive: MemoryObjectReceiveStream[int]) -> None:
        seen = 0
        async with receive:
            async for _ in receive:
                seen += 1
                if seen == n:
                    done.set()

    async with anyio.create_task_group() as tg:
        for index in range(HOPS - 1):
            tg.start_soon(relay, streams[index][1], streams[index + 1][0])
        tg.start_soon(sink, streams[-1][1])
        await anyio.lowlevel.checkpoint()
        started = time.perf_counter()
        first = streams[0][0]
        for item in range(n):
            first.send_nowait(item)
        await done.wait()
        elapsed = time.perf_counter() - started
        first.close()
    return n / elapsed


async def floor_with_callers(n: int, capacity: int) -> float:
    """Items per second through the same hops when each item has a caller task waiting for it."""
    streams = [anyio.create_memory_object_stream[anyio.Event](capacity) for _ in range(HOPS)]

    async def relay(receive: MemoryObjectReceiveStream[anyio.Event], send: MemoryObjectSendStream[anyio.Event]) -> None:
        async with receive, send:
            async for item in receive:
                send.send_nowait(item)

    async def sink(receive: MemoryObjectReceiveStream[anyio.Event]) -> None:
        async with receive:
            async for item in receive:
                item.set()

    async def caller() -> None:
        done = anyio.Event()
        streams[0][0].send_nowait(done)
        await done.wait()

    async with anyio.create_task_group() as tg:
        for index in range(HOPS - 1):
            tg.start_soon(relay, streams[index][1], streams[index + 1][0])
        tg.start_soon(sink, streams[-1][1])
        started = time.perf_counter()
        async with anyio.create_task_group() as callers:
            for _ in range(n):
                callers.start_soon(caller)
        elapsed = time.perf_counter() - started
        streams[0][0].close()
    return n / elapsed


async def pipeline_run(
    n: int, capacity: int, dedup: bool = True, *, caller_tasks: bool = False
) -> tuple[float, list[float]]:
    """Requests per second through the pipeline, and each request's latency in ms."""
    worker = EchoWorker()
    orchestrator = Orchestrator(bench_config(capacity, dedup), worker)
    submissions = [Submission(prompt=f"request number {i}") for i in range(n)]
    results: list[InferResult] = []
    async with orchestrator:

        async def one(submission: Submission) -> None:
            results.append(await orchestrator.infer(submission))

        started = time.perf_counter()
        if caller_tasks:
            async with anyio.create_task_group() as tg:
                for submission in submissions:
                    tg.start_soon(one, submission)
        else:
            requests = [orchestrator.submit(submission) for submission in submissions]
            results = [await orchestrator.wait(request) for request in requests]
        elapsed = time.perf_counter() - started
        totals = orchestrator.status().totals
        assert totals.submitted == totals.completed + totals.failed + totals.shed + totals.cancelled
        assert totals.completed == n and totals.shed == 0, totals
        assert worker.calls == n and len(results) == n
    return n / elapsed, [result.latency_ms for result in results]


async def main(n: int, rounds: int, dedup: bool) -> None:
    capacity = n
    header(f"pipeline throughput: {n:,} concurrent requests vs {HOPS} bare memory-stream hops")
    row("stage queue capacity (pipeline and floor)", f"{capacity:,}")
    row("coalescing and result cache", "on" if dedup else "off ([deduplication] enabled = false)")
    await pipeline_run(min(n, 1000), capacity)  # warm-up: imports, first-call paths
    ratios: list[float] = []
    for index in range(rounds):
        name = f"round {index + 1}"
        floor = await raw_floor(n, capacity)
        rps, latencies = await pipeline_run(n, capacity, dedup)
        with_callers = await floor_with_callers(n, capacity)
        rps_callers, latencies_callers = await pipeline_run(n, capacity, dedup, caller_tasks=True)
        ratio = rps / floor
        ratios.append(ratio)
        row(f"{name}: raw floor (bare hops, one producer)", f"{floor:,.0f} items/s")
        row(f"{name}: pipeline, one producer", f"{rps:,.0f} requests/s  ({ratio:.3f}x the raw floor)")
        row(f"{name}: pipeline latency, one producer", _latency(latencies))
        row(f"{name}: floor with a caller task per item", f"{with_callers:,.0f} items/s")
        row(
            f"{name}: pipeline, a caller task per request",
            f"{rps_callers:,.0f} requests/s  ({rps_callers / with_callers:.3f}x that floor, "
            f"{rps_callers / floor:.3f}x the raw floor)",
        )
        row(f"{name}: pipeline latency, caller tasks", _latency(latencies_callers))
    row("ratios to the raw floor, by round", ", ".join(f"{ratio:.3f}" for ratio in ratios))
    low, high, coverage = median_interval(ratios)
    at_least("throughput / raw floor (median round)", statistics.median(ratios), (low, high), TARGET, "x", coverage)


def _latency(latencies: list[float]) -> str:
    return f"p50 {percentile(latencies, 0.5):.1f} ms, p99 {percentile(latencies, 0.99):.1f} ms"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--no-dedup", action="store_true", help="run with [deduplication] enabled = false")
    args = parser.parse_args()
    anyio.run(main, args.requests, args.rounds, not args.no_dedup)
