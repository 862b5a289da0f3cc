"""What `infer` costs on top of the MCP round trip itself, over stdio and streamable HTTP.

Two servers run side by side as subprocesses, as Claude would start them: mcp-orchestrator
with the echo worker (no delay), and bench/noop_server.py, the same SDK server kind with
one tool that returns its argument. Sequential calls alternate between them in blocks so
both see the same machine noise. Every `infer` prompt is unique (the cache never answers;
each call runs the whole pipeline). A second `infer` figure, all cache hits, is printed for
context, and so is an in-memory run (no transport at all) that shows where the time goes.

A third server, also in the alternation, splits the difference: mcp-orchestrator's MCP
server with the pipeline bypassed (`infer` returns one canned result; bench/noop_server.py
`canned`). no-op -> canned is the MCP layer's share (arguments, the structured result,
the client validating it against the output schema); canned -> infer is the pipeline's.

Target: median `infer` round trip <= 1.2x the no-op tool's; the verdict passes only when the
upper end of the ratio's bootstrap 95% interval meets it.

`--without-client-validation` is a diagnostic, not the measurement: the SDK client checks
every structured result against the tool's output schema with jsonschema (in Python, on
each call); this flag turns that check off in this client process, to show its share.

    .venv/bin/python -m bench.mcp_overhead [--calls 400] [--blocks 8] [--without-client-validation]
"""

from __future__ import annotations

import argparse
import itertools
import socket
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
from mcp import Client, StdioServerParameters

from bench.common import at_most, bootstrap_ratio, header, percentile, row

ROOT = Path(__file__).resolve().parent.parent
TARGET = 1.2
WARMUP = 30


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


ORCHESTRATOR = [sys.executable, "-m", "mcp_orchestrator", "--worker", "echo", "--log-level", "warning"]
NOOP = [sys.executable, "-m", "bench.noop_server"]
CANNED = [sys.executable, "-m", "bench.noop_server", "canned"]


@asynccontextmanager
async def stdio_client(command: list[str]) -> AsyncIterator[Client]:
    params = StdioServerParameters(command=command[0], args=command[1:], cwd=str(ROOT))
    async with Client(params) as client:
        yield client


@asynccontextmanager
async def http_client(command_on: Callable[[int], list[str]]) -> AsyncIterator[Client]:
    """Start the server on a free port, wait until it listens, connect to /mcp."""
    port = free_port()
    process = await anyio.open_process(command_on(port), cwd=str(ROOT), stdout=None, stderr=None)
    try:
        with anyio.fail_after(30):
            while True:
                try:
                    stream = await anyio.connect_tcp("127.0.0.1", port)
                except OSError:
                    await anyio.sleep(0.05)
                    continue
                await stream.aclose()
                break
        async with Client(f"http://127.0.0.1:{port}/mcp") as client:
            yield client
    finally:
        process.terminate()
        with anyio.move_on_after(10):
            await process.wait()


async def timed_calls(client: Client, tool: str, prompts: list[str]) -> list[float]:
    times = []
    for prompt in prompts:
        started = time.perf_counter()
        result = await client.call_tool(tool, {"prompt": prompt})
        times.append((time.perf_counter() - started) * 1000)
        assert not result.is_error, result.content
    return times


async def measure(transport: str, calls: int, blocks: int) -> None:
    counter = itertools.count()

    def prompts(n: int) -> list[str]:
        return [f"a unique prompt number {next(counter)}" for _ in range(n)]

    if transport == "stdio":
        infer_ctx, noop_ctx, canned_ctx = stdio_client(ORCHESTRATOR), stdio_client(NOOP), stdio_client(CANNED)
    else:
        infer_ctx = http_client(lambda port: [*ORCHESTRATOR, "--transport", "http", "--port", str(port)])
        noop_ctx = http_client(lambda port: [*NOOP, "http", str(port)])
        canned_ctx = http_client(lambda port: [*CANNED, "http", str(port)])
    infer_ms: list[float] = []
    noop_ms: list[float] = []
    canned_ms: list[float] = []
    async with infer_ctx as orchestrator, noop_ctx as noop, canned_ctx as canned:
        await timed_calls(orchestrator, "infer", prompts(WARMUP))
        await timed_calls(noop, "noop", prompts(WARMUP))
        await timed_calls(canned, "infer", prompts(WARMUP))
        per_block = calls // blocks
        for _ in range(blocks):
            infer_ms += await timed_calls(orchestrator, "infer", prompts(per_block))
            noop_ms += await timed_calls(noop, "noop", prompts(per_block))
            canned_ms += await timed_calls(canned, "infer", prompts(per_block))
        repeated = await timed_calls(orchestrator, "infer", ["the same prompt"] * per_block)
    ratio = statistics.median(infer_ms) / statistics.median(noop_ms)
    mean_ratio = statistics.fmean(infer_ms) / statistics.fmean(noop_ms)
    canned_ratio = statistics.median(canned_ms) / statistics.median(noop_ms)
    row(f"{transport}: no-op tool", summary(noop_ms))
    row(f"{transport}: infer (echo, every call a new prompt)", summary(infer_ms))
    row(f"{transport}: infer (same prompt: cache hits)", summary(repeated[1:]))
    row(f"{transport}: infer, pipeline bypassed (canned)", summary(canned_ms))
    row(f"{transport}: canned infer / no-op", f"median {canned_ratio:.2f}x (the MCP layer's share)")
    row(f"{transport}: infer / no-op", f"median {ratio:.2f}x, mean {mean_ratio:.2f}x")
    interval = bootstrap_ratio(infer_ms, noop_ms, statistics.median)
    at_most(f"{transport}: infer / no-op (medians)", ratio, interval, TARGET, "x")


def summary(values: list[float]) -> str:
    return (
        f"median {statistics.median(values):.2f} ms, mean {statistics.fmean(values):.2f} ms, "
        f"p99 {percentile(values, 0.99):.2f} ms (n={len(values)})"
    )


async def in_memory(calls: int) -> None:
    """The same comparison without a transport: what the tools themselves cost."""
    from bench.noop_server import CannedOrchestrator
    from bench.noop_server import server as noop_server
    from mcp_orchestrator import Config, Orchestrator

    counter = itertools.count()
    orchestrator, bypassed = Orchestrator(Config()), CannedOrchestrator(Config())
    async with (
        orchestrator,
        bypassed,
        Client(orchestrator.server) as client,
        Client(noop_server) as noop,
        Client(bypassed.server) as canned,
    ):
        unique = [f"in-memory prompt {next(counter)}" for _ in range(WARMUP + calls)]
        await timed_calls(client, "infer", unique[:WARMUP])
        await timed_calls(noop, "noop", unique[:WARMUP])
        await timed_calls(canned, "infer", unique[:WARMUP])
        noop_ms = await timed_calls(noop, "noop", unique[WARMUP:])
        infer_ms = await timed_calls(client, "infer", [f"{p}!" for p in unique[WARMUP:]])
        hits_ms = await timed_calls(client, "infer", ["the same prompt"] * calls)
        canned_ms = await timed_calls(canned, "infer", [f"{p}?" for p in unique[WARMUP:]])
    row("in memory: no-op tool", summary(noop_ms))
    row("in memory: infer (new prompts)", summary(infer_ms))
    row("in memory: infer (cache hits)", summary(hits_ms[1:]))
    row("in memory: infer, pipeline bypassed (canned)", summary(canned_ms))
    row("in memory: infer / no-op", f"median {statistics.median(infer_ms) / statistics.median(noop_ms):.2f}x")


async def main(calls: int, blocks: int) -> None:
    header(f"MCP overhead: {calls} sequential infer calls vs a no-op tool, stdio and streamable HTTP")
    for transport in ("stdio", "http"):
        await measure(transport, calls, blocks)
    await in_memory(calls)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument(
        "--without-client-validation",
        action="store_true",
        help="diagnostic: skip the SDK client's output-schema check of each result",
    )
    args = parser.parse_args()
    if args.without_client_validation:
        from mcp.client.session import ClientSession

        async def unchecked(self: ClientSession, name: str, result: Any) -> None:
            return None

        ClientSession.validate_tool_result = unchecked  # type: ignore[method-assign]
        print("   (diagnostic run: the client does not validate results against output schemas)")
    anyio.run(main, args.calls, args.blocks)
