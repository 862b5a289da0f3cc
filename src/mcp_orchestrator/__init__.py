"""mcp-orchestrator: a production LLM pipeline exposed to Claude as MCP tools."""

__version__ = "0.1.0"
