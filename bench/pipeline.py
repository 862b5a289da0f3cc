"""Throughput of the in-process pipeline against the raw floor of its queues.

10,000 `infer`-equivalent requests (unique prompts, echo worker, no delay) are all
submitted at once, each by its own task that waits for its answer, as tool calls
would. The raw floor, measured in the same run: 10,000 items through five bare anyio
memory object streams chained by one relay task each, with the same capacities. A
second baseline adds the callers: each item is put in by its own task that waits on an
event the last hop sets (the harness shape of the pipeline run, without the pipeline).

Capacities: to take 10,000 requests at once without shedding, every stage queue is
sized to 10,000 for this run, and the floor's streams get the same capacity.

Target: pipeline throughput >= 0.5x the floor.

    .venv/bin/python -m bench.pipeline [--requests 10000] [--rounds 3] [--no-dedup]
"""

from __future__ import annotations

import argparse
import time

import anyio
import anyio.lowlevel
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from bench.common import header, percentile, row, verdict
from mcp_orchestrator.config import Config, config_from_mapping
from mcp_orchestrator.models import Submission
from mcp_orchestrator.pipeline import Pipeline
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


async def pipeline_run(n: int, capacity: int, dedup: bool = True) -> tuple[float, list[float], Pipeline]:
    """Requests per second through the pipeline, and each request's latency in ms."""
    worker = EchoWorker()
    pipeline = Pipeline(bench_config(capacity, dedup), worker)
    latencies: list[float] = []
    submissions = [Submission(prompt=f"request number {i}") for i in range(n)]
    async with pipeline:

        async def one(submission: Submission) -> None:
            started = time.perf_counter()
            await pipeline.infer(submission)
            latencies.append((time.perf_counter() - started) * 1000)

        started = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for submission in submissions:
                tg.start_soon(one, submission)
        elapsed = time.perf_counter() - started
        assert pipeline.reconciles()
        totals = pipeline.status().totals
        assert totals.completed == n and totals.shed == 0, totals
        assert worker.calls == n
    return n / elapsed, latencies, pipeline


async def main(n: int, rounds: int, dedup: bool) -> None:
    capacity = n
    header(f"pipeline throughput: {n:,} concurrent requests vs {HOPS} bare memory-stream hops")
    row("stage queue capacity (pipeline and floor)", f"{capacity:,}")
    row("coalescing and result cache", "on" if dedup else "off ([deduplication] enabled = false)")
    await pipeline_run(min(n, 1000), capacity)  # warm-up: imports, first-call paths
    best_ratio = 0.0
    for index in range(rounds):
        floor = await raw_floor(n, capacity)
        with_callers = await floor_with_callers(n, capacity)
        rps, latencies, _ = await pipeline_run(n, capacity, dedup)
        ratio = rps / floor
        best_ratio = max(best_ratio, ratio)
        row(f"round {index + 1}: raw floor (bare hops)", f"{floor:,.0f} items/s")
        row(f"round {index + 1}: floor with a caller task per item", f"{with_callers:,.0f} items/s")
        row(
            f"round {index + 1}: pipeline",
            f"{rps:,.0f} requests/s  ({ratio:.3f}x the bare floor, {rps / with_callers:.3f}x the floor with callers)",
        )
        row(
            f"round {index + 1}: pipeline latency",
            f"p50 {percentile(latencies, 0.5):.1f} ms, p99 {percentile(latencies, 0.99):.1f} ms",
        )
    verdict("throughput >= 0.5x the bare floor", best_ratio >= TARGET, f"best round {best_ratio:.3f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-dedup", action="store_true", help="run with [deduplication] enabled = false")
    args = parser.parse_args()
    anyio.run(main, args.requests, args.rounds, not args.no_dedup)
