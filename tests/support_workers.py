"""Workers the tests script: a base with the Worker protocol's plumbing, and one that plays
a script of answers and failures."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import anyio

from mcp_orchestrator.models import Usage
from mcp_orchestrator.workers.base import Chunk, WorkerError, WorkerRequest


class StubWorker:
    """describe, health and aclose of a worker that needs nothing (subclasses write generate)."""

    kind = "stub"
    model = "stub-model"

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "model": self.model}

    async def health(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


class Scripted(StubWorker):
    """Plays one step per call: "ok", "stall", "partial" (a chunk, then a retryable error) or a WorkerError."""

    kind = "scripted"
    model = "script"

    def __init__(self, *steps: object) -> None:
        self.steps = list(steps)
        self.calls = 0

    async def generate(self, request: WorkerRequest) -> AsyncGenerator[Chunk, None]:
        step = self.steps[min(self.calls, len(self.steps) - 1)]
        self.calls += 1
        if isinstance(step, WorkerError):
            raise step
        if step == "stall":
            await anyio.sleep_forever()
        yield Chunk("hello")
        if step == "partial":
            raise WorkerError("scripted", "connection reset mid-stream", retryable=True)
        yield Chunk(" world", Usage(input_tokens=1, output_tokens=2), "stop")
