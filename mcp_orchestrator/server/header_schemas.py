"""Mcp-Param-* header checks without walking a tool's whole schema on every call.

On each 2026-07-28 `tools/call` over HTTP the SDK asks the server for the called tool's
input schema and walks all of it, twice, for `x-mcp-header` annotations
(mcp.shared.inbound.validate_mcp_param_headers). infer's schema is large, so that walk was
about 3% of the server's CPU per call (bench/gateway.py, py-spy). A registered tool's schema
does not change, so whether it declares any header is decided once per tool (and again if
the tool is registered anew): a tool that declares none is given no schema to check, which
is exactly what the SDK's walk concludes for it (it compares annotated properties only, and
checks nothing for a schema whose annotations are invalid); a tool that declares headers is
given its schema, and the SDK checks the headers in full.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from mcp.server.mcpserver import MCPServer
from mcp.shared.inbound import find_invalid_x_mcp_header, x_mcp_header_map

SchemaLookup = Callable[[str], Mapping[str, Any] | None]


def declared_headers_only(lookup: SchemaLookup) -> SchemaLookup:
    """`lookup`, answering None for a tool whose schema declares no header to check."""
    decided: dict[str, tuple[Mapping[str, Any], bool]] = {}

    def schema_to_check(name: str) -> Mapping[str, Any] | None:
        schema = lookup(name)
        if schema is None:
            return None
        known = decided.get(name)
        if known is None or known[0] is not schema:  # first call, or the tool was registered anew
            declares = find_invalid_x_mcp_header(schema) is None and bool(x_mcp_header_map(schema))
            known = decided[name] = (schema, declares)
        return schema if known[1] else None

    return schema_to_check


def check_declared_headers_only(server: MCPServer) -> None:
    """Install `declared_headers_only` in front of the server's own schema lookup."""
    lowlevel = server._lowlevel_server  # the SDK offers no public setter for this hook
    if lowlevel.get_tool_input_schema is not None:
        lowlevel.get_tool_input_schema = declared_headers_only(lowlevel.get_tool_input_schema)
