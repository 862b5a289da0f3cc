"""Reloading the config file while the server runs (SIGHUP, or `reload_config` in code).

A reload is all or nothing. The new file is read and validated, a new worker (if its
settings changed) is built and health-checked, and only then is anything switched:
the worker swap (requests in flight finish on the old worker), the config object the
pipeline reads its live settings from, the breakers' thresholds, the rate limiter and the
log level. Any problem before that point leaves the running
config untouched and is reported with its reason.

Settings whose objects are built once at start-up (queues, the inference task pool,
the tool schemas, the transport) are not changed by a reload: they keep their running
value, and the report names them as needing a restart.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio

from mcp_orchestrator.config import Config, ConfigError, config_from_mapping
from mcp_orchestrator.logs import NOISY_LOGGERS
from mcp_orchestrator.workers.base import WorkerError

if TYPE_CHECKING:
    from mcp_orchestrator.app import Orchestrator

log = logging.getLogger(__name__)

RESTART_KEYS = (
    "pipeline.name",
    "pipeline.version",
    "pipeline.description",
    "pipeline.max_prompt_chars",  # part of the tools' input schemas, built at start-up
    "pipeline.max_deadline_ms",  # idem
    "pipeline.dead_letter_capacity",
    "stages.*.channel_capacity",
    "stages.inference.concurrency",
    "stages.inference.http.",  # the shared HTTP client is built at start-up
    "server.",
    "observability.metrics_port",
    "observability.log_format",
    "deduplication.window_s",  # the result cache is sized at start-up
    "deduplication.max_entries",
    "distributed.",
)
"""Dotted keys (or prefixes ending in '.', '*' for any stage) that take effect only on restart."""

CLOSE_TIMEOUT_S = 10.0
"""Bound on closing a refused new worker."""

NOT_WORKER_KEYS = frozenset({"timeout_ms", "channel_capacity", "concurrency", "enabled"})
"""Keys of [stages.inference] that do not describe the worker (everything else rebuilds it)."""


class ReloadError(Exception):
    """The reload was refused; the running config is unchanged. `problems` says why."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"config reload from {source} failed, keeping the running config: " + "; ".join(problems))


@dataclass
class ReloadReport:
    source: str
    applied: list[str] = field(default_factory=list)
    """Dotted keys whose new values are now in effect."""
    restart_needed: list[str] = field(default_factory=list)
    """Changed keys that keep their running value until a restart."""
    worker_swapped: bool = False

    def summary(self) -> str:
        if not self.applied and not self.restart_needed:
            return f"config reloaded from {self.source}: no changes"
        parts = [f"config reloaded from {self.source}"]
        if self.applied:
            parts.append(f"applied: {', '.join(self.applied)}")
        if self.worker_swapped:
            parts.append("worker swapped (requests in flight finish on the old one)")
        if self.restart_needed:
            parts.append(f"need a restart, running values kept: {', '.join(self.restart_needed)}")
        return "; ".join(parts)


def flatten(data: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Dotted key -> leaf value; lists (e.g. replicas) are compared whole."""
    for key, value in data.items():
        if isinstance(value, Mapping):
            yield from flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def changed_keys(old: Config, new: Config) -> list[str]:
    before = dict(flatten(old.model_dump(mode="json")))
    after = dict(flatten(new.model_dump(mode="json")))
    return sorted(key for key in before.keys() | after.keys() if before.get(key) != after.get(key))


def needs_restart(key: str) -> bool:
    for pattern in RESTART_KEYS:
        if pattern.endswith("."):
            if key.startswith(pattern):
                return True
        elif "*" in pattern:
            head, tail = pattern.split("*", 1)
            if key.startswith(head) and key.endswith(tail) and key.count(".") == pattern.count("."):
                return True
        elif key == pattern:
            return True
    return False


def is_worker_key(key: str) -> bool:
    prefix = "stages.inference."
    return key.startswith(prefix) and key[len(prefix) :].split(".", 1)[0] not in NOT_WORKER_KEYS


def _set(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = data
    for part in parents:
        node = node[part]
    node[leaf] = value


def effective_config(old: Config, new: Config, keep: list[str]) -> Config:
    """`new`, except the `keep` keys hold their running (`old`) values."""
    if not keep:
        return new
    data = new.model_dump()
    running = dict(flatten(old.model_dump()))
    for key in keep:
        _set(data, key, running.get(key))
    return config_from_mapping(data, "reload")


async def reload_config(orchestrator: Orchestrator, load: Callable[[], Config], source: str) -> ReloadReport:
    """Load the config again and apply it; ReloadError (nothing changed) when it cannot be."""
    try:
        new = load()
    except ConfigError as exc:
        raise ReloadError(source, exc.problems) from None
    async with orchestrator.reload_lock:  # one reload at a time; requests keep flowing meanwhile
        return await _apply(orchestrator, new, source)


async def _apply(orchestrator: Orchestrator, new: Config, source: str) -> ReloadReport:
    from mcp_orchestrator.app import worker_from_config
    from mcp_orchestrator.workers.registry import WorkerSpecError

    old = orchestrator.config
    changed = changed_keys(old, new)
    report = ReloadReport(source)
    report.restart_needed = [key for key in changed if needs_restart(key)]
    report.applied = [key for key in changed if key not in report.restart_needed]
    try:
        config = effective_config(old, new, report.restart_needed)
    except ConfigError as exc:  # a running value that the new file's other values now contradict
        raise ReloadError(source, exc.problems) from None
    pipeline = orchestrator.pipeline
    if any(is_worker_key(key) for key in report.applied):
        try:
            worker = worker_from_config(config, orchestrator.worker_context(trusted=True, config=config))
        except WorkerSpecError as exc:
            raise ReloadError(source, [f"stages.inference: {exc}"]) from None
        try:
            await pipeline.swap_worker(worker)
        except (WorkerError, TimeoutError) as exc:
            with anyio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
                await worker.aclose()
            raise ReloadError(source, [f"stages.inference: the new worker failed its health check: {exc}"]) from None
        report.worker_swapped = True
    # From here on nothing awaits: the rest switches in one step.
    _switch(orchestrator, old, config)
    return report


def _switch(orchestrator: Orchestrator, old: Config, config: Config) -> None:
    from mcp_orchestrator.pipeline.admission import Admission

    pipeline = orchestrator.pipeline
    orchestrator.config = pipeline.config = config
    if config.resilience != old.resilience:
        pipeline.apply_resilience()
    if config.rate_limits != old.rate_limits or config.pipeline.priority_aging_ms != old.pipeline.priority_aging_ms:
        # Requests already waiting finish their wait on the old buckets; the new ones start
        # as full as the old ones were, so a reload is never a fresh burst.
        admission = Admission(
            config.rate_limits, aging_s=config.pipeline.priority_aging_ms / 1000, clock=pipeline.admission.clock
        )
        admission.carry_over(pipeline.admission)
        pipeline.admission = admission
    if config.observability.log_level != old.observability.log_level:
        set_log_level(config.observability.log_level)


def set_log_level(level: str) -> None:
    numeric = getattr(logging, level.upper())
    logging.getLogger().setLevel(numeric)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(max(numeric, logging.WARNING))
