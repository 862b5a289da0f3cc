"""The SDK's Mcp-Param-* header check sees a schema only for tools that declare headers
(server/header_schemas.py): same verdicts as walking every schema on every call."""

from __future__ import annotations

from typing import Any

from mcp.server.mcpserver import MCPServer
from mcp.shared.inbound import validate_mcp_param_headers

from mcp_orchestrator import Orchestrator
from mcp_orchestrator.server.header_schemas import declared_headers_only
from mcp_orchestrator.server.tools import build_server

ROUTED: dict[str, Any] = {
    "type": "object",
    "properties": {"region": {"type": "string", "x-mcp-header": "Region"}, "prompt": {"type": "string"}},
}
PLAIN: dict[str, Any] = {"type": "object", "properties": {"prompt": {"type": "string"}}}
INVALID: dict[str, Any] = {"type": "object", "properties": {"tags": {"type": "array", "x-mcp-header": "Tags"}}}


def test_only_a_schema_that_declares_headers_is_handed_to_the_check() -> None:
    schemas = {"routed": ROUTED, "plain": PLAIN, "invalid": INVALID}
    lookup = declared_headers_only(schemas.get)
    assert lookup("routed") is ROUTED
    assert lookup("plain") is None and lookup("invalid") is None and lookup("missing") is None
    # The SDK still refuses a header that disagrees with the body of a tool that declares it ...
    rejection = validate_mcp_param_headers(lookup("routed"), {"region": "eu"}, {"mcp-param-region": "us"})
    assert rejection is not None and "Mcp-Param-Region" in rejection.message
    # ... and found nothing to check in the others, with or without their schema.
    for name in ("plain", "invalid"):
        assert validate_mcp_param_headers(schemas[name], {"prompt": "x"}, {"mcp-param-prompt": "y"}) is None
    schemas["plain"] = ROUTED  # the tool registered anew, now declaring a header: decided again
    assert lookup("plain") is ROUTED


def test_the_orchestrators_tools_declare_no_header_and_the_server_skips_the_walk() -> None:
    surface = build_server(Orchestrator())
    server: MCPServer = surface.server
    lookup = server._lowlevel_server.get_tool_input_schema
    assert lookup is not None
    names = [tool.name for tool in server._tool_manager.list_tools()]
    assert "infer" in names
    assert all(lookup(name) is None for name in names)
    assert all(server._tool_manager.get_tool(name) is not None for name in names)
