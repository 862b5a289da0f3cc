"""Anthropic Messages API (`POST {base_url}/v1/messages`), streamed over SSE.

Stream shape: `message_start` (input token count), `content_block_start`, `ping`,
`content_block_delta` events with `text_delta`s, `content_block_stop`, `message_delta`
(stop_reason, cumulative output tokens), `message_stop`; or an `error` event.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping
from contextlib import aclosing
from typing import Any, ClassVar

from mcp_orchestrator.models import GenerationParams, Message, Usage
from mcp_orchestrator.workers import taxonomy
from mcp_orchestrator.workers.base import Chunk, WorkerError, WorkerRequest
from mcp_orchestrator.workers.http_worker import HttpWorker
from mcp_orchestrator.workers.keys import key_hint
from mcp_orchestrator.workers.replies import finish_reason, token_count
from mcp_orchestrator.workers.transport import (
    Endpoint,
    EventStream,
    decode_event,
    ended_early,
    open_event_stream,
    request_json,
)

DEFAULT_BASE_URL = "https://api.anthropic.com"
API_VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 1024
"""The Messages API requires max_tokens; used only when neither call nor config sets one."""

STOP_REASONS = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length", "tool_use": "tool_calls"}
"""Anthropic's stop reasons in the OpenAI vocabulary the rest of the pipeline uses."""


class AnthropicWorker(HttpWorker):
    kind: ClassVar[str] = "anthropic"
    default_model: ClassVar[str | None] = "claude-3-5-haiku-latest"
    messages_path: ClassVar[str] = "/v1/messages"
    models_path: ClassVar[str] = "/v1/models"

    def auth_headers(self, key: str) -> Mapping[str, str]:
        return {"x-api-key": key}

    def static_headers(self) -> Mapping[str, str]:
        return {"anthropic-version": API_VERSION}

    def body(self, messages: tuple[Message, ...], params: GenerationParams) -> dict[str, Any]:
        system = "\n\n".join(m.content for m in messages if m.role == "system")
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": params.max_tokens or DEFAULT_MAX_TOKENS,
            "messages": [{"role": m.role, "content": m.content} for m in messages if m.role != "system"],
            "stream": self.stream,
        }
        if system:
            body["system"] = system
        if params.temperature is not None:
            body["temperature"] = params.temperature
        if params.top_p is not None:
            body["top_p"] = params.top_p
        if params.stop:
            body["stop_sequences"] = list(params.stop)
        # The Messages API has no seed: temperature 0 is its way to repeatable answers.
        return body

    async def generate(self, request: WorkerRequest) -> AsyncGenerator[Chunk, None]:
        self._require_key()
        messages, params = self.prepare(request)
        body = self.body(messages, params)
        endpoint = self.endpoint
        if not self.stream:
            answer = await request_json(self.http, endpoint, "POST", self.messages_path, body)
            yield message_chunk(endpoint, answer)
            return
        async with (
            open_event_stream(self.http, endpoint, self.messages_path, body, self.background_reads) as events,
            aclosing(read_messages_stream(endpoint, events)) as chunks,
        ):
            async for chunk in chunks:
                yield chunk

    def _require_key(self) -> None:
        if self.api_key.status == "missing":
            raise WorkerError(self.endpoint.backend, f"no API key: {key_hint(self.api_key)}")

    async def health(self) -> None:
        self._require_key()
        await request_json(self.http, self.endpoint, "GET", self.models_path)


async def read_messages_stream(endpoint: Endpoint, events: EventStream) -> AsyncGenerator[Chunk, None]:
    """Messages SSE events -> chunks; the last chunk carries usage and the stop reason."""
    input_tokens = output_tokens = 0
    stop_reason: str | None = None
    stopped = False
    async for batch in events:
        for event in batch:
            if event.event == "ping":
                continue
            data = decode_event(endpoint, event)
            kind = data.get("type", event.event)
            if kind == "error":
                raise taxonomy.event_error(endpoint.backend, data, endpoint.secrets)
            if kind == "message_start":
                message = data.get("message")
                usage = message.get("usage") if isinstance(message, dict) else None
                input_tokens = _input_tokens(endpoint, usage, input_tokens)
                output_tokens = _count(endpoint, usage, "output_tokens", output_tokens)
            elif kind == "content_block_delta":
                delta = data.get("delta")
                if not isinstance(delta, dict):
                    raise taxonomy.malformed(endpoint.backend, "content_block_delta without a delta object", event.data)
                if delta.get("type") == "text_delta" and isinstance(delta.get("text"), str) and delta["text"]:
                    yield Chunk(delta["text"])
            elif kind == "message_delta":
                delta = data.get("delta")
                if isinstance(delta, dict) and delta.get("stop_reason"):
                    stop_reason = finish_reason(endpoint.backend, delta["stop_reason"], event.data)
                usage = data.get("usage")
                output_tokens = _count(endpoint, usage, "output_tokens", output_tokens)
                input_tokens = _input_tokens(endpoint, usage, input_tokens)
            elif kind == "message_stop":
                stopped = True
                break
        if stopped:
            await events.finish()
            break
    if not stopped:
        raise ended_early(endpoint, "message_stop")
    finish = STOP_REASONS.get(stop_reason, stop_reason) if stop_reason else None
    yield Chunk("", Usage(input_tokens=input_tokens, output_tokens=output_tokens), finish)


def message_chunk(endpoint: Endpoint, answer: Any) -> Chunk:
    """A non-streaming Messages answer as one chunk."""
    if not isinstance(answer, dict) or not isinstance(answer.get("content"), list):
        raise taxonomy.malformed(endpoint.backend, "the message has no content list", str(answer))
    text = "".join(
        str(block.get("text", ""))
        for block in answer["content"]
        if isinstance(block, dict) and block.get("type") == "text"
    )
    usage = answer.get("usage")
    reason = finish_reason(endpoint.backend, answer.get("stop_reason"), answer)
    return Chunk(
        text,
        Usage(
            input_tokens=_input_tokens(endpoint, usage, 0), output_tokens=_count(endpoint, usage, "output_tokens", 0)
        ),
        STOP_REASONS.get(reason, reason) if reason else None,
    )


def _count(endpoint: Endpoint, usage: Any, name: str, current: int) -> int:
    if not isinstance(usage, dict) or usage.get(name) is None:
        return current
    return token_count(endpoint.backend, usage[name], f"usage.{name}", usage)


def _input_tokens(endpoint: Endpoint, usage: Any, current: int) -> int:
    """Input tokens including those read from or written to the prompt cache (billed too)."""
    if not isinstance(usage, dict) or usage.get("input_tokens") is None:
        return current
    total = 0
    for name in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"):
        total += _count(endpoint, usage, name, 0)
    return total
