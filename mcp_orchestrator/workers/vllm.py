"""vLLM's OpenAI-compatible server (`/v1/chat/completions`).

vLLM refuses requests naming a model it does not serve, so when no model is
configured the worker asks `/v1/models` once and uses the first one listed.
"""

from __future__ import annotations

from typing import ClassVar

import anyio

from mcp_orchestrator.workers import taxonomy
from mcp_orchestrator.workers.openai import OpenAICompatibleServer
from mcp_orchestrator.workers.transport import check_ok, request_json

DEFAULT_URL = "http://localhost:8000"


class VllmWorker(OpenAICompatibleServer):
    kind: ClassVar[str] = "vllm"

    _discovery: anyio.Lock | None = None

    @property
    def model(self) -> str:
        return self._model or "auto"

    async def before_request(self) -> None:
        await super().before_request()
        if self._model is None:
            await self._discover_model()

    async def _discover_model(self) -> None:
        if self._discovery is None:
            self._discovery = anyio.Lock()
        async with self._discovery:
            if self._model is not None:  # another request found it while we waited
                return
            listing = await request_json(self.http, self.endpoint, "GET", self.models_path)
            data = listing.get("data") if isinstance(listing, dict) else None
            if not isinstance(data, list) or not data or not isinstance(data[0], dict) or "id" not in data[0]:
                raise taxonomy.malformed(self.endpoint.backend, "no model listed by /v1/models", str(listing))
            self._model = str(data[0]["id"])

    async def health(self) -> None:
        await check_ok(self.http, self.endpoint, self.health_path)
        await self.before_request()
