"""The MCP surface: the tools (tools.py), how their arguments are checked (arguments.py),
streamed chunks as progress (progress.py), and the streamable HTTP app (http.py).

It calls the orchestrator and shapes its answers; nothing below it knows about MCP.
"""

from mcp_orchestrator.server.tools import Surface, build_server

__all__ = ["Surface", "build_server"]
