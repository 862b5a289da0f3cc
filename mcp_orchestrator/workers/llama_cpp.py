"""llama.cpp's `llama-server`, through its OpenAI-compatible `/v1/chat/completions`.

Why that endpoint rather than the native `/completion`: the server then applies the
model's own chat template to our messages (the native API takes one raw prompt
string, so we would have to re-implement every model family's template and would
get it silently wrong), and answers with OpenAI finish reasons and usage. The
llama.cpp extras we want still work there: `cache_prompt` keeps the prompt's KV
cache in the slot, which is what session affinity in a pool pays off on.
`GET /health` tells "loading the model" (503) apart from "ready" (200).
"""

from __future__ import annotations

from typing import Any, ClassVar

from mcp_orchestrator.models import GenerationParams, Message
from mcp_orchestrator.workers.openai import OpenAICompatibleServer
from mcp_orchestrator.workers.transport import check_ok

DEFAULT_URL = "http://localhost:8080"


class LlamaCppWorker(OpenAICompatibleServer):
    """llama-server serves the model it was started with; a name is needed only in router mode."""

    kind: ClassVar[str] = "llama_cpp"

    def body(self, messages: tuple[Message, ...], params: GenerationParams) -> dict[str, Any]:
        body = super().body(messages, params)
        body["cache_prompt"] = True
        return body

    async def health(self) -> None:
        await self.before_request()
        await check_ok(self.http, self.endpoint, self.health_path)
