"""Values read from a backend's reply, checked before they reach a result: its JSON, its
token counts, its finish reason.

A backend is not trusted to send what its API promises. JSON may carry a lone surrogate
(`"\\ud800"` is valid JSON, but no UTF-8 text can hold it: the MCP SDK's writer then fails,
which ends a stdio server and leaves an HTTP caller with an empty response), so every lone
surrogate becomes U+FFFD. A token count must be a non-negative integer, not a boolean, and
a finish reason a short string: anything else is a malformed response, not something to
add to the totals or pass to the caller.
"""

from __future__ import annotations

import json
import re
from typing import Any

from mcp_orchestrator.workers import taxonomy

MAX_TOKEN_COUNT = 10**9
"""More than any context window; a larger count is not a count."""
MAX_FINISH_REASON_CHARS = 64
"""Providers' reasons are single words ("stop", "length", "end_turn", "tool_calls")."""

LONE_SURROGATE = re.compile("[\ud800-\udfff]")
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
"""What a surrogate looks like escaped in JSON text: only then can json.loads return a lone one
(a UTF-8 decoder turns encoded surrogates into U+FFFD), so text without it skips the walk. The
JSON-RPC check of incoming messages (server/messages.py) goes by the same two patterns."""


def backend_json(raw: str | bytes) -> Any:
    """json.loads (ValueError as it raises, and for nesting too deep to read), with every lone
    surrogate in a string replaced.
    Bytes are decoded here, invalid UTF-8 replaced: json.loads would let a surrogate's raw bytes
    through as a surrogate."""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    try:
        data = json.loads(text)
        return _without_surrogates(data) if SURROGATE_ESCAPE.search(text) else data
    except RecursionError:  # nested deeper than Python goes: unreadable like any other bad JSON
        raise ValueError("nested too deep") from None


def _without_surrogates(value: Any) -> Any:
    if isinstance(value, str):
        return LONE_SURROGATE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {_without_surrogates(key): _without_surrogates(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_without_surrogates(item) for item in value]
    return value


def token_count(backend: str, value: Any, name: str, sample: object) -> int:
    """`value` as a token count; a malformed-response WorkerError naming `name` otherwise
    (`sample`, what held it, goes to the debug log; made text only then)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TOKEN_COUNT:
        what = f"{name} is not a token count (an integer 0 to {MAX_TOKEN_COUNT})"
        raise taxonomy.malformed(backend, what, str(sample))
    return value


def finish_reason(backend: str, value: Any, sample: object) -> str | None:
    """`value` as a finish reason (None when absent or empty); malformed otherwise."""
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > MAX_FINISH_REASON_CHARS or not value.isprintable():
        raise taxonomy.malformed(
            backend,
            f"the finish reason is not a short text (at most {MAX_FINISH_REASON_CHARS} characters)",
            str(sample),
        )
    return value
