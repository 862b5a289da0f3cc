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


@dataclass(frozen=True, slots=True)
class Route:
    """Provenance of an answer that went through composite workers (pool, fallback).

    `hops` lists the composite choices outermost first (e.g. "pool replica 1");
    `served_by` names the backend that produced the text; `skipped` lists the
    fallback members that failed (retryably) before it, each with its error.
    """

    served_by: str
    hops: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()

    def behind(self, hop: str, skipped: tuple[str, ...] = ()) -> Route:
        """This route as seen from one composite further out."""
        return Route(self.served_by, (hop, *self.hops), (*skipped, *self.skipped))


@dataclass(slots=True)
class Chunk:
    """A piece of generated text. The last chunk of a stream may carry usage and finish reason.

    Composite workers set `route` on every chunk they pass on, so the last chunk
    always tells which backend answered.
    """

    text: str
    usage: Usage | None = None
    finish_reason: str | None = None
    route: Route | None = None


@dataclass(slots=True)
class WorkerError(Exception):
    """A backend failure, classified for the resilience layer.

    `retryable` is true for transient trouble (connection errors, 408, 409, 429, 5xx,
    529); `retry_after_s` carries the backend's own Retry-After when it sent one.
    `extra["after_output"]` is true when text had already been yielded before the
    failure (a retry would repeat it). The message must never contain a credential.
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
        after = f" (retry after {self.retry_after_s:g} s)" if self.retry_after_s is not None else ""
        return f"{self.backend}{status}, {kind}: {self.message}{after}"


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
