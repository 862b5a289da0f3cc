"""Every error this package raises on purpose, under one root: `OrchestratorError`.

    OrchestratorError
    ├── RequestError          a request ended without an answer (shown to its caller as it is)
    │   ├── PipelineNotRunning, RequestShed, DeadlineExceeded, StageTimeout, StageFailed
    │   ├── ShuttingDown, CancelledByShutdown   (SIGTERM: see shutdown.py)
    │   └── WorkerFailed, CircuitOpen, RateLimited, ReplayRefused
    ├── WorkerError           a backend failed (classified retryable or permanent); the pipeline
    │                         turns the last one into WorkerFailed or CircuitOpen
    ├── JobError              a task or background request id that is unknown, expired or over a bound
    │   ├── JobNotFound, JobExpired, TooManyJobs
    ├── ConfigError           a config file, flag, worker spec or reload was refused: one Problem per
    │   ├── WorkerSpecError   bad key, named as the user wrote it
    │   └── ReloadError
    └── BindError             an HTTP bind address the server refuses to serve on

Messages are shown to users as they are, so each says what happened, where, and what to
do about it, and never contains a credential. The MCP surface turns any of them into a
tool error in one place (server/tools.py). A few internal signals (a full queue, a
token that did not come in time) never leave their module and are not part of this tree.
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from mcp_orchestrator.security import redact_text


class OrchestratorError(Exception):
    """Root of every error mcp-orchestrator raises on purpose."""


# ---------------------------------------------------------------------------- request outcomes


class RequestError(OrchestratorError):
    """A request ended without an answer. `dead_letter_id` names its dead letter, when it has one."""

    dead_letter_id: str | None = None


class PipelineNotRunning(RequestError):
    def __init__(self) -> None:
        super().__init__("the pipeline is not running (server starting up or shutting down); try again")


class ShuttingDown(RequestError):
    """A request that arrived after the server began to shut down: it takes no new work."""

    def __init__(self) -> None:
        super().__init__("server is shutting down: it takes no new requests; try again once it is back")


class CancelledByShutdown(RequestError):
    """A request still running when the shutdown grace ran out (counted as cancelled)."""

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        super().__init__(
            f"the server shut down before this request finished (still running when the {grace_s:g} s "
            "shutdown grace, [server] shutdown_grace_s, ran out); try again once the server is back"
        )


class RequestShed(RequestError):
    """A full stage queue refused the request; it is in the dead-letter queue."""

    def __init__(self, stage: str, capacity: int, dead_letter_id: str) -> None:
        self.stage = stage
        self.dead_letter_id = dead_letter_id
        super().__init__(
            f"request shed: the {stage} stage queue is full ({capacity} waiting); "
            f"saved as dead letter {dead_letter_id} (replay it with replay_dead_letter)"
        )


class DeadlineExceeded(RequestError):
    def __init__(self, deadline_ms: float, stage: str) -> None:
        self.stage = stage
        super().__init__(f"deadline of {deadline_ms:g} ms exceeded while in the {stage} stage")


class StageTimeout(RequestError):
    def __init__(self, stage: str, timeout_ms: float) -> None:
        self.stage = stage
        super().__init__(f"the {stage} stage timed out after {timeout_ms:g} ms")


class StageFailed(RequestError):
    """A bug or a broken plug-in (a context source) in a stage: that request fails, not the pipeline."""

    def __init__(self, stage: str, cause: BaseException) -> None:
        self.stage = stage
        super().__init__(f"internal error in the {stage} stage: {cause}")


class WorkerFailed(RequestError):
    """The backend did not produce an answer; the message comes from the worker."""


class CircuitOpen(RequestError):
    """A circuit breaker refused the call without touching the backend."""

    def __init__(self, backend: str, retry_after_s: float, *, probing: bool = False) -> None:
        self.backend = backend
        self.retry_after_s = retry_after_s
        self.probing = probing
        wait = max(1, math.ceil(retry_after_s))
        state = "circuit half-open and its probes are still running" if probing else "circuit open"
        super().__init__(f"backend {backend} unavailable, {state}, retry after {wait} s")


class RateLimited(RequestError):
    """Admission control found no token for the request before its deadline."""

    def __init__(self, scope: str, rate: float, burst: int, retry_after_ms: int) -> None:
        self.scope = scope
        self.retry_after_ms = retry_after_ms
        super().__init__(
            f"rate limited: the {scope} limit ({rate:g} requests/s, burst {burst}) has no token for this "
            f"request before its deadline; retry_after_ms={retry_after_ms}"
        )


class ReplayRefused(RequestError):
    """A dead letter's replay did not start: it was replayed already (by this process or
    another one sharing it through Redis), or Redis could not say whether it was."""

    def __init__(self, letter_id: str, why: str) -> None:
        self.letter_id = letter_id
        super().__init__(f"dead letter {letter_id} not replayed: {why}")


# ---------------------------------------------------------------------------- tasks and background requests


class JobError(OrchestratorError):
    """A task or background request (jobs/) could not be found or started."""


class JobNotFound(JobError):
    def __init__(self, job_id: str) -> None:
        super().__init__(
            f"no task or background request {job_id!r} for this caller: ids are per caller "
            "(connection, session or token) and only valid on the server process that created them"
        )


class JobExpired(JobError):
    def __init__(self, job_id: str, why: str) -> None:
        super().__init__(f"task or background request {job_id!r} has expired: {why}")


class TooManyJobs(JobError):
    def __init__(self, key: str, limit: int, whose: str) -> None:
        super().__init__(
            f"{limit} tasks or background requests are already running {whose} ({key}); "
            "wait for one to finish or cancel one"
        )


# ---------------------------------------------------------------------------- backends


@dataclass(eq=False)
class WorkerError(OrchestratorError):
    """A backend failure, classified for the resilience layer.

    `retryable` is true for transient trouble (connection errors, 408, 409, 429, 5xx,
    529); `retry_after_s` carries the backend's own Retry-After when it sent one;
    `circuit_open` marks a call a breaker refused without touching the backend. The
    message must never contain a credential.
    """

    backend: str
    message: str
    retryable: bool = False
    status: int | None = None
    retry_after_s: float | None = None
    circuit_open: bool = False

    def __post_init__(self) -> None:
        super().__init__(self.backend, self.message)

    def __str__(self) -> str:
        status = f" (HTTP {self.status})" if self.status is not None else ""
        kind = "retryable" if self.retryable else "permanent"
        after = f" (retry after {self.retry_after_s:g} s)" if self.retry_after_s is not None else ""
        return f"{self.backend}{status}, {kind}: {self.message}{after}"


# ---------------------------------------------------------------------------- configuration


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a setting: the key as the user wrote it, and what is wrong."""

    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message}" if self.key else self.message

    def under(self, prefix: str, rename: dict[str, str] | None = None) -> Problem:
        """The same problem one level further out: `prefix` before the key, its first part renamed."""
        head, dot, rest = self.key.partition(".")
        head = (rename or {}).get(head, head)
        return Problem(f"{prefix}{head}{dot}{rest}" if head else prefix.rstrip("."), self.message)


@dataclass(eq=False)
class ConfigError(OrchestratorError):
    """Settings that were refused; `problems` has one entry per bad key, `source` says where
    they came from (a file name, "command line", "configure_worker")."""

    source: str
    problems: Sequence[Problem] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__(self.source, list(self.problems))

    def __str__(self) -> str:
        return "\n".join(f"{self.source}: {problem}" for problem in self.problems)

    def lines(self) -> list[str]:
        return [str(problem) for problem in self.problems]


class WorkerSpecError(ConfigError):
    """Invalid worker options; each problem names the option (`kind`, `base_url`, `replicas.1.kind`)."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        super().__init__("worker", list(problems))

    def __str__(self) -> str:
        return "; ".join(str(problem) for problem in self.problems)


class ReloadError(ConfigError):
    """A config reload was refused; the running config is unchanged."""

    def __str__(self) -> str:
        listed = "; ".join(str(problem) for problem in self.problems)
        return f"config reload from {self.source} failed, keeping the running config: {listed}"


class BindError(OrchestratorError):
    """The server refuses to serve HTTP on this address as configured."""


PAIR_ERROR = "pair_out_of_order"
"""pydantic error type of two keys out of order (config.py): its message names both values."""


def validation_problems(
    error: ValidationError, noun: str = "key", allowed: Callable[[tuple[Any, ...]], list[str] | None] | None = None
) -> list[Problem]:
    """pydantic's structured errors as problems, one per bad value: the dotted key, what is
    wrong, the value given (as JSON) and, for an unknown `noun`, the closest allowed name."""
    problems = []
    for item in error.errors():
        loc = tuple(item["loc"])
        key = ".".join(str(part) for part in loc)
        if item["type"] == "extra_forbidden":
            names = allowed(loc[:-1]) if allowed is not None else None
            hint = difflib.get_close_matches(str(loc[-1]), names or [], n=1)
            suggestion = f"; did you mean '{hint[0]}'?" if hint else ""
            listed = "" if names is None else f" (allowed: {', '.join(names) or 'none'})"
            problems.append(Problem(_printable(key), f"unknown {noun}{suggestion}{listed}"))
            continue
        message = item["msg"].removeprefix("Value error, ")
        given = item.get("input")
        if item["type"] not in ("missing", PAIR_ERROR) and not isinstance(given, dict):
            message += f" (got {shown(given)})"
        problems.append(Problem(key, message))
    return problems


def shown(value: Any, limit: int = 80) -> str:
    """A value as JSON (as the user wrote it: `false`, `"yes"`), cut to `limit` characters."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    # A URL's password or API key never reaches a message. Only the part that can be shown is
    # searched (with room for a URL that starts inside it): the patterns cost time per character.
    text = redact_text(text[: limit * 4])
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _printable(key: str) -> str:
    """A key that is blank or has control characters, quoted so the message shows what it was."""
    return key if key.strip() and key.isprintable() else json.dumps(key)
