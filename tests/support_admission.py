"""Test support for coalescing, cache and admission tests: a hand-moved clock, a backend
the test opens like a gate, and an orchestrator served to an in-memory MCP client."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup
from mcp import Client
from mcp.types import CallToolResult

from mcp_orchestrator import Orchestrator
from mcp_orchestrator.config import Config
from mcp_orchestrator.models import Usage
from mcp_orchestrator.workers.base import Chunk, Worker, WorkerError, WorkerRequest
from tests.support_workers import StubWorker


class ManualClock:
    """Time that moves only when the test says so (implements the pipeline's Clock)."""

    def __init__(self, start: float = 10_000.0) -> None:
        self.t = start

    def now(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        assert seconds >= 0
        self.t += seconds

    async def sleep(self, seconds: float) -> None:
        self.t += seconds
        await anyio.lowlevel.checkpoint()


class GatedWorker(StubWorker):
    """Answers with the prompt once the test opens the gate. Counts calls, finished calls
    and calls cancelled while waiting, so tests can tell whether the backend call survived."""

    kind = "gated"

    def __init__(self, error: WorkerError | None = None) -> None:
        self.error = error
        self.gate = anyio.Event()
        self.calls = 0
        self.finished = 0
        self.cancelled = 0
        self.prompts: list[str] = []
        """The last message of each call, in the order the calls came."""

    @property
    def model(self) -> str:
        return "gated-model"

    def open(self) -> None:
        self.gate.set()

    def close(self) -> None:
        self.gate = anyio.Event()

    async def generate(self, request: WorkerRequest) -> AsyncGenerator[Chunk, None]:
        self.calls += 1
        self.prompts.append(request.messages[-1].content)
        try:
            await self.gate.wait()
        except anyio.get_cancelled_exc_class():
            self.cancelled += 1
            raise
        if self.error is not None:
            raise self.error
        prompt = request.messages[-1].content
        yield Chunk(prompt, Usage(input_tokens=len(prompt.split()), output_tokens=len(prompt.split())), "stop")
        self.finished += 1


@asynccontextmanager
async def serving(
    config: Config | None = None, worker: Worker | None = None, clock: ManualClock | None = None
) -> AsyncIterator[tuple[Orchestrator, Client]]:
    """Like tests.conftest.running, with a chosen worker and clock; asserts conservation on exit."""
    orchestrator = Orchestrator(config or Config(), worker, clock=clock)
    async with orchestrator, Client(orchestrator.server) as client:
        yield orchestrator, client
        assert orchestrator.pipeline.reconciles(), orchestrator.status().totals
    assert orchestrator.pipeline.reconciles(), orchestrator.status().totals


@dataclass
class Call:
    """One `infer` call running in the background, cancellable on its own."""

    arguments: dict[str, Any]
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    result: CallToolResult | None = None
    done: anyio.Event = field(default_factory=anyio.Event)

    @property
    def cancelled(self) -> bool:
        return self.done.is_set() and self.result is None

    @property
    def structured(self) -> dict[str, Any]:
        assert self.result is not None and not self.result.is_error, self.result
        assert self.result.structured_content is not None
        return self.result.structured_content


def start_call(tg: TaskGroup, client: Client, arguments: dict[str, Any]) -> Call:
    call = Call(arguments)

    async def run() -> None:
        try:
            with call.scope:
                call.result = await client.call_tool("infer", arguments)
        finally:
            call.done.set()

    tg.start_soon(run)
    return call
