"""Wiring: config -> worker -> pipeline -> MCP server. One Orchestrator per process."""

from __future__ import annotations

from typing import Any

from mcp_orchestrator.config import Config
from mcp_orchestrator.models import InferResult, PipelineStatus, Submission
from mcp_orchestrator.pipeline import Pipeline
from mcp_orchestrator.pipeline.request import ChunkSink
from mcp_orchestrator.server import build_server
from mcp_orchestrator.workers.base import Worker
from mcp_orchestrator.workers.registry import build_worker


def worker_from_config(config: Config) -> Worker:
    section = config.stages.inference
    options: dict[str, Any] = {"model": section.model}
    if section.worker == "echo":
        options["delay_ms"] = section.delay_ms
    return build_worker(section.worker, options)


class Orchestrator:
    """Owns the pipeline and the MCP server built on it. Use as an async context manager:
    the pipeline runs while the block is open."""

    def __init__(self, config: Config, worker: Worker | None = None) -> None:
        self.config = config
        self.pipeline = Pipeline(config, worker or worker_from_config(config))
        self.server = build_server(self)

    async def __aenter__(self) -> Orchestrator:
        await self.pipeline.__aenter__()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.pipeline.__aexit__(*exc_info)

    async def infer(self, submission: Submission, on_chunk: ChunkSink | None = None) -> InferResult:
        return await self.pipeline.infer(submission, on_chunk)

    def status(self) -> PipelineStatus:
        return self.pipeline.status()
