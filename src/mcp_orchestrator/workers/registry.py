"""Worker kinds by name, each with a pydantic spec that validates its options.

`configure_worker`, `--worker` and `[stages.inference]` all build workers through
`build_worker`, so every entry point gets the same validation and the same errors.
New kinds register here (open for the HTTP workers, pools and fallback chains).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mcp_orchestrator.workers.base import Worker
from mcp_orchestrator.workers.echo import EchoWorker


class WorkerSpecError(ValueError):
    """Invalid worker options; the message names each bad option and what is allowed."""


class WorkerSpec(BaseModel):
    """Base of every kind's options: unknown options are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class EchoSpec(WorkerSpec):
    model: str = "echo"
    delay_ms: Annotated[int, Field(ge=0, le=600_000)] = 0
    chunk_delay_ms: Annotated[int, Field(ge=0, le=60_000)] = 0


@dataclass(frozen=True, slots=True)
class WorkerKind:
    name: str
    spec: type[WorkerSpec]
    build: Callable[[Any], Worker]
    summary: str


_KINDS: dict[str, WorkerKind] = {}


def register(kind: WorkerKind) -> None:
    _KINDS[kind.name] = kind


def kinds() -> list[str]:
    return sorted(_KINDS)


def parse_spec(kind: str, options: dict[str, Any]) -> tuple[WorkerKind, WorkerSpec]:
    """Validate `options` for `kind`; raise WorkerSpecError naming every problem."""
    entry = _KINDS.get(kind)
    if entry is None:
        raise WorkerSpecError(f"kind: unknown worker kind {kind!r}; allowed: {', '.join(kinds())}")
    given = {k: v for k, v in options.items() if v is not None}
    try:
        return entry, entry.spec.model_validate(given)
    except ValidationError as exc:
        problems = []
        for item in exc.errors():
            name = ".".join(str(p) for p in item["loc"])
            if item["type"] == "extra_forbidden":
                allowed = ", ".join(entry.spec.model_fields) or "none"
                problems.append(f"{name}: not an option of worker kind {kind!r} (its options: {allowed})")
            else:
                problems.append(f"{name}: {item['msg']} (got {item.get('input')!r})")
        raise WorkerSpecError("; ".join(problems)) from None


def build_worker(kind: str, options: dict[str, Any]) -> Worker:
    entry, spec = parse_spec(kind, options)
    return entry.build(spec)


def _build_echo(spec: EchoSpec) -> Worker:
    return EchoWorker(model=spec.model, delay_ms=spec.delay_ms, chunk_delay_ms=spec.chunk_delay_ms)


register(WorkerKind("echo", EchoSpec, _build_echo, "returns the prompt word by word; delay_ms simulates latency"))
