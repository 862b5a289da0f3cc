"""mcp-orchestrator: a production LLM pipeline, exposed to Claude as MCP tools and usable as a library.

    import anyio
    from mcp_orchestrator import Config, Orchestrator, Submission

    async def main() -> None:
        async with Orchestrator(Config()) as orchestrator:  # the echo worker by default
            result = await orchestrator.infer(Submission(prompt="hello pipeline"))
            print(result.text, result.usage, result.stage_ms)

    anyio.run(main)

The names below are the public face; everything else may change between versions.
Imports are lazy, so `mcp-orchestrator --help` does not load the server.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

_EXPORTS = {
    "Orchestrator": "mcp_orchestrator.orchestrator",
    "Config": "mcp_orchestrator.config",
    "load_config": "mcp_orchestrator.config",
    "Submission": "mcp_orchestrator.models",
    "GenerationParams": "mcp_orchestrator.models",
    "Priority": "mcp_orchestrator.models",
    "InferResult": "mcp_orchestrator.models",
    "PipelineStatus": "mcp_orchestrator.models",
    "Worker": "mcp_orchestrator.workers.base",
    "WorkerRequest": "mcp_orchestrator.workers.base",
    "Chunk": "mcp_orchestrator.workers.base",
    "ContextSource": "mcp_orchestrator.pipeline.context",
    "OrchestratorError": "mcp_orchestrator.errors",
    "RequestError": "mcp_orchestrator.errors",
    "ConfigError": "mcp_orchestrator.errors",
    "WorkerError": "mcp_orchestrator.errors",
}

__all__ = [
    "Chunk",
    "Config",
    "ConfigError",
    "ContextSource",
    "GenerationParams",
    "InferResult",
    "Orchestrator",
    "OrchestratorError",
    "PipelineStatus",
    "Priority",
    "RequestError",
    "Submission",
    "Worker",
    "WorkerError",
    "WorkerRequest",
    "__version__",
    "load_config",
]

if TYPE_CHECKING:
    from mcp_orchestrator.config import Config, load_config
    from mcp_orchestrator.errors import ConfigError, OrchestratorError, RequestError, WorkerError
    from mcp_orchestrator.models import GenerationParams, InferResult, PipelineStatus, Priority, Submission
    from mcp_orchestrator.orchestrator import Orchestrator
    from mcp_orchestrator.pipeline.context import ContextSource
    from mcp_orchestrator.workers.base import Chunk, Worker, WorkerRequest


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mcp_orchestrator' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
