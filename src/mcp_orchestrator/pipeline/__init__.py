"""The five-stage pipeline: RAG -> Assemble -> Inference -> Post-process -> Stream.

It knows nothing of MCP: a tool handler, a REST route or a plain library call can drive it.
"""

from mcp_orchestrator.pipeline.core import Pipeline

__all__ = ["Pipeline"]
