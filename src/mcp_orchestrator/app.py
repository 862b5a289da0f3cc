"""Wiring: config -> worker -> pipeline -> MCP server. One Orchestrator per process."""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import Any

import anyio
import httpx2

from mcp_orchestrator.config import Config, InferenceSection
from mcp_orchestrator.models import GenerationParams, InferResult, PipelineStatus, Submission
from mcp_orchestrator.pipeline import Pipeline
from mcp_orchestrator.pipeline.request import ChunkSink
from mcp_orchestrator.resilience.retry import Clock
from mcp_orchestrator.server import build_server
from mcp_orchestrator.workers.base import Worker
from mcp_orchestrator.workers.keys import host_of
from mcp_orchestrator.workers.registry import BuildContext, build_worker
from mcp_orchestrator.workers.transport import BackgroundReads, HttpSettings, new_client

WORKER_OPTION_KEYS = (
    "model",
    "base_url",
    "system",
    "stream",
    "api_key_env",
    "strategy",
    "virtual_nodes",
    "replicas",
    "members",
)
"""[stages.inference] keys that are options of the worker itself (validated by its kind)."""


def http_settings(config: Config) -> HttpSettings:
    return HttpSettings(**config.stages.inference.http.model_dump())


def build_context(
    config: Config,
    http: httpx2.AsyncClient | None = None,
    *,
    trusted: bool = True,
    background_reads: BackgroundReads | None = None,
) -> BuildContext:
    """How workers are built: the shared client, the config's parameter defaults, and
    (for tool calls, `trusted=False`) which hosts a base_url may name and the key may reach."""
    section = config.stages.inference
    base = GenerationParams(
        max_tokens=section.max_tokens,
        temperature=section.temperature,
        top_p=section.top_p,
        seed=section.seed,
        stop=tuple(section.stop or ()),
    )
    return BuildContext(
        http=http,
        http_settings=http_settings(config),
        background_reads=background_reads,
        base=base,
        trusted=trusted,
        key_hosts=frozenset(configured_hosts(section)),
        allowed_hosts=None if trusted else tuple(config.security.allowed_hosts),
    )


def configured_hosts(section: InferenceSection) -> set[str]:
    """Hosts the operator named in [stages.inference] (replicas and members included):
    they may receive the API key even when a tool call later points a worker there."""
    hosts: set[str] = set()

    def visit(options: dict[str, Any]) -> None:
        url = options.get("base_url")
        if isinstance(url, str):
            hosts.add(host_of(url))
        for key in ("replicas", "members"):
            for member in options.get(key) or ():
                if isinstance(member, dict):
                    visit(member)

    visit(section.model_dump(include={"base_url", "replicas", "members"}))
    return hosts


def worker_from_config(config: Config, context: BuildContext | None = None) -> Worker:
    section = config.stages.inference
    options: dict[str, Any] = {key: getattr(section, key) for key in WORKER_OPTION_KEYS}
    if section.worker == "echo":
        options["delay_ms"] = section.delay_ms
    return build_worker(section.worker, options, context or build_context(config))


class Orchestrator:
    """Owns the pipeline and the MCP server built on it. Use as an async context manager:
    the pipeline runs while the block is open."""

    def __init__(self, config: Config, worker: Worker | None = None, *, clock: Clock | None = None) -> None:
        self.config = config
        self.http = new_client(http_settings(config))
        """The one pooled HTTP client every HTTP worker of this orchestrator shares."""
        self.background_reads = BackgroundReads()
        """Finishes reading the shared client's streamed responses after their answers."""
        self.pipeline = Pipeline(
            config, worker or worker_from_config(config, self.worker_context(trusted=True)), clock=clock
        )
        self.reload_lock = anyio.Lock()
        """Config reloads (SIGHUP) run one at a time."""
        self.server = build_server(self)

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
            self._running = stack.pop_all()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self._running.__aexit__(*exc_info)

    async def infer(self, submission: Submission, on_chunk: ChunkSink | None = None) -> InferResult:
        return await self.pipeline.infer(submission, on_chunk)

    def status(self) -> PipelineStatus:
        return self.pipeline.status()
