"""JSON-RPC 2.0 messages checked before the SDK sees them, for both transports.

The SDK drops a message it cannot validate (stdio: a debug log line, no answer) or answers it
without its id and with pydantic's full report (HTTP). `check` says what is wrong with one
message in a sentence and which JSON-RPC error answers it, with the message's id when it has a
usable one: -32700 parse error, -32600 invalid request, -32602 invalid params. Used by the
stdio reader (stdio.py) and the HTTP guard (http.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final, TypeGuard

import mcp_types as types
from pydantic import ValidationError

from mcp_orchestrator.workers.replies import LONE_SURROGATE, SURROGATE_ESCAPE

MAX_NESTING: Final = 128
"""Deepest nesting of arrays and objects in a message (the message itself is level 1). The
SDK's JSON parser gives up near 200 levels; far below that, no tool argument needs more."""

PARSE_ERROR: Final = types.PARSE_ERROR
INVALID_REQUEST: Final = types.INVALID_REQUEST
INVALID_PARAMS: Final = types.INVALID_PARAMS
TITLES: Final = {PARSE_ERROR: "Parse error", INVALID_REQUEST: "Invalid Request", INVALID_PARAMS: "Invalid params"}
TOO_DEEP: Final = f"nesting deeper than {MAX_NESTING} levels"

# A lone surrogate can only come from a \uD800-\uDFFF escape (the patterns' docstring in
# workers/replies.py): lines without such an escape skip the walk that looks for them.

RequestId = int | str


# ---------------------------------------------------------------------------- checking one line


@dataclass(frozen=True)
class Rejection:
    """Why a line is not handed to the SDK, and the error that answers it."""

    code: int
    reason: str
    id: RequestId | None = None
    answered: bool = True
    """False for a bad response from the client: JSON-RPC never answers a response."""

    @property
    def message(self) -> str:
        """The standard title of the code, then what is wrong."""
        return f"{TITLES.get(self.code, 'Error')}: {self.reason}"

    def answer(self) -> types.JSONRPCError:
        error = types.ErrorData(code=self.code, message=self.message)
        return types.JSONRPCError(jsonrpc="2.0", id=self.id, error=error)


def check(line: str) -> Rejection | None:
    """None when `line` is a JSON-RPC message the SDK accepts; otherwise how to answer it."""
    try:
        message = json.loads(line)
    except RecursionError:  # deeper than Python's own parser goes: no id can be read
        return Rejection(INVALID_REQUEST, TOO_DEEP)
    except ValueError as exc:
        return Rejection(PARSE_ERROR, f"not valid JSON ({exc})")
    if not isinstance(message, dict):
        return Rejection(INVALID_REQUEST, _not_an_object(message))
    if "method" not in message and ("result" in message or "error" in message):
        return _check_response(line)
    return _check_request(line, message)


def _check_request(line: str, message: dict[str, Any]) -> Rejection | None:
    if "id" in message:
        problem = _id_problem(message["id"])
        if problem is not None:
            return Rejection(INVALID_REQUEST, problem)  # id null: the id itself is what is wrong
    answer_id: RequestId | None = message.get("id")
    found = _envelope_problem(message) or _structure_problem(line, message) or _sdk_problem(line)
    return None if found is None else Rejection(found[0], found[1], answer_id)


def _check_response(line: str) -> Rejection | None:
    problem = _sdk_problem(line)
    return None if problem is None else Rejection(problem[0], f"invalid response dropped: {problem[1]}", answered=False)


def _not_an_object(message: object) -> str:
    if isinstance(message, list):
        return "batches (JSON arrays) are not supported: send one message per line"
    return f"a message must be a JSON object, got {_json_type(message)}"


def is_request_id(value: object) -> TypeGuard[RequestId]:
    """MCP's rule for a request id: a string or an integer (JSON-RPC's null and fractions are not)."""
    return isinstance(value, int | str) and not isinstance(value, bool)


def _id_problem(value: object) -> str | None:
    if not is_request_id(value):
        return f'"id" must be a string or an integer, got {_json_type(value)}'
    if isinstance(value, str) and LONE_SURROGATE.search(value):
        return '"id" holds a lone surrogate (\\ud800-\\udfff): strings must be valid Unicode'
    return None


def _envelope_problem(message: dict[str, Any]) -> tuple[int, str] | None:
    """What JSON-RPC 2.0 requires of a request or notification, apart from its id."""
    if "jsonrpc" not in message:
        return INVALID_REQUEST, '"jsonrpc" is missing; it must be "2.0"'
    if message["jsonrpc"] != "2.0":
        return INVALID_REQUEST, f'"jsonrpc" must be "2.0", got {shown(message["jsonrpc"])}'
    if "method" not in message:
        return INVALID_REQUEST, '"method" is missing'
    if not isinstance(message["method"], str):
        return INVALID_REQUEST, f'"method" must be a string, got {_json_type(message["method"])}'
    params = message.get("params")
    if params is not None and not isinstance(params, dict):  # MCP takes named params only
        return INVALID_PARAMS, f'"params" must be an object, got {_json_type(params)}'
    return None


def _structure_problem(line: str, message: dict[str, Any]) -> tuple[int, str] | None:
    """Nesting deeper than MAX_NESTING, or a lone surrogate in any string or key."""
    # Cheap tests on the text first: brackets inside strings only make the count larger.
    may_be_deep = line.count("[") + line.count("{") > MAX_NESTING
    if not may_be_deep and SURROGATE_ESCAPE.search(line) is None:
        return None
    stack: list[tuple[object, int, str]] = [(message, 1, "")]
    while stack:
        value, depth, path = stack.pop()
        if isinstance(value, str):
            if LONE_SURROGATE.search(value):
                return _surrogate_at(path)
            continue
        if not isinstance(value, dict | list):
            continue
        if depth > MAX_NESTING:
            return INVALID_REQUEST, TOO_DEEP
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            where = f"{path}.{_printable(key)}" if path else _printable(key)
            if isinstance(key, str) and LONE_SURROGATE.search(key):
                return _surrogate_at(where)
            stack.append((item, depth + 1, where))
    return None


def _surrogate_at(path: str) -> tuple[int, str]:
    code = INVALID_PARAMS if path == "params" or path.startswith("params.") else INVALID_REQUEST
    return code, f"lone surrogate (\\ud800-\\udfff) in {path}: strings must be valid Unicode"


def _sdk_problem(line: str) -> tuple[int, str] | None:
    """The SDK's own parse of the line, so that nothing it would drop is handed to it."""
    try:
        types.jsonrpc_message_adapter.validate_json(line, by_name=False)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(part) for part in first["loc"])
        return INVALID_REQUEST, f"not a valid JSON-RPC message ({where}: {first['msg']})"
    return None


def _json_type(value: object) -> str:
    match value:
        case None:
            return "null"
        case bool():
            return "a boolean"
        case int() | float():
            return "a number"
        case str():
            return "a string"
        case list():
            return "an array"
        case _:
            return "an object"


def shown(value: object) -> str:
    """A short, printable rendering of a client's value for a message or a log line: strings and
    integers as they are (JSON-escaped), anything else by its type."""
    verbatim = isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))
    text = json.dumps(value) if verbatim else _json_type(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _printable(key: object) -> str:
    text = str(key).encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= 40 else text[:37] + "..."
