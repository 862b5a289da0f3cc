"""The whole product in one object: config -> worker -> pipeline -> MCP server.

    async with Orchestrator(Config()) as orchestrator:
        result = await orchestrator.infer(Submission(prompt="hello"))

`Orchestrator` owns the pooled HTTP client every HTTP worker shares, the pipeline, and
the MCP server built on it (`orchestrator.server`, served by cli.py over stdio or HTTP).
It is also where the running configuration changes: `reconfigure` (what SIGHUP runs)
applies a new config all or nothing.
"""

from __future__ import annotations

import json
import logging
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx2
from mcp.types import CallToolResult

from mcp_orchestrator.config import Config, changed_keys, leaf_values, with_values
from mcp_orchestrator.errors import ConfigError, Problem, ReloadError, WorkerError, WorkerSpecError
from mcp_orchestrator.jobs import Jobs
from mcp_orchestrator.jobs.mirror import MirroredJobs
from mcp_orchestrator.logs import set_log_level
from mcp_orchestrator.models import GenerationParams, InferResult, PipelineStatus, Submission
from mcp_orchestrator.pipeline import ContextSource, Pipeline, Request
from mcp_orchestrator.pipeline.context import load_context_source
from mcp_orchestrator.pipeline.pipeline import matches
from mcp_orchestrator.pipeline.request import ChunkSink
from mcp_orchestrator.resilience.retry import Clock
from mcp_orchestrator.security import Origin, OriginRule
from mcp_orchestrator.workers.base import Worker
from mcp_orchestrator.workers.keys import host_of
from mcp_orchestrator.workers.options import OPTION_NAMES, PARAMETER_OPTIONS
from mcp_orchestrator.workers.registry import BuildContext, build_worker, unused_parameters
from mcp_orchestrator.workers.transport import BackgroundReads, new_client

log = logging.getLogger(__name__)

WORKER_KEYS = ("stages.inference.worker", *(f"stages.inference.{name}" for name in OPTION_NAMES))
"""[stages.inference] keys that describe the worker: changing one builds and swaps in a new worker."""
RESTART_KEYS = (
    "pipeline.name",  # the MCP server's identity and tool schemas are built at start-up
    "pipeline.version",
    "pipeline.description",
    "pipeline.max_prompt_chars",
    "pipeline.max_deadline_ms",
    "stages.inference.http.*",  # the shared HTTP client is built at start-up
    "server.*",
    "observability.log_format",
    "observability.metrics_port",
    "distributed.*",
    "tasks.*",  # the job registry and its bounds are built at start-up
    "batch.*",  # batch_infer's input schema (max_items) is built at start-up
)
LIVE_KEYS = (*WORKER_KEYS, "observability.log_level", "security.*")
"""Read per call (security) or applied by `reconfigure` (the worker, the log level)."""
CLOSE_TIMEOUT_S = 10.0


def generation_defaults(config: Config) -> GenerationParams:
    """The config's parameter defaults: under every worker's own settings and a call's."""
    section = config.stages.inference
    return GenerationParams(
        max_tokens=section.max_tokens,
        temperature=section.temperature,
        top_p=section.top_p,
        seed=section.seed,
        stop=tuple(section.stop or ()),
    )


def build_context(
    config: Config,
    http: httpx2.AsyncClient | None = None,
    *,
    trusted: bool = True,
    background_reads: BackgroundReads | None = None,
) -> BuildContext:
    """How workers are built: the shared client, the config's parameter defaults, and (for
    tool calls, `trusted=False`) which hosts a base_url may name and the key may reach."""
    section = config.stages.inference
    return BuildContext(
        http=http,
        http_settings=section.http,
        background_reads=background_reads,
        base=generation_defaults(config),
        trusted=trusted,
        key_hosts=frozenset(configured_hosts(config)),
        origins=None if trusted else config.security.rules() + configured_origins(config),
    )


def configured_urls(config: Config) -> list[str]:
    """Every base URL the operator wrote in [stages.inference] (replicas and members included)."""
    urls: list[str] = []

    def visit(options: dict[str, Any]) -> None:
        url = options.get("base_url")
        if isinstance(url, str):
            urls.append(url)
        for key in ("replicas", "members"):
            for member in options.get(key) or ():
                if isinstance(member, dict):
                    visit(member)

    visit(config.stages.inference.model_dump(include={"base_url", "replicas", "members"}))
    return urls


def configured_hosts(config: Config) -> set[str]:
    """Hosts the operator named: they may receive the API key even when a tool call later points
    a worker there."""
    return {host_of(url) for url in configured_urls(config)}


def configured_origins(config: Config) -> tuple[OriginRule, ...]:
    """Origins the operator named: a tool call's worker may reach them."""
    rules = []
    for url in configured_urls(config):
        try:
            rules.append(OriginRule.parse(str(Origin.of(url))))
        except ValueError:
            continue  # not an http(s) URL: the worker it configures refuses it
    return tuple(rules)


def unused_parameter_warnings(config: Config) -> list[str]:
    """One line for each parameter default set in [stages.inference] that no backend of the
    configured worker uses: it is kept (a worker configure_worker swaps in gets it), but a
    reader of the file would expect it to act now."""
    section = config.stages.inference
    options = {"replicas": section.replicas, "members": section.members}
    fields = type(section).model_fields
    # Set = not its default (the file and the flags are merged into one model, every field set).
    given = {name for name in PARAMETER_OPTIONS if getattr(section, name) != fields[name].default}
    unused = unused_parameters(section.worker, options, given)
    return [
        f"stages.inference.{name} is set, but no backend of this worker uses it (worker kind "
        f"{' and '.join(repr(kind) for kind in sorted(kinds))}); it applies only to a worker "
        "configure_worker swaps in"
        for name, kinds in unused.items()
    ]


def worker_from_config(config: Config, context: BuildContext | None = None) -> Worker:
    """The worker [stages.inference] describes; WorkerSpecError names the file's keys
    (`stages.inference.worker`, `stages.inference.replicas.0.base_url`, ...)."""
    section = config.stages.inference
    options = {name: getattr(section, name) for name in OPTION_NAMES if name not in PARAMETER_OPTIONS}
    try:
        return build_worker(section.worker, options, context or build_context(config))
    except WorkerSpecError as exc:
        raise WorkerSpecError(
            [problem.under("stages.inference.", {"kind": "worker"}) for problem in exc.problems]
        ) from None


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


class Orchestrator:
    """Owns the pipeline and the MCP server built on it. Use as an async context manager:
    the pipeline runs while the block is open."""

    def __init__(
        self,
        config: Config | None = None,
        worker: Worker | None = None,
        *,
        context_source: ContextSource | None = None,
        clock: Clock | None = None,
    ) -> None:
        """`worker` replaces the one the config describes; `context_source` is the RAG
        stage's source unless `[stages.rag] source` names one. ConfigError when the config's
        worker or source cannot be built."""
        from mcp_orchestrator.server import build_server  # the MCP surface sits on top of this module
        from mcp_orchestrator.server.oauth import resource_server

        self.config = config = config or Config()
        self.http = new_client(config.stages.inference.http)
        """The one pooled HTTP client every HTTP worker of this orchestrator shares."""
        self.background_reads = BackgroundReads()
        """Finishes reading the shared client's streamed responses after their answers."""
        self._given_source = context_source
        worker = worker or worker_from_config(config, self.worker_context(trusted=True))
        self.pipeline = Pipeline(config, worker, context_source=self._context_source(config), clock=clock)
        sharing = self.pipeline.sharing
        self.jobs = (  # shared: findable from every process on the same Redis
            Jobs(config.tasks)
            if sharing is None
            else MirroredJobs(config.tasks, sharing.shared.jobs, CallToolResult.model_validate)
        )
        """Tasks and background requests: calls that outlive their tool call (jobs/)."""
        self.pipeline.metrics.add_live_gauges(self.jobs.live_metrics)
        self._reload_lock = anyio.Lock()
        self.oauth = resource_server(config.server)
        """OAuth over HTTP ([server] oauth_issuer), or None: its token verifier (and key cache) and tool scopes."""
        surface = build_server(self)
        self.server = surface.server
        """The MCP server (serve it with cli.py, or connect `mcp.Client(orchestrator.server)` in process)."""
        self._offer_configure_worker = surface.offer_configure_worker

    @property
    def configure_allowed(self) -> bool:
        """Whether configure_worker is offered: [security] allow_configure, by default on over
        stdio (the operator's own client) and off over HTTP (shared by many)."""
        return self.config.security.configure_allowed(self.config.server.transport)

    def worker_context(self, *, trusted: bool, config: Config | None = None) -> BuildContext:
        """How this orchestrator's workers are built: its shared client and background reads,
        with `config`'s (default: the running config's) parameters and host rules."""
        return build_context(config or self.config, self.http, trusted=trusted, background_reads=self.background_reads)

    async def __aenter__(self) -> Orchestrator:
        # Closed in reverse: the pipeline, then the background reads, then the shared client.
        async with AsyncExitStack() as stack:
            stack.push_async_callback(self.http.aclose)
            await stack.enter_async_context(self.background_reads)
            await stack.enter_async_context(self.pipeline)
            await stack.enter_async_context(self.jobs)  # stopped first: its requests end as cancelled
            self._running = stack.pop_all()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self._running.__aexit__(*exc_info)

    # ------------------------------------------------------------------ requests

    async def infer(self, submission: Submission, on_chunk: ChunkSink | None = None) -> InferResult:
        """Run one request through the pipeline: its result, or a RequestError saying why not."""
        return await self.pipeline.infer(submission, on_chunk)

    def submit(
        self, submission: Submission, on_chunk: ChunkSink | None = None, *, job_id: str | None = None
    ) -> Request:
        """Start a request without waiting for it; `await orchestrator.wait(request)` later.
        `job_id`: the task or background request it belongs to (named in its dead letter)."""
        return self.pipeline.submit(submission, on_chunk, job_id=job_id)

    async def wait(self, request: Request) -> InferResult:
        return await self.pipeline.wait(request)

    def status(self) -> PipelineStatus:
        status = self.pipeline.status()
        status.jobs = self.jobs.status()
        return status

    # ------------------------------------------------------------------ changing it while it runs

    async def configure_worker(self, kind: str, options: dict[str, Any]) -> tuple[Worker, Worker]:
        """Build a worker from a tool call's options (host rules apply) and swap it in: returns
        (new, previous). WorkerSpecError for bad options; WorkerError or TimeoutError when its
        health check fails (nothing changed then)."""
        worker = build_worker(kind, options, self.worker_context(trusted=False))
        try:
            previous = await self.pipeline.swap_worker(worker)
        except BaseException:
            with anyio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
                await worker.aclose()
            raise
        log.info("worker swapped: %s -> %s", previous.describe(), worker.describe())
        return worker, previous

    @staticmethod
    def needs_restart(key: str) -> bool | None:
        """Whether a changed setting keeps its running value until a restart: decided by the
        part that holds it (the pipeline's own, or this object's); None if nobody holds it."""
        held = Pipeline.needs_restart(key)
        if held is not None:
            return held
        if matches(key, RESTART_KEYS):
            return True
        if matches(key, LIVE_KEYS):
            return False
        return None

    async def reconfigure(self, new: Config, source: str = "config") -> ReloadReport:
        """Apply `new` all or nothing: keys that need a restart keep their running values (and
        are named); a new worker is built and health-checked before anything switches. On
        ReloadError nothing changed."""
        async with self._reload_lock:  # one at a time; requests keep flowing meanwhile
            old = self.config
            report = ReloadReport(source)
            for key in changed_keys(old, new):
                restart = self.needs_restart(key)
                if restart is None:
                    log.error("config key %s has no part that applies it; keeping its running value", key)
                (report.restart_needed if restart is not False else report.applied).append(key)
            running = leaf_values(old)
            try:
                config = with_values(new, {key: running.get(key) for key in report.restart_needed}, source)
                context_source = self.pipeline.context_source
                if config.stages.rag.source != old.stages.rag.source:
                    context_source = self._context_source(config)
            except ConfigError as exc:  # a running value the new file's other values now contradict
                kept = ", ".join(f"{key} = {json.dumps(running.get(key))}" for key in report.restart_needed)
                note = [Problem("", f"kept until a restart: {kept}")] if kept else []
                raise ReloadError(source, [*exc.problems, *note]) from None
            if any(matches(key, WORKER_KEYS) for key in report.applied):
                await self._swap_from_config(config, source)
                report.worker_swapped = True
            # From here on nothing awaits and nothing fails: the rest switches in one step.
            self.pipeline.reconfigure(config, context_source)
            self.config = config
            self._offer_configure_worker(self.configure_allowed)
            if config.observability.log_level != old.observability.log_level:
                set_log_level(config.observability.log_level)
            return report

    async def _swap_from_config(self, config: Config, source: str) -> None:
        try:
            worker = worker_from_config(config, self.worker_context(trusted=True, config=config))
        except WorkerSpecError as exc:
            raise ReloadError(source, exc.problems) from None
        try:
            await self.pipeline.swap_worker(worker)
        except (WorkerError, TimeoutError) as exc:
            with anyio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
                await worker.aclose()
            problem = Problem("stages.inference", f"the new worker failed its health check: {exc}")
            raise ReloadError(source, [problem]) from None

    def _context_source(self, config: Config) -> ContextSource | None:
        reference = config.stages.rag.source
        return self._given_source if reference is None else load_context_source(reference)
