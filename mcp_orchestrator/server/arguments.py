"""Tool arguments: unknown names refused, every bad value named, all at once, one prefix.

The SDK builds each tool's argument model from the tool function's signature, without
`extra="forbid"`: a misspelt argument (`max_token`) would be dropped silently and the call
run with the default. And its argument errors reach the client as pydantic's full report.
So, for every tool, this module builds the same model from the same signature but
refusing unknown names, and a middleware uses it:

- before the call, when an argument name is unknown: the call is refused;
- after the call, when the SDK answered with an error: the arguments are checked again
  with this model, and if they are what is wrong, the answer becomes one line per bad
  argument from pydantic's structured errors (no error text is parsed);

either way as `Invalid arguments for TOOL: name: problem (got value); ...`. A valid call
costs one set difference.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.mcpserver import Context
from mcp.types import CallToolResult, TextContent
from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from mcp_orchestrator.errors import Problem, validation_problems


def invalid_arguments(tool: str, problems: Iterable[Problem]) -> CallToolResult:
    """The one shape of an argument error."""
    listed = "; ".join(str(problem) for problem in problems)
    return CallToolResult(
        content=[TextContent(type="text", text=f"Invalid arguments for {tool}: {listed}")], is_error=True
    )


def arguments_model(tool: str, function: Callable[..., Any]) -> type[BaseModel]:
    """The tool's arguments as a model that refuses unknown names (the Context parameter left out)."""
    fields: dict[str, Any] = {}
    for parameter in inspect.signature(function, eval_str=True).parameters.values():
        annotation = parameter.annotation
        if inspect.isclass(annotation) and issubclass(annotation, Context):
            continue
        default = ... if parameter.default is inspect.Parameter.empty else parameter.default
        fields[parameter.name] = (annotation, default)
    model: type[BaseModel] = create_model(f"{tool}_arguments", __config__=ConfigDict(extra="forbid"), **fields)
    return model


INVISIBLE = "\u200b\u200c\u200d\u2060\ufeff"
"""Zero-width characters str.strip leaves: a prompt of only these is as blank as spaces."""


def blank(value: str) -> bool:
    """Whether `value` has no visible text (whitespace and zero-width characters only)."""
    return not value.strip().strip(INVISIBLE).strip()


ExtraCheck = Callable[[dict[str, Any]], list[Problem]]
"""Problems a tool's arguments can have beyond their types and limits (which options a worker
kind takes, say), so that one answer names every problem of a call."""


class ArgumentCheck:
    """Server middleware for `tools/call` (see the module docstring)."""

    def __init__(self) -> None:
        self._models: dict[str, type[BaseModel]] = {}
        self._extra: dict[str, ExtraCheck] = {}
        self._withdrawn: dict[str, str] = {}
        """Tools taken off the list, and why (a client may still call one from an old list)."""

    def withdraw(self, tool: str, reason: str | None) -> None:
        """Answer calls of `tool` with `reason` (None: it is offered again)."""
        if reason is None:
            self._withdrawn.pop(tool, None)
        else:
            self._withdrawn[tool] = reason

    def add(self, tool: str, function: Callable[..., Any], extra: ExtraCheck | None = None) -> None:
        self._models[tool] = arguments_model(tool, function)
        if extra is not None:
            self._extra[tool] = extra

    async def __call__(self, ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
        if ctx.method != "tools/call" or not ctx.params:
            return await call_next(ctx)
        name = ctx.params.get("name")
        arguments = ctx.params.get("arguments") or {}
        if isinstance(name, str) and name in self._withdrawn:
            return CallToolResult(content=[TextContent(type="text", text=self._withdrawn[name])], is_error=True)
        model = self._models.get(name) if isinstance(name, str) else None
        if model is None or not isinstance(name, str) or not isinstance(arguments, dict):
            return await call_next(ctx)
        if not arguments.keys() <= model.model_fields.keys():
            return self._refusal(name, model, arguments) or await call_next(ctx)
        result = await call_next(ctx)
        if isinstance(result, dict) and result.get("isError"):
            return self._refusal(name, model, arguments) or result
        return result

    def _refusal(self, tool: str, model: type[BaseModel], arguments: dict[str, Any]) -> CallToolResult | None:
        """The argument error for `arguments`, or None when they are valid."""
        problems: list[Problem] = []
        try:
            model.model_validate(arguments)
        except ValidationError as exc:
            allowed = list(model.model_fields)
            problems = validation_problems(exc, "argument", lambda loc: None if loc else allowed)
        extra = self._extra.get(tool)
        if problems and extra is not None:
            named = [problem.key for problem in problems]
            problems += [problem for problem in extra(arguments) if not _under_any(problem.key, named)]
        return invalid_arguments(tool, problems) if problems else None


def _under_any(key: str, named: list[str]) -> bool:
    """Whether `key` is one of `named` or inside one (replicas.3.kind is inside replicas.3, not
    inside replicas.0): a problem already said is not said again."""
    return any(key == other or key.startswith(f"{other}.") for other in named)
