"""The gateway benchmark: mcp-orchestrator `infer` over streamable HTTP vs the backend itself,
the naive bridge and (with --litellm) the LiteLLM proxy, at concurrency 1, 16 and 64.

Every server runs as its own process on loopback, in front of one mock OpenAI backend with a
fixed 20 ms latency (testbeds/mock_openai.py, its own process too):
- direct: POST /v1/chat/completions to the mock;
- naive bridge: bench/naive_bridge.py, an SDK MCPServer whose one tool forwards the prompt
  with httpx2 and returns the text (what most LLM-calling MCP servers are);
- orchestrator: `mcp-orchestrator --transport http`, worker open_ai at the mock with
  `stream = false` (the same single JSON exchange with the backend as the bridge's and
  LiteLLM's), deduplication off and `cache: false, dedup: false` on every call, so every
  call reaches the backend;
- LiteLLM proxy (--litellm): `litellm[proxy]==1.105.7`, installed by this script into a
  throwaway venv under the temp directory (reused while the version matches), one worker,
  model `openai/mock-gpt` at the mock, called through its OpenAI API with its master key;
- with Redis (when `[distributed] redis_url` is accepted; a real server from testbeds/redis.py):
  deduplication and cache on with unique prompts (every call still reaches the backend, and
  pays for the shared lookups and the cross-process lock), one process without Redis, one
  with, and `--workers 2` with.

One client process (this one) drives them all with one httpx2 client per target and level
(keep-alive, `concurrency` connections); MCP calls are raw 2026-07-28 POSTs (no session, the
SDK's headers and `_meta` envelope), so the client costs the same for the bridge and the
orchestrator and validates nothing. The client shares the 2 cores with the servers, so the
headline is **server CPU seconds per call**: utime + stime of each server's process tree
(supervisor and workers included) from /proc, read before and after every block.

Rounds interleave the targets (the order rotates each round) so all see the same machine
noise. Verdicts read intervals, never the best of several runs:
- CPU per call and throughput ratios: per round (the two ran one after the other in it), the
  distribution-free interval for the median of the rounds (bench/common.median_interval);
- added p50 at c=1: the difference of the two sides' p50s over all calls, each side served by
  `--instances` processes of its server (default INSTANCES_AT_C1) (the extra ones run at c=1 only), with a two-level
  bootstrap 95% interval (processes resampled, then calls): processes of the same code differ
  by more than the calls' sampling noise, and one process per side would pass its luck on.

    .venv/bin/python -m bench.gateway [--rounds 7] [--litellm] [--no-redis] [--instances 3]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx2

from bench.common import (
    BOOTSTRAP_SAMPLES,
    BOOTSTRAP_SEED,
    at_least,
    at_most,
    header,
    median_interval,
    percentile,
    row,
)
from testbeds.processes import free_port, terminate

ROOT = Path(__file__).resolve().parent.parent
LATENCY_MS = 20.0
LEVELS = (1, 16, 64)
MODEL = "mock-gpt"
PROTOCOL = "2026-07-28"
STARTUP_TIMEOUT_S = 120.0
CALL_TIMEOUT_S = 30.0
BLOCK_TIMEOUT_S = 600.0
LITELLM_VERSION = "1.105.7"
LITELLM_VENV = Path(tempfile.gettempdir()) / "mcp-orchestrator-bench-litellm"
INSTANCES_AT_C1 = 3
"""Server processes per side of each c=1 latency verdict. Two processes of the same code, side
by side in one run, differ in p50 by up to about 0.25 ms here (three pairs of the same local and
Redis servers gave Redis's added p50 as +0.18, +0.22 and +0.45 ms), more than the calls'
sampling noise: one process per side would hand its luck to the verdict."""
INSTALL_TIMEOUT_S = 1800.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

TARGET_CPU_VS_BRIDGE = 1.3
TARGET_ADDED_P50_MS = 0.5
TARGET_THROUGHPUT_VS_LITELLM = 1.5
TARGET_REDIS_ADDED_P50_MS = 0.5
TARGET_CPU_N_PROCESSES = 1.2

Call = Callable[[httpx2.AsyncClient, int], Awaitable[None]]
STALE_CONNECTION = (httpx2.ReadError, httpx2.WriteError, httpx2.RemoteProtocolError)


# ---------------------------------------------------------------------------- processes


def tree_cpu_s(root: int) -> float:
    """utime + stime, in seconds, of `root` and every live descendant (Linux /proc)."""
    children: dict[int, list[int]] = {}
    times: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        pid = int(entry.name)
        children.setdefault(int(fields[1]), []).append(pid)
        times[pid] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += times.get(pid, 0.0)
        todo += children.get(pid, [])
    return total


def wait_until_ready(
    url: str, process: subprocess.Popen[Any], log: Path, headers: dict[str, str] | None = None
) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    with httpx2.Client(timeout=2.0) as http:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"{process.args!r} exited with {process.returncode}:\n{_tail(log)}")
            try:
                if http.get(url, headers=headers).status_code == 200:
                    return
            except httpx2.TransportError:
                pass
            time.sleep(0.1)
    raise TimeoutError(f"{url} not ready within {STARTUP_TIMEOUT_S:g} s:\n{_tail(log)}")


def _tail(log: Path) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-30:]) if log.exists() else "(no log)"


@contextmanager
def started(
    command: Sequence[str], ready_url: str, logs: Path, name: str, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    log = logs / f"{name}.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            list(command),
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
    try:
        wait_until_ready(ready_url, process, log)
        yield process
    finally:
        terminate(process)


def orchestrator_config(path: Path, backend: str, *, dedup: bool, redis_url: str | None) -> Path:
    lines = [
        "[stages.inference]",
        'worker = "open_ai"',
        f'base_url = "{backend}/v1"',
        f'model = "{MODEL}"',
        "stream = false",
        "[deduplication]",
        f"enabled = {'true' if dedup else 'false'}",
    ]
    if redis_url is not None:
        lines += ["[distributed]", f'redis_url = "{redis_url}"']
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def redis_accepted(url: str) -> str | None:
    """None when this version accepts `[distributed] redis_url`, else why not."""
    from mcp_orchestrator.config import config_from_mapping
    from mcp_orchestrator.errors import ConfigError

    try:
        config_from_mapping({"distributed": {"redis_url": url}}, "bench")
    except ConfigError as exc:
        return "; ".join(str(problem) for problem in exc.problems)
    return None


def litellm_binary() -> Path:
    """The `litellm` command of the throwaway venv, installed there first when missing."""
    binary = LITELLM_VENV / "bin" / "litellm"
    marker = LITELLM_VENV / f"installed-{LITELLM_VERSION}"
    if binary.exists() and marker.exists():
        return binary
    print(f"   installing litellm[proxy]=={LITELLM_VERSION} into {LITELLM_VENV} (a few minutes, once)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(LITELLM_VENV)], check=True, timeout=120)
    subprocess.run(
        [str(LITELLM_VENV / "bin" / "pip"), "install", "-q", f"litellm[proxy]=={LITELLM_VERSION}"],
        check=True,
        timeout=INSTALL_TIMEOUT_S,
    )
    marker.touch()
    return binary


# ---------------------------------------------------------------------------- calls


def chat_call(url: str, headers: dict[str, str] | None = None) -> Call:
    """An OpenAI chat completion, not streamed (the mock directly, or LiteLLM)."""

    async def call(client: httpx2.AsyncClient, n: int) -> None:
        body = {"model": MODEL, "messages": [{"role": "user", "content": f"gateway prompt {n}"}]}
        response = await client.post(url, json=body, headers=headers)
        response.raise_for_status()
        assert response.json()["choices"][0]["message"]["content"], response.text

    return call


def mcp_call(url: str, tool: str, extra: dict[str, Any]) -> Call:
    """A 2026-07-28 tools/call POST (no session), read to its result."""
    headers = {
        "accept": "application/json, text/event-stream",
        "mcp-protocol-version": PROTOCOL,
        "mcp-method": "tools/call",
        "mcp-name": tool,
    }
    meta = {
        "io.modelcontextprotocol/protocolVersion": PROTOCOL,
        "io.modelcontextprotocol/clientCapabilities": {},
    }

    async def call(client: httpx2.AsyncClient, n: int) -> None:
        arguments = {"prompt": f"gateway prompt {n}", **extra}
        body = {
            "jsonrpc": "2.0",
            "id": n,
            "method": "tools/call",
            "params": {"name": tool, "arguments": arguments, "_meta": meta},
        }
        response = await client.post(url, json=body, headers=headers)
        response.raise_for_status()
        message = _jsonrpc_answer(response)
        assert "result" in message and not message["result"].get("isError"), message

    return call


def _jsonrpc_answer(response: httpx2.Response) -> dict[str, Any]:
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        for line in reversed(response.text.splitlines()):
            if line.startswith("data:"):
                message: dict[str, Any] = json.loads(line[5:])
                if "result" in message or "error" in message:
                    return message
        raise AssertionError(f"no JSON-RPC answer in the stream: {response.text[:500]}")
    answer: dict[str, Any] = response.json()
    return answer


# ---------------------------------------------------------------------------- measuring


@dataclass
class Target:
    name: str
    label: str
    call: Call
    pid: int | None
    """The server process whose tree's CPU is counted (None: the backend itself)."""
    latencies: dict[int, list[float]] = field(default_factory=dict)
    cpu_per_call: dict[int, list[float]] = field(default_factory=dict)
    throughput: dict[int, list[float]] = field(default_factory=dict)
    retries: int = 0
    """Calls sent again after their kept-alive connection turned out to be closed."""
    levels: tuple[int, ...] = LEVELS
    """The levels it runs at (the extra instances of a server: c=1 only)."""


def at_c1_only(target: Target, instance: int) -> Target:
    """`target` as instance `instance` of its server, measured at c=1 only (see INSTANCES_AT_C1)."""
    target.levels = (1,)
    target.label = f"{target.label} (instance {instance})"
    return target


def instances(targets: dict[str, Target], name: str) -> list[Target]:
    """Every instance of the server `name` (the main one first)."""
    return [target for key, target in targets.items() if key == name or key.startswith(f"{name}#")]


async def run_block(
    target: Target, client: httpx2.AsyncClient, concurrency: int, calls: int, numbers: Iterator[int]
) -> tuple[list[float], float, float]:
    """`calls` calls, `concurrency` at a time; returns (latencies ms, wall s, server CPU s)."""
    latencies: list[float] = []
    left = calls

    async def caller() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            number = next(numbers)
            started_at = time.perf_counter()
            try:
                await target.call(client, number)
            except STALE_CONNECTION:  # a kept-alive connection the server closed while idle (uvicorn: 5 s)
                target.retries += 1
                await target.call(client, number)  # counted in this call's latency
            latencies.append((time.perf_counter() - started_at) * 1000)

    cpu_before = tree_cpu_s(target.pid) if target.pid is not None else 0.0
    began = time.perf_counter()
    with anyio.fail_after(BLOCK_TIMEOUT_S):
        async with anyio.create_task_group() as tg:
            for _ in range(concurrency):
                tg.start_soon(caller)
    wall = time.perf_counter() - began
    cpu = (tree_cpu_s(target.pid) - cpu_before) if target.pid is not None else 0.0
    return latencies, wall, cpu


async def measure(targets: list[Target], rounds: int, block_calls: dict[int, int]) -> None:
    numbers = itertools.count(random.randrange(10**9))  # unique prompts, unique across runs too
    for level in LEVELS:
        limits = httpx2.Limits(max_connections=level, max_keepalive_connections=level)
        running = [target for target in targets if level in target.levels]
        clients = {t.name: httpx2.AsyncClient(timeout=CALL_TIMEOUT_S, limits=limits) for t in running}
        try:
            for target in running:  # warm-up: connections open, caches of code paths hot
                await run_block(target, clients[target.name], level, max(2 * level, 20), numbers)
                target.latencies[level], target.cpu_per_call[level], target.throughput[level] = [], [], []
            for number in range(rounds):
                order = running[number % len(running) :] + running[: number % len(running)]
                for target in order:
                    latencies, wall, cpu = await run_block(
                        target, clients[target.name], level, block_calls[level], numbers
                    )
                    target.latencies[level] += latencies
                    target.cpu_per_call[level].append(cpu / len(latencies))
                    target.throughput[level].append(len(latencies) / wall)
            print(f"   (level {level} done)", flush=True)
        finally:
            for client in clients.values():
                await client.aclose()


# ---------------------------------------------------------------------------- report


def grouped_p50_difference(mine: list[list[float]], base: list[list[float]]) -> tuple[float, tuple[float, float]]:
    """p50 of all `mine` calls - p50 of all `base` calls, each side a list of server instances'
    latencies, with a two-level bootstrap 95% interval: the instances resampled, then the calls
    within each, so the interval holds the difference between processes as well as the calls'."""
    rand = random.Random(BOOTSTRAP_SEED)

    def resampled(side: list[list[float]]) -> list[float]:
        chosen = [rand.choice(side) for _ in side]
        return [value for calls in chosen for value in rand.choices(calls, k=len(calls))]

    estimates = sorted(
        percentile(resampled(mine), 0.5) - percentile(resampled(base), 0.5) for _ in range(BOOTSTRAP_SAMPLES)
    )
    interval = estimates[int(0.025 * len(estimates))], estimates[int(0.975 * len(estimates)) - 1]
    pooled_mine = [value for calls in mine for value in calls]
    pooled_base = [value for calls in base for value in calls]
    return percentile(pooled_mine, 0.5) - percentile(pooled_base, 0.5), interval


def per_round_ratio(mine: list[float], base: list[float]) -> tuple[float, tuple[float, float], float]:
    """The median of the per-round ratios, with its distribution-free interval and coverage."""
    ratios = [a / b for a, b in zip(mine, base, strict=True)]
    low, high, coverage = median_interval(ratios)
    return statistics.median(ratios), (low, high), coverage


def report(targets: dict[str, Target], rounds: int, block_calls: dict[int, int]) -> None:
    header(f"gateway: {LATENCY_MS:g} ms mock OpenAI backend; direct, naive bridge, mcp-orchestrator and peers")
    row("rounds per level, calls per block", ", ".join(f"c={c}: {rounds} x {n}" for c, n in block_calls.items()))
    row("processes per side at c=1", str(len(instances(targets, "orchestrator"))))
    direct = targets["direct"]
    print()
    print("   | target | c | p50 ms | p99 ms | added p50 / p99 ms | calls/s | server CPU ms/call |")
    print("   |---|---|---|---|---|---|---|")
    for level in LEVELS:
        base50, base99 = percentile(direct.latencies[level], 0.5), percentile(direct.latencies[level], 0.99)
        for target in (t for name in targets if "#" not in name for t in instances(targets, name)):
            if level not in target.levels:
                continue
            values = target.latencies[level]
            p50, p99 = percentile(values, 0.5), percentile(values, 0.99)
            added_text = "—" if target is direct else f"{p50 - base50:+.2f} / {p99 - base99:+.2f}"
            cpu = "—" if target.pid is None else f"{1000 * statistics.median(target.cpu_per_call[level]):.2f}"
            print(
                f"   | {target.label} | {level} | {p50:.2f} | {p99:.2f} | {added_text} | "
                f"{statistics.median(target.throughput[level]):.0f} | {cpu} |"
            )
    print()
    retried = ", ".join(f"{t.name} {t.retries}" for t in targets.values() if t.retries)
    row("calls sent again on a closed idle connection", retried or "none")
    orchestrator, bridge = targets["orchestrator"], targets["bridge"]
    ratio, interval, coverage = per_round_ratio(orchestrator.cpu_per_call[16], bridge.cpu_per_call[16])
    at_most(
        "server CPU per call at c=16, orchestrator / naive bridge", ratio, interval, TARGET_CPU_VS_BRIDGE, "x", coverage
    )
    c1_per_instance(targets, ("bridge", "orchestrator", "local", "redis1"))
    added, interval2 = c1_difference(targets, "orchestrator", "bridge")
    at_most("added p50 at c=1, orchestrator - naive bridge", added, interval2, TARGET_ADDED_P50_MS, " ms")
    if "litellm" in targets:
        ratio, interval, coverage = per_round_ratio(orchestrator.throughput[64], targets["litellm"].throughput[64])
        at_least(
            "throughput at c=64, orchestrator / LiteLLM proxy",
            ratio,
            interval,
            TARGET_THROUGHPUT_VS_LITELLM,
            "x",
            coverage,
        )
    else:
        row("LiteLLM proxy", "not run (--litellm installs and runs it)")
    if "redis1" in targets:
        redis1, redis2 = targets["redis1"], targets["redis2"]
        added, interval2 = c1_difference(targets, "redis1", "local")
        at_most(
            "Redis's added p50 at c=1 (dedup+cache on, 1 process)", added, interval2, TARGET_REDIS_ADDED_P50_MS, " ms"
        )
        for level in (16, 64):
            ratio, interval, coverage = per_round_ratio(redis2.cpu_per_call[level], redis1.cpu_per_call[level])
            at_most(
                f"server CPU per call at c={level}, 2 processes / 1 (Redis)",
                ratio,
                interval,
                TARGET_CPU_N_PROCESSES,
                "x",
                coverage,
            )
        ratio, interval, coverage = per_round_ratio(redis2.throughput[64], redis1.throughput[64])
        row(
            "throughput at c=64, 2 processes / 1 (Redis)",
            f"{ratio:.2f}x ({coverage:.0%} {interval[0]:.2f} .. {interval[1]:.2f})",
        )


def c1_difference(targets: dict[str, Target], mine: str, base: str) -> tuple[float, tuple[float, float]]:
    """The c=1 p50 difference between two servers, over all their instances."""
    return grouped_p50_difference(
        [target.latencies[1] for target in instances(targets, mine)],
        [target.latencies[1] for target in instances(targets, base)],
    )


def c1_per_instance(targets: dict[str, Target], names: Sequence[str]) -> None:
    for name in names:
        if name in targets:
            p50s = " / ".join(f"{percentile(t.latencies[1], 0.5):.2f}" for t in instances(targets, name))
            row(f"c=1 p50 per instance, {name}", f"{p50s} ms")


# ---------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls-c1", type=int, default=40, help="calls per block at concurrency 1")
    parser.add_argument("--calls-c16", type=int, default=320, help="calls per block at concurrency 16")
    parser.add_argument("--calls-c64", type=int, default=640, help="calls per block at concurrency 64")
    parser.add_argument(
        "--litellm", action="store_true", help=f"install (once) and run litellm[proxy]=={LITELLM_VERSION}"
    )
    parser.add_argument("--no-redis", action="store_true", help="skip the Redis phases")
    parser.add_argument(
        "--instances",
        type=int,
        default=INSTANCES_AT_C1,
        metavar="N",
        help=f"server processes per side of each c=1 latency verdict (default {INSTANCES_AT_C1}, at least 1)",
    )
    args = parser.parse_args()
    if args.instances < 1:
        parser.error("--instances must be at least 1")
    block_calls = {1: args.calls_c1, 16: args.calls_c16, 64: args.calls_c64}
    python = sys.executable
    with ExitStack() as stack:
        logs = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-gateway-")))
        mock_port = free_port()
        backend = f"http://127.0.0.1:{mock_port}"
        mock = stack.enter_context(
            started(
                [python, "-m", "testbeds.mock_openai", "--port", str(mock_port), "--latency-ms", str(LATENCY_MS)],
                f"{backend}/health",
                logs,
                "mock",
            )
        )
        targets: dict[str, Target] = {
            "direct": Target("direct", "direct to the mock", chat_call(f"{backend}/v1/chat/completions"), None)
        }
        row("mock backend", f"{backend} (pid {mock.pid}, {LATENCY_MS:g} ms per answer)")

        targets["bridge"] = _bridge(stack, python, backend, logs, "bridge")
        no_dedup = {"cache": False, "dedup": False}
        config = orchestrator_config(logs / "plain.toml", backend, dedup=False, redis_url=None)
        label = "mcp-orchestrator infer"
        targets["orchestrator"] = _orchestrator(stack, "orchestrator", label, config, logs, no_dedup)
        for instance in range(2, args.instances + 1):
            name = f"bridge#{instance}"
            targets[name] = at_c1_only(_bridge(stack, python, backend, logs, name), instance)
            name = f"orchestrator#{instance}"
            targets[name] = at_c1_only(_orchestrator(stack, name, label, config, logs, no_dedup), instance)
        if args.litellm:
            targets["litellm"] = _litellm(stack, backend, logs)
        if not args.no_redis:
            _redis_targets(stack, targets, backend, logs, args.instances)
        assert mock.poll() is None
        anyio.run(measure, list(targets.values()), args.rounds, block_calls)
        report(targets, args.rounds, block_calls)


def _bridge(stack: ExitStack, python: str, backend: str, logs: Path, name: str) -> Target:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [python, "-m", "bench.naive_bridge", str(port), f"{backend}/v1", MODEL]
    # The SDK answers a GET /mcp without a session with 400/405/406: ready is "it answers at all".
    process = stack.enter_context(_started_any(command, f"{url}/mcp", logs, name))
    return Target(name, "naive bridge (SDK + httpx2)", mcp_call(f"{url}/mcp", "ask", {}), process.pid)


@contextmanager
def _started_any(command: Sequence[str], url: str, logs: Path, name: str) -> Iterator[subprocess.Popen[bytes]]:
    """Like `started`, ready once `url` answers anything over HTTP."""
    log = logs / f"{name}.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            list(command), cwd=ROOT, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        with httpx2.Client(timeout=2.0) as http:
            while True:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not start:\n{_tail(log)}")
                try:
                    http.get(url)
                    break
                except httpx2.TransportError:
                    time.sleep(0.1)
        yield process
    finally:
        terminate(process)


def _orchestrator(
    stack: ExitStack, name: str, label: str, config: Path, logs: Path, extra: dict[str, Any], workers: int = 1
) -> Target:
    port = free_port()
    command = [sys.executable, "-m", "mcp_orchestrator", "--config", str(config), "--transport", "http"]
    command += ["--port", str(port), "--log-level", "warning"]
    if workers > 1:
        command += ["--workers", str(workers)]
    env = {"OPENAI_API_KEY": "sk-bench-mock-backend-ignores-it"}
    url = f"http://127.0.0.1:{port}"
    process = stack.enter_context(started(command, f"{url}/healthz", logs, name, env))
    return Target(name, label, mcp_call(f"{url}/mcp", "infer", extra), process.pid)


def _litellm(stack: ExitStack, backend: str, logs: Path) -> Target:
    binary = litellm_binary()
    key = "sk-" + secrets.token_urlsafe(24)  # never printed
    config = logs / "litellm.yaml"
    config.write_text(
        "model_list:\n"
        f"  - model_name: {MODEL}\n"
        "    litellm_params:\n"
        f"      model: openai/{MODEL}\n"
        f"      api_base: {backend}/v1\n"
        "      api_key: not-needed\n"
        "litellm_settings:\n"
        "  telemetry: false\n"
        "  drop_params: true\n",
        encoding="utf-8",
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {"LITELLM_MASTER_KEY": key, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR"}
    command = [str(binary), "--config", str(config), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"]
    process = stack.enter_context(started(command, f"{url}/health/liveliness", logs, "litellm", env))
    headers = {"authorization": f"Bearer {key}"}
    return Target(
        "litellm", f"LiteLLM proxy {LITELLM_VERSION}", chat_call(f"{url}/v1/chat/completions", headers), process.pid
    )


def _redis_targets(stack: ExitStack, targets: dict[str, Target], backend: str, logs: Path, count: int) -> None:
    from testbeds.redis import redis_server

    redis = stack.enter_context(redis_server())
    refused = redis_accepted(redis.url)
    if refused is not None:
        row("Redis phases", f"skipped: [distributed] redis_url is refused by this version ({refused})")
        return
    local = orchestrator_config(logs / "local.toml", backend, dedup=True, redis_url=None)
    shared = orchestrator_config(logs / "redis.toml", backend, dedup=True, redis_url=redis.url)
    local_label, redis_label = (
        "orchestrator, dedup+cache local (1 process)",
        "orchestrator, dedup+cache on Redis (1 process)",
    )
    targets["local"] = _orchestrator(stack, "local", local_label, local, logs, {})
    targets["redis1"] = _orchestrator(stack, "redis1", redis_label, shared, logs, {})
    targets["redis2"] = _orchestrator(
        stack, "redis2", "orchestrator, dedup+cache on Redis (--workers 2)", shared, logs, {}, workers=2
    )
    for instance in range(2, count + 1):
        name = f"local#{instance}"
        targets[name] = at_c1_only(_orchestrator(stack, name, local_label, local, logs, {}), instance)
        name = f"redis1#{instance}"
        targets[name] = at_c1_only(_orchestrator(stack, name, redis_label, shared, logs, {}), instance)


if __name__ == "__main__":
    main()
