"""Context sources the tests name in config files (`[stages.rag] source = "tests.support_context:NAME"`)."""

from __future__ import annotations

import anyio


class Passages:
    """Always the same passage, counting its calls."""

    calls = 0

    async def retrieve(self, query: str, session_id: str | None, max_tokens: int) -> list[str]:
        Passages.calls += 1
        return ["alpha beta gamma delta"]


class OtherPassages:
    async def retrieve(self, query: str, session_id: str | None, max_tokens: int) -> list[str]:
        return ["omega"]


class NeverAnswers:
    """Only the stage timeout ends its retrievals."""

    async def retrieve(self, query: str, session_id: str | None, max_tokens: int) -> list[str]:
        await anyio.sleep_forever()
        return []


def not_a_source() -> object:
    return object()
