"""Tool-call middleware: refuse unknown arguments and make argument errors short and plain.

The SDK builds each tool's argument model without `extra="forbid"`, so a misspelt
argument (`max_token`) would be silently dropped and the call would run with the
default; here it is refused, with a did-you-mean. The SDK's argument errors are
pydantic's full report (error types, echoed input, documentation links); they are
rewritten to one line per argument: `temperature: Input should be less than or equal to 2 (got 5)`.
"""

from __future__ import annotations

import difflib
import re
from typing import Any

from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.mcpserver import MCPServer
from mcp.types import CallToolResult, TextContent

_REPORT_HEAD = re.compile(r"^Error executing tool (?P<tool>\S+): \d+ validation errors? for \S+$")
_DETAIL = re.compile(r"^  (?P<message>.*?) \[type=[^,\]]+(?:, input_value=(?P<value>.*), input_type=[^\]]+)?\]$")


class ToolArgumentGuard:
    def __init__(self, server: MCPServer) -> None:
        self._server = server
        self._arguments: dict[str, list[str]] | None = None

    async def __call__(self, ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
        if ctx.method != "tools/call" or not ctx.params:
            return await call_next(ctx)
        name = ctx.params.get("name")
        arguments = ctx.params.get("arguments") or {}
        if isinstance(name, str) and isinstance(arguments, dict):
            allowed = (await self._known_arguments()).get(name)
            unknown = [key for key in arguments if allowed is not None and key not in allowed]
            if allowed is not None and unknown:
                return _error(f"Invalid arguments for {name}: " + "; ".join(_unknown(key, allowed) for key in unknown))
        result = await call_next(ctx)
        if isinstance(result, dict) and result.get("isError"):
            return _shorten(CallToolResult.model_validate(result)) or result
        return result

    async def _known_arguments(self) -> dict[str, list[str]]:
        if self._arguments is None:
            tools = await self._server.list_tools()
            self._arguments = {tool.name: list(tool.input_schema.get("properties", {})) for tool in tools}
        return self._arguments


def _unknown(key: str, allowed: list[str]) -> str:
    hint = difflib.get_close_matches(key, allowed, n=1)
    suggestion = f"; did you mean '{hint[0]}'?" if hint else ""
    return f"{key}: unknown argument{suggestion} (allowed: {', '.join(allowed) or 'none'})"


def _error(text: str) -> CallToolResult:
    return CallToolResult(content=[TextContent(type="text", text=text)], is_error=True)


def _shorten(result: CallToolResult) -> CallToolResult | None:
    """Pydantic's argument report as `arg: message (got value)` lines; None for any other error."""
    if len(result.content) != 1 or not isinstance(result.content[0], TextContent):
        return None
    lines = result.content[0].text.splitlines()
    head = _REPORT_HEAD.match(lines[0]) if lines else None
    if head is None:
        return None
    problems: list[str] = []
    location: str | None = None
    for line in lines[1:]:
        if not line.startswith(" "):
            location = line.strip()
            continue
        detail = _DETAIL.match(line)
        if detail is None or location is None:
            continue
        message, value = detail["message"], detail["value"]
        got = "" if value is None or message == "Field required" else f" (got {value})"
        problems.append(f"{location}: {message}{got}")
    if not problems:
        return None
    return _error(f"Invalid arguments for {head['tool']}: " + "; ".join(problems))
