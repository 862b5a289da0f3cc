"""Echo worker: answers with the user's prompt, word by word. For demos, tests and benchmarks."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import anyio

from mcp_orchestrator.models import GenerationParams, Usage
from mcp_orchestrator.workers.base import Chunk, WorkerRequest


class EchoWorker:
    """Streams back the last user message.

    `delay_ms` is simulated time to first token; `chunk_delay_ms` spaces the words,
    so a slow streaming backend can be modelled without a network.
    """

    kind = "echo"

    def __init__(
        self,
        model: str = "echo",
        delay_ms: int = 0,
        chunk_delay_ms: int = 0,
        *,
        defaults: GenerationParams | None = None,
    ) -> None:
        self._model = model
        self.delay_ms = delay_ms
        self.chunk_delay_ms = chunk_delay_ms
        self.defaults = defaults or GenerationParams()
        self.calls = 0

    @property
    def model(self) -> str:
        return self._model

    async def generate(self, request: WorkerRequest) -> AsyncGenerator[Chunk, None]:
        self.calls += 1
        if self.delay_ms:
            await anyio.sleep(self.delay_ms / 1000)
        messages = request.messages
        prompt = next((m.content for m in reversed(messages) if m.role == "user"), "")
        words = prompt.split(" ")
        # The call's own max_tokens, else this worker's (the only parameter echo honours).
        limit = request.params.max_tokens
        if limit is None:
            limit = self.defaults.max_tokens
        finish = "stop"
        if limit is not None and len(words) > limit:
            words, finish = words[:limit], "length"
        input_tokens = sum(len(m.content.split()) for m in messages)
        last = len(words) - 1
        for index, word in enumerate(words):
            if self.chunk_delay_ms and index:
                await anyio.sleep(self.chunk_delay_ms / 1000)
            text = word if index == 0 else " " + word
            if index == last:
                yield Chunk(text, Usage(input_tokens=input_tokens, output_tokens=len(words)), finish)
            else:
                yield Chunk(text)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "model": self._model,
            "delay_ms": self.delay_ms,
            "chunk_delay_ms": self.chunk_delay_ms,
        }

    async def health(self) -> None:
        return None

    async def aclose(self) -> None:
        return None
