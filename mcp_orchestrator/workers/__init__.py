"""Inference backends. A worker turns messages into chunks of text and knows
nothing of the pipeline or of MCP."""

from mcp_orchestrator.workers.base import Chunk, Worker, WorkerError, WorkerRequest

__all__ = ["Chunk", "Worker", "WorkerError", "WorkerRequest"]
