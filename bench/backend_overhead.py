"""What the orchestrator adds to a real backend call: `infer` through the pipeline and an
in-memory MCP client vs the same request sent straight to llama-server, in the same run.

A real llama-server with Gemma 3 270M is started (as the tests do, tests/support_llama.py).
Every round sends the same streaming chat request (temperature 0, seed, max_tokens 4, so
the server's prompt cache makes its own time short and steady) four ways, in an order
that rotates each round so all see the same machine noise:
- direct: a streaming POST /v1/chat/completions of the very bytes the worker sends (captured
  from it during warm-up), on a client built like the orchestrator's (transport.new_client),
  read to `[DONE]`;
- pipeline: `Orchestrator.infer` with the llama_cpp worker (no MCP);
- MCP: `infer` through an in-memory MCP client (what Claude's call costs, minus the transport);
  no progress token, so no progress notifications (the direct side streams either way);
- litellm Router against the same server, when `litellm` is installed (a peer figure).
Cache and coalescing are off for every call: each one reaches the backend.

Fairness is checked, not assumed: during warm-up every path's requests are traced and the
run prints whether the bodies were identical and how many TCP connections each call opened.
llama-server closes the connection after every streamed answer (whatever the request's
Connection header; it keeps it only for non-streamed ones), so every path, the direct one
included, connects once per call: nobody has a warm connection to reuse.

Target: added p50 <= 2 ms for MCP infer. The backend call itself (~100 ms here) varies by
several ms from call to call, so the difference of two p50s moves by ±2 ms between runs.
The verdict uses the paired estimate instead: per round, the call minus the direct call of
the same round (the two saw the same machine state), whose median comes with a bootstrap
95% interval; it passes only when the interval's upper end meets the target. Also printed: this process's CPU time per call, which is what the orchestrator
adds (it sends the same bytes and waits for the same server) and barely moves with noise.

    .venv/bin/python -m bench.backend_overhead [--rounds 400]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import httpx2
from mcp import Client

from bench.common import at_most, bootstrap, header, percentile, row
from mcp_orchestrator import Orchestrator
from mcp_orchestrator.config import config_from_mapping
from mcp_orchestrator.models import GenerationParams, Submission
from mcp_orchestrator.workers.transport import new_client
from testbeds.llama import llama_server

TARGET_ADDED_MS = 2.0
WARMUP = 20
PROMPT = "Say hi"
MAX_TOKENS = 4
SEED = 7

Call = Callable[[], Awaitable[str]]


def direct_call(client: httpx2.AsyncClient, url: str, body: bytes) -> Call:
    """POST `body` (the worker's own request bytes) and read the stream to [DONE]."""
    headers = {"content-type": "application/json"}

    async def call() -> str:
        for _ in range(3):  # a pooled connection the server already closed: send again, as the worker does
            try:
                return await once()
            except httpx2.RemoteProtocolError:
                continue
        raise RuntimeError("llama-server kept dropping the connection")

    async def once() -> str:
        parts = []
        async with client.stream("POST", url, content=body, headers=headers) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    for choice in json.loads(line[6:]).get("choices", []):
                        parts.append(choice.get("delta", {}).get("content") or "")
        return "".join(parts).strip()

    return call


class Tracer:
    """Request hooks that record each request's body and count the TCP connections it opens
    (httpcore2's `trace` extension). Installed during warm-up only."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.connects = 0

    async def on_request(self, request: httpx2.Request) -> None:
        self.bodies.append(request.content)
        request.extensions["trace"] = self.on_event

    async def on_event(self, name: str, info: dict[str, Any]) -> None:
        if name == "connection.connect_tcp.started":
            self.connects += 1

    def install(self, *clients: httpx2.AsyncClient) -> None:
        for client in clients:
            client.event_hooks = {"request": [self.on_request], "response": []}

    @staticmethod
    def remove(*clients: httpx2.AsyncClient) -> None:
        for client in clients:
            client.event_hooks = {"request": [], "response": []}


def pipeline_call(orchestrator: Orchestrator) -> Call:
    submission = Submission(
        prompt=PROMPT,
        params=GenerationParams(max_tokens=MAX_TOKENS, temperature=0, seed=SEED),
        dedup=False,
        cache=False,
    )

    async def call() -> str:
        return (await orchestrator.infer(submission)).text

    return call


def mcp_call(client: Client) -> Call:
    arguments = {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "seed": SEED}

    async def call() -> str:
        result = await client.call_tool("infer", {**arguments, "cache": False, "dedup": False})
        assert not result.is_error, result.content
        assert result.structured_content is not None
        return str(result.structured_content["text"])

    return call


def litellm_call(root: str) -> Call | None:
    try:
        from litellm import Router  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return None
    router = Router(
        model_list=[
            {
                "model_name": "local",
                "litellm_params": {"model": "openai/gemma", "api_base": f"{root}/v1", "api_key": "none"},
            }
        ]
    )

    async def call() -> str:
        stream = await router.acompletion(
            model="local",
            messages=[{"role": "user", "content": PROMPT}],
            max_tokens=MAX_TOKENS,
            temperature=0,
            seed=SEED,
            stream=True,
        )
        parts = [chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices]
        return "".join(parts).strip()

    return call


async def measure(rounds: int) -> None:
    # One thread: the model server computes on one core and leaves the other to the client
    # side, as a backend on its own hardware would. With both cores busy generating, any
    # CPU the client spends per chunk would slow the model itself and be counted twice.
    with llama_server(parallel=1, threads=1) as server:
        config = config_from_mapping(
            {
                "stages": {"inference": {"worker": "llama_cpp", "base_url": server.root}},
                "deduplication": {"enabled": False},
                "resilience": {"retry_attempts": 0},
            },
            "bench",
        )
        orchestrator = Orchestrator(config)
        http = new_client(config.stages.inference.http)  # the same client, settings and pool as the workers'
        async with http, orchestrator, Client(orchestrator.server) as client:
            # The direct side sends exactly the bytes the worker sends: capture them first.
            capture = Tracer()
            capture.install(orchestrator.http)
            await pipeline_call(orchestrator)()
            Tracer.remove(orchestrator.http)
            worker_body = capture.bodies[-1]
            calls: dict[str, Call] = {
                "direct": direct_call(http, f"{server.root}/v1/chat/completions", worker_body),
                "pipeline": pipeline_call(orchestrator),
                "mcp": mcp_call(client),
            }
            peer = litellm_call(server.root)
            if peer is not None:
                calls["litellm"] = peer
            answers = {name: await call() for name, call in calls.items()}
            tracers = {name: Tracer() for name in calls}
            for _ in range(WARMUP):
                for name, call in calls.items():
                    if name != "litellm":
                        tracers[name].install(http if name == "direct" else orchestrator.http)
                    await call()
                    Tracer.remove(http, orchestrator.http)
            checks = {name: tracer for name, tracer in tracers.items() if name != "litellm"}
            times: dict[str, list[float]] = {name: [] for name in calls}
            cpu: dict[str, list[float]] = {name: [] for name in calls}
            orders = itertools.cycle(itertools.permutations(calls))
            for _ in range(rounds):
                for name in next(orders):
                    started, started_cpu = time.perf_counter(), time.process_time()
                    await calls[name]()
                    times[name].append((time.perf_counter() - started) * 1000)
                    cpu[name].append((time.process_time() - started_cpu) * 1000)
    report(times, cpu, answers, peer is not None, worker_body, checks)


def paired_median(mine: list[float], direct: list[float]) -> tuple[float, float, float]:
    """Median of the per-round differences and its bootstrap 95% interval (fixed seed)."""
    differences = [a - b for a, b in zip(mine, direct, strict=True)]
    low, high = bootstrap(differences, statistics.median)
    return statistics.median(differences), low, high


def report(
    times: dict[str, list[float]],
    cpu: dict[str, list[float]],
    answers: dict[str, Any],
    has_peer: bool,
    worker_body: bytes,
    checks: dict[str, Tracer],
) -> None:
    header("backend overhead: infer through the orchestrator vs straight to llama-server")
    row("rounds (each way)", str(len(times["direct"])))
    row("answers identical", str(len(set(answers.values())) == 1) + f" ({answers['direct']!r})")
    sent = json.loads(worker_body)
    same = all(body == worker_body for tracer in checks.values() for body in tracer.bodies)
    row(
        "request bodies identical (warm-up)",
        f"{same} ({len(worker_body)} bytes, stream={sent.get('stream')}, max_tokens={sent.get('max_tokens')})",
    )
    row(
        "TCP connects per call (warm-up)",
        ", ".join(f"{name} {tracer.connects / max(1, len(tracer.bodies)):.2f}" for name, tracer in checks.items()),
    )
    labels = {
        "direct": "direct to llama-server",
        "pipeline": "Orchestrator.infer (pipeline, no MCP)",
        "mcp": "MCP infer (in-memory client)",
        "litellm": "litellm Router (peer)",
    }
    for name, values in times.items():
        row(
            f"{labels[name]}",
            f"p50 {percentile(values, 0.5):.2f} ms, p99 {percentile(values, 0.99):.2f} ms, "
            f"CPU {statistics.median(cpu[name]):.2f} ms per call",
        )
    base = percentile(times["direct"], 0.5)
    estimates: dict[str, tuple[float, float, float]] = {}
    for name in times:
        if name == "direct":
            continue
        median, low, high = estimates[name] = paired_median(times[name], times["direct"])
        cpu_added = statistics.median(cpu[name]) - statistics.median(cpu["direct"])
        row(
            f"added: {labels[name]}",
            f"paired median {median:+.2f} ms (95% {low:+.2f} .. {high:+.2f}), CPU {cpu_added:+.2f} ms, "
            f"p50 difference {percentile(times[name], 0.5) - base:+.2f} ms",
        )
    if not has_peer:
        row("litellm Router", "not installed: skipped (pip install litellm to add it)")
    added, low, high = estimates["mcp"]
    row("backend call (direct p50)", f"{base:.2f} ms")
    at_most("added p50 of MCP infer (paired median)", added, (low, high), TARGET_ADDED_MS, " ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=400)
    args = parser.parse_args()
    anyio.run(measure, args.rounds)


if __name__ == "__main__":
    main()
