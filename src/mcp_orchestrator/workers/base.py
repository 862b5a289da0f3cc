"""The worker protocol: the one seam between the pipeline and a backend."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from mcp_orchestrator.models import GenerationParams, Message, Usage


@dataclass(frozen=True, slots=True)
class WorkerRequest:
    """What a backend needs to answer: the assembled messages and the generation parameters."""

    messages: tuple[Message, ...]
    params: GenerationParams
    request_id: str = ""
    session_id: str | None = None


@dataclass(slots=True)
class Chunk:
    """A piece of generated text. The last chunk of a stream may carry usage and finish reason."""

    text: str
    usage: Usage | None = None
    finish_reason: str | None = None


@dataclass(slots=True)
class WorkerError(Exception):
    """A backend failure, classified for the resilience layer.

    `retryable` is true for transient trouble (connection errors, 408, 409, 429, 5xx,
    529); `retry_after_s` carries the backend's own Retry-After when it sent one.
    The message must never contain a credential.
    """

    backend: str
    message: str
    retryable: bool = False
    status: int | None = None
    retry_after_s: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        status = f" (HTTP {self.status})" if self.status is not None else ""
        kind = "retryable" if self.retryable else "permanent"
        return f"{self.backend}{status}, {kind}: {self.message}"


@runtime_checkable
class Worker(Protocol):
    """A backend. `generate` is an async generator of chunks; `describe` is safe to show users."""

    @property
    def kind(self) -> str: ...

    @property
    def model(self) -> str: ...

    def generate(self, request: WorkerRequest) -> AsyncGenerator[Chunk, None]: ...

    def describe(self) -> dict[str, Any]: ...

    async def health(self) -> None:
        """Raise WorkerError when the backend cannot serve requests."""
        ...

    async def aclose(self) -> None: ...
