"""The work of the light stages: retrieval, prompt assembly and post-processing.

Pure functions plus the pluggable context source; the scheduling lives in core.py.
"""

from __future__ import annotations

from typing import Protocol

from mcp_orchestrator.models import Message


class ContextSource(Protocol):
    """Where RAG finds context for a prompt. Must honour cancellation (the stage has a timeout)."""

    async def retrieve(self, query: str, session_id: str | None, max_tokens: int) -> list[str]: ...


def trim_context(passages: list[str], max_tokens: int) -> list[str]:
    """Keep whole passages, in order, while their word count fits `max_tokens`."""
    kept, used = [], 0
    for passage in passages:
        words = len(passage.split())
        if used + words > max_tokens:
            break
        kept.append(passage)
        used += words
    return kept


def assemble_messages(prompt: str, system: str | None, context: list[str]) -> tuple[Message, ...]:
    """System prompt first, then the user turn with any retrieved context above the question."""
    messages = []
    if system:
        messages.append(Message(role="system", content=system))
    if context:
        joined = "\n\n".join(context)
        prompt = f"Context:\n{joined}\n\nQuestion:\n{prompt}"
    messages.append(Message(role="user", content=prompt))
    return tuple(messages)


def post_process(text: str, stop: tuple[str, ...], max_chars: int | None, strip: bool) -> tuple[str, bool]:
    """Cut at the first stop sequence and at `max_chars`; returns (text, truncated)."""
    truncated = False
    for sequence in stop:
        index = text.find(sequence)
        if index != -1:
            text, truncated = text[:index], True
    if max_chars is not None and len(text) > max_chars:
        text, truncated = text[:max_chars], True
    if strip:
        text = text.strip()
    return text, truncated
