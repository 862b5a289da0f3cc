"""OpenAI chat completions (`POST {base_url}/chat/completions`), streamed over SSE.

The same wire format is served by vLLM and llama.cpp's server, whose workers
subclass this one. Stream shape: `data: {chunk}` events whose `choices[0].delta.content`
carries text, a chunk with `finish_reason`, with `stream_options.include_usage` a last
chunk with `usage` (and empty `choices`), then `data: [DONE]`.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
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

DEFAULT_BASE_URL = "https://api.openai.com/v1"
DONE = "[DONE]"


class OpenAIWorker(HttpWorker):
    kind: ClassVar[str] = "open_ai"
    default_model: ClassVar[str | None] = "gpt-4o-mini"
    chat_path: ClassVar[str] = "/chat/completions"
    models_path: ClassVar[str] = "/models"
    max_tokens_field: ClassVar[str] = "max_completion_tokens"
    """OpenAI's current name; `max_tokens` is deprecated there (and refused by reasoning models)."""

    def body(self, messages: tuple[Message, ...], params: GenerationParams) -> dict[str, Any]:
        body: dict[str, Any] = {
            "messages": [{"role": m.role, "content": m.content} for m in messages],
            "stream": self.stream,
        }
        if self._model is not None:
            body["model"] = self._model
        if self.stream:
            body["stream_options"] = {"include_usage": True}
        if params.max_tokens is not None:
            body[self.max_tokens_field] = params.max_tokens
        for name in ("temperature", "top_p", "seed"):
            value = getattr(params, name)
            if value is not None:
                body[name] = value
        if params.stop:
            body["stop"] = list(params.stop)
        return body

    async def generate(self, request: WorkerRequest) -> AsyncGenerator[Chunk, None]:
        await self.before_request()
        messages, params = self.prepare(request)
        body = self.body(messages, params)
        if not self.stream:
            answer = await request_json(self.http, self.endpoint, "POST", self.chat_path, body)
            yield completion_chunk(self.endpoint, answer)
            return
        async with (
            open_event_stream(self.http, self.endpoint, self.chat_path, body, self.background_reads) as events,
            aclosing(read_chat_stream(self.endpoint, events)) as chunks,
        ):
            async for chunk in chunks:
                yield chunk

    async def before_request(self) -> None:
        """Checks before any traffic; subclasses may also learn something from the server here."""
        if self.api_key.status == "missing":
            raise WorkerError(self.endpoint.backend, f"no API key: {key_hint(self.api_key)}")

    async def health(self) -> None:
        await self.before_request()
        await request_json(self.http, self.endpoint, "GET", self.models_path)


async def read_chat_stream(endpoint: Endpoint, events: EventStream) -> AsyncGenerator[Chunk, None]:
    """Chat-completion SSE events -> chunks; the last chunk carries usage and finish reason."""
    usage: Usage | None = None
    finish: str | None = None
    done = False
    async for batch in events:
        for event in batch:
            if event.data == DONE:
                done = True
                break
            data = decode_event(endpoint, event)
            if "error" in data:
                raise taxonomy.event_error(endpoint.backend, data, endpoint.secrets)
            if data.get("usage"):
                usage = _usage(endpoint, data["usage"])
            for choice in _choices(endpoint, data):
                delta = choice.get("delta") or {}
                text = delta.get("content") if isinstance(delta, dict) else None
                if isinstance(text, str) and text:
                    yield Chunk(text)
                if choice.get("finish_reason"):
                    finish = finish_reason(endpoint.backend, choice["finish_reason"], event.data)
        if done:
            await events.finish()
            break
    if not done and finish is None:
        raise ended_early(endpoint, "its finish_reason and [DONE]")
    yield Chunk("", usage, finish)


class OpenAICompatibleServer(OpenAIWorker):
    """A self-hosted server speaking OpenAI's API (llama.cpp, vLLM): its URL is the server
    root, paths carry the /v1, `GET /health` answers, and `max_tokens` is the field name."""

    default_model: ClassVar[str | None] = None
    chat_path: ClassVar[str] = "/v1/chat/completions"
    models_path: ClassVar[str] = "/v1/models"
    health_path: ClassVar[str] = "/health"
    max_tokens_field: ClassVar[str] = "max_tokens"


def server_root(url: str) -> str:
    """Accept LLAMA_CPP_URL / VLLM_URL with or without the /v1 suffix."""
    url = url.rstrip("/")
    return url.removesuffix("/v1")


def completion_chunk(endpoint: Endpoint, answer: Any) -> Chunk:
    """A non-streaming chat completion as one chunk."""
    if not isinstance(answer, dict):
        raise taxonomy.malformed(endpoint.backend, "the completion is not a JSON object", str(answer))
    if "error" in answer:
        raise taxonomy.event_error(endpoint.backend, answer, endpoint.secrets)
    choices = _choices(endpoint, answer)
    if not choices or not isinstance(choices[0].get("message"), dict):
        raise taxonomy.malformed(endpoint.backend, "no choices[0].message in the completion", str(answer))
    text = _content_text(endpoint, choices[0]["message"].get("content"), answer)
    usage = _usage(endpoint, answer["usage"]) if answer.get("usage") else None
    finish = finish_reason(endpoint.backend, choices[0].get("finish_reason"), answer)
    return Chunk(text, usage, finish)


def _content_text(endpoint: Endpoint, content: Any, answer: Any) -> str:
    """A message's text: the string, or the text parts of a list of content parts (others, such
    as a reasoning part, are not the answer). Anything else is malformed, not text to show."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(isinstance(part, dict) for part in content):
        return "".join(
            part["text"] for part in content if part.get("type") == "text" and isinstance(part.get("text"), str)
        )
    raise taxonomy.malformed(endpoint.backend, "the message content is neither text nor a list of parts", str(answer))


def _choices(endpoint: Endpoint, data: dict[str, Any]) -> list[dict[str, Any]]:
    """The choice at index 0 (we never ask for n > 1), validated."""
    choices = data.get("choices", [])
    if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
        raise taxonomy.malformed(endpoint.backend, "'choices' is not a list of objects", str(choices))
    return [c for c in choices if c.get("index", 0) == 0]


def _usage(endpoint: Endpoint, raw: Any) -> Usage:
    if not isinstance(raw, dict):
        raise taxonomy.malformed(endpoint.backend, "'usage' is not an object", str(raw))
    return Usage(
        input_tokens=token_count(endpoint.backend, raw.get("prompt_tokens", 0), "usage.prompt_tokens", raw),
        output_tokens=token_count(endpoint.backend, raw.get("completion_tokens", 0), "usage.completion_tokens", raw),
    )
