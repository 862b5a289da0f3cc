"""Which request parameter is wrong, when the SDK says only "Invalid request parameters".

The SDK checks the params of every method the protocol defines against that protocol
version's models and answers a failure with -32602 and an empty `data` (its dispatcher turns
any pydantic error into that), so a client (or the
model driving it) cannot tell what to fix: `tools/call` with `"arguments": "text"`, a number
for `name` or an object for `_meta.progressToken`. This server middleware (the SDK's
extension interface) runs the same check again on such an error and names the first
problems, with their place, in the message and `data`.
"""

from __future__ import annotations

from typing import Any

from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.shared.exceptions import MCPError
from mcp_types import methods
from pydantic import ValidationError

INVALID_PARAMS = -32602
SHOWN_PROBLEMS = 3


class ParamsDetail:
    async def __call__(self, ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
        try:
            return await call_next(ctx)
        except (ValidationError, MCPError) as exc:
            # The check raises pydantic's error, which the SDK's dispatcher turns into the bare
            # -32602; the init gate raises that -32602 itself.
            bare = isinstance(exc, ValidationError) or (exc.code == INVALID_PARAMS and not exc.data)
            if not bare or ctx.method not in methods.SPEC_CLIENT_METHODS:
                raise
            detail = problems(ctx.method, ctx.protocol_version, ctx.params)
            if detail is None:
                raise
            raise MCPError(code=INVALID_PARAMS, message=f"Invalid request parameters: {detail}", data=detail) from None


def problems(method: str, version: str, params: Any) -> str | None:
    """The first few things wrong with `params` for `method`, or None when the models accept
    them (the SDK refused for another reason: say nothing rather than something wrong)."""
    try:
        methods.validate_client_request(method, version, params)
    except ValidationError as exc:
        found = exc.errors(include_url=False, include_input=False)
    except (KeyError, ValueError):  # a method or version the models do not know
        return None
    else:
        return None
    lines = [f"{_place(error['loc'])}: {error['msg']}" for error in found[:SHOWN_PROBLEMS]]
    more = len(found) - SHOWN_PROBLEMS
    return "; ".join(lines) + (f"; and {more} more" if more > 0 else "")


def _place(location: tuple[int | str, ...]) -> str:
    parts = [str(part) for part in location]
    return ".".join(parts[1:] if parts[:1] == ["params"] else parts) or "params"
