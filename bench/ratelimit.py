"""Rate-limit accuracy under overload: 10 s at 100 rps / burst 20, offered 4x the rate.

Requests (unique prompts, echo worker, no delay) arrive at 400/s for 10 s, each its own
task calling `pipeline.infer` with a 2 s deadline, so waiting requests are refused
when their token cannot come in time. "Admitted" is counted where it matters: calls
that reached the backend (the echo worker records when each call starts).

Figures: admitted in the 10 s window against the bound rate*T + burst (target ratio in
[0.98, 1.0]), the worst ratio over every sliding window of 0.1 s, 1 s and 5 s (must never
exceed 1.0), and how the offered requests ended. The bound is computed in the same run
from the same clock, so it is its own baseline.

    .venv/bin/python -m bench.ratelimit [--seconds 10] [--rate 100] [--burst 20] [--overload 4]
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import AsyncGenerator

import anyio

from bench.common import header, row, verdict
from mcp_orchestrator import Orchestrator, Submission
from mcp_orchestrator.config import config_from_mapping
from mcp_orchestrator.errors import OrchestratorError, RateLimited
from mcp_orchestrator.workers.base import Chunk, WorkerRequest
from mcp_orchestrator.workers.echo import EchoWorker

DEADLINE_MS = 2000


class StampedEcho(EchoWorker):
    """The echo worker, noting the loop time at which each call reaches it."""

    def __init__(self) -> None:
        super().__init__()
        self.stamps: list[float] = []

    async def generate(self, request: WorkerRequest) -> AsyncGenerator[Chunk, None]:
        self.stamps.append(anyio.current_time())
        async for chunk in super().generate(request):
            yield chunk


def worst_window(stamps: list[float], window_s: float, rate: float, burst: int) -> float:
    """max over windows [t_i, t_i + window_s] of count / (rate * window_s + burst)."""
    worst, j = 0.0, 0
    for i, start in enumerate(stamps):
        while j < len(stamps) and stamps[j] <= start + window_s:
            j += 1
        worst = max(worst, (j - i) / (rate * window_s + burst))
    return worst


async def overload(seconds: float, rate: float, burst: int, factor: float) -> None:
    config = config_from_mapping(
        {
            "rate_limits": {"enabled": True, "requests_per_second": rate, "burst_capacity": burst},
            "deduplication": {"enabled": False},
        }
    )
    worker = StampedEcho()
    outcomes: Counter[str] = Counter()
    offered_rate = rate * factor
    async with Orchestrator(config, worker) as orchestrator:

        async def call(index: int) -> None:
            try:
                await orchestrator.infer(Submission(prompt=f"request {index}", deadline_ms=DEADLINE_MS))
                outcomes["completed"] += 1
            except RateLimited:
                outcomes["rate limited"] += 1
            except OrchestratorError as exc:
                outcomes[type(exc).__name__] += 1

        async with anyio.create_task_group() as tg:
            start = anyio.current_time()
            end = start + seconds
            sent = 0
            while True:
                now = anyio.current_time()
                if now >= end:
                    break
                due = int((now - start) * offered_rate) + 1  # arrivals so far at the offered rate
                while sent < due:
                    tg.start_soon(call, sent)
                    sent += 1
                await anyio.sleep(1 / offered_rate)
        assert orchestrator.status().reconciles
    in_window = [t for t in worker.stamps if start <= t <= start + seconds]
    bound = rate * seconds + burst
    ratio = len(in_window) / bound

    header(f"rate limit: {seconds:g} s at {rate:g} rps / burst {burst}, offered {factor:g}x ({offered_rate:g}/s)")
    row("offered", f"{sent:,} requests ({sent / seconds:,.1f}/s)")
    row("backend calls in the window", f"{len(in_window):,} (all: {len(worker.stamps):,})")
    row("bound rate*T + burst", f"{bound:,.0f}")
    row("admitted / bound", f"{ratio:.4f}")
    for window in (0.1, 1.0, 5.0):
        row(f"worst sliding {window:g} s window / its bound", f"{worst_window(worker.stamps, window, rate, burst):.4f}")
    row("outcomes", ", ".join(f"{name}={count:,}" for name, count in sorted(outcomes.items())))
    verdict("admitted/bound in [0.98, 1.0]", 0.98 <= ratio <= 1.0, f"{ratio:.4f}")
    worst = max(worst_window(worker.stamps, w, rate, burst) for w in (0.1, 1.0, 5.0, seconds))
    verdict("no window over its bound", worst <= 1.0, f"worst {worst:.4f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--rate", type=float, default=100)
    parser.add_argument("--burst", type=int, default=20)
    parser.add_argument("--overload", type=float, default=4)
    args = parser.parse_args()
    anyio.run(overload, args.seconds, args.rate, args.burst, args.overload)
