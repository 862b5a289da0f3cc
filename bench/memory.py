"""Memory stays bounded: RSS before and after 100,000 unique requests.

The pipeline runs with default settings (result cache of 10,000 entries, dead-letter
queue of 1,000, latency window of 4,096), echo worker without delay. Requests go in
waves of 500 concurrent calls (the default 512-deep RAG queue holds a wave without shedding). The
"before" reading is taken after a warm-up wave, so one-time costs (imports,
first-call paths, allocator pools) are not counted as growth. Every 10,000 requests
the RSS is printed, so a steady leak would show as a slope.

Target: growth < 20 MB.

    .venv/bin/python -m bench.memory [--requests 100000] [--wave 500]
"""

from __future__ import annotations

import argparse

import anyio

from bench.common import header, row, rss_mb, verdict
from mcp_orchestrator import Config, Orchestrator, Submission
from mcp_orchestrator.workers.echo import EchoWorker

TARGET_MB = 20.0


async def waves(orchestrator: Orchestrator, first: int, count: int, wave: int) -> None:
    async def one(index: int) -> None:
        await orchestrator.infer(
            Submission(prompt=f"unique request number {index} with a few words", session_id=f"s{index}")
        )

    for start in range(first, first + count, wave):
        async with anyio.create_task_group() as tg:
            for index in range(start, min(start + wave, first + count)):
                tg.start_soon(one, index)


async def main(requests: int, wave: int) -> None:
    header(f"memory: RSS growth over {requests:,} unique requests")
    row("RSS at start", f"{rss_mb():.1f} MiB")
    worker = EchoWorker()
    async with Orchestrator(Config(), worker) as orchestrator:
        await waves(orchestrator, 0, wave, wave)
        before = rss_mb()
        row(f"RSS after {wave:,} warm-up requests (before)", f"{before:.1f} MiB")
        done = 0
        step = max(wave, requests // 10)
        while done < requests:
            count = min(step, requests - done)
            await waves(orchestrator, wave + done, count, wave)
            done += count
            row(f"RSS after {done:,}", f"{rss_mb():.1f} MiB  (+{rss_mb() - before:.1f})")
        after = rss_mb()
        status = orchestrator.status()
        assert status.reconciles
        assert status.totals.completed == requests + wave, status.totals
        row(
            "held at the end",
            f"cache {status.cache.entries:,} entries, dead letters {status.dead_letters.held}, "
            f"in flight {status.totals.in_flight}",
        )
    growth = after - before
    row("growth", f"{growth:.1f} MiB")
    verdict("RSS growth < 20 MB", growth < TARGET_MB, f"{growth:.1f} MiB")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--wave", type=int, default=500)
    args = parser.parse_args()
    anyio.run(main, args.requests, args.wave)
