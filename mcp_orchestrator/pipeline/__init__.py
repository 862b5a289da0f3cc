"""The five-stage pipeline: RAG -> Assemble -> Inference -> Post-process -> Stream.

It knows nothing of MCP: a tool handler, a REST route or a plain library call can drive it.
"""

from mcp_orchestrator.pipeline.context import ContextSource
from mcp_orchestrator.pipeline.pipeline import Pipeline
from mcp_orchestrator.pipeline.request import Request

__all__ = ["ContextSource", "Pipeline", "Request"]
