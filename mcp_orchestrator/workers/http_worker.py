"""What every HTTP worker shares: where the backend is, its key, its default parameters,
the client it borrows and a secret-free description."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Mapping
from typing import Any, ClassVar

import httpx2

from mcp_orchestrator.models import GenerationParams, Message
from mcp_orchestrator.workers.base import Chunk, WorkerRequest, layer_params
from mcp_orchestrator.workers.keys import ApiKey, key_hint, without_credentials
from mcp_orchestrator.workers.options import HttpSettings
from mcp_orchestrator.workers.transport import BackgroundReads, ClientHandle, Endpoint


class HttpWorker(ABC):
    """Base of the HTTP workers. Subclasses set `kind` and implement generate/health."""

    kind: ClassVar[str] = "http"
    default_model: ClassVar[str | None] = None

    def __init__(
        self,
        base_url: str,
        *,
        model: str | None = None,
        api_key: ApiKey | None = None,
        defaults: GenerationParams | None = None,
        system: str | None = None,
        stream: bool = True,
        client: httpx2.AsyncClient | None = None,
        http_settings: HttpSettings | None = None,
        background_reads: BackgroundReads | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._model = model or self.default_model
        self.api_key = api_key or ApiKey(None, None, "not needed")
        self._defaults = defaults or GenerationParams()
        self.system = system
        self.stream = stream
        self._client = ClientHandle(client, http_settings)
        self.background_reads = background_reads
        """Reads each streamed response to its end after the answer (None: inline)."""
        safe_url = without_credentials(self.base_url)
        secrets = (self.api_key.value,) if self.api_key.value else ()
        self.endpoint = Endpoint(
            backend=f"{self.kind} at {safe_url}",
            base_url=self.base_url,
            headers={**self.static_headers(), **(self.auth_headers(self.api_key.value) if self.api_key.value else {})},
            secrets=secrets,
            key_hint=key_hint(self.api_key),
        )

    def auth_headers(self, key: str) -> Mapping[str, str]:
        return {"authorization": f"Bearer {key}"}

    def static_headers(self) -> Mapping[str, str]:
        """Headers sent on every request besides the credentials."""
        return {}

    @property
    def model(self) -> str:
        return self._model or "default"

    @property
    def defaults(self) -> GenerationParams:
        """This worker's own parameters; a call's parameters override them."""
        return self._defaults

    @property
    def http(self) -> httpx2.AsyncClient:
        return self._client.get()

    def prepare(self, request: WorkerRequest) -> tuple[tuple[Message, ...], GenerationParams]:
        """The messages and parameters to send: the call's, over this worker's own."""
        params = layer_params(request.params, self._defaults)
        messages = request.messages
        if self.system and not any(m.role == "system" for m in messages):
            messages = (Message(role="system", content=self.system), *messages)
        return messages, params

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "model": self.model,
            "base_url": without_credentials(self.base_url),
            "api_key": self.api_key.status,
            "api_key_env": self.api_key.env,
            "stream": self.stream,
            "defaults": self._defaults.model_dump(exclude_defaults=True),
            "system_prompt": self.system is not None,
        }

    @abstractmethod
    def generate(self, request: WorkerRequest) -> AsyncGenerator[Chunk, None]: ...

    @abstractmethod
    async def health(self) -> None: ...

    async def aclose(self) -> None:
        await self._client.aclose()
