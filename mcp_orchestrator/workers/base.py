"""The worker protocol: the one seam between the pipeline and a backend."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from mcp_orchestrator.errors import WorkerError
from mcp_orchestrator.models import GenerationParams, Message, Usage

__all__ = ["Availability", "Chunk", "Worker", "WorkerError", "WorkerRequest", "is_available", "label", "layer_params"]


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


@runtime_checkable
class Availability(Protocol):
    """Optional: a worker (or a wrapper around one, such as a circuit breaker) that can say
    it should not be sent traffic right now. Pools and fallback chains skip members whose
    `available` is false."""

    @property
    def available(self) -> bool: ...


def is_available(worker: Worker) -> bool:
    return not isinstance(worker, Availability) or worker.available


def layer_params(call: GenerationParams, *fallbacks: GenerationParams) -> GenerationParams:
    """Each parameter from the first layer that sets it: the call, then the worker's own
    settings (configure_worker or the config's replica), then the config's defaults."""
    values: dict[str, Any] = {}
    for name in GenerationParams.model_fields:
        for layer in (call, *fallbacks):
            value = getattr(layer, name)
            if value is not None and value != ():
                values[name] = value
                break
    return GenerationParams(**values)


def label(worker: Worker) -> str:
    """A short, secret-free name for a worker in routes and error messages."""
    info = worker.describe()
    where = info.get("base_url")
    return f"{worker.kind} {where}" if where else f"{worker.kind} ({worker.model})"
