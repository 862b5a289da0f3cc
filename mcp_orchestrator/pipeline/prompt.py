"""The text work of the light stages: assembling the messages, post-processing the answer.

Pure functions: the stage runners (stages.py) decide when they run.
"""

from __future__ import annotations

from mcp_orchestrator.models import Message


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
