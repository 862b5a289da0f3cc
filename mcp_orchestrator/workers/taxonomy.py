"""Backend failures -> WorkerError: which are worth retrying, how long the backend asked
us to wait, and what the backend itself said (never a credential)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

from mcp_orchestrator.errors import WorkerError
from mcp_orchestrator.security import redact_secrets as redact

RETRYABLE_STATUSES = frozenset({408, 409, 425, 429, 529})
"""Besides every 5xx: timeouts, conflicts, too early, rate limited, overloaded (Anthropic's 529)."""
MAX_MESSAGE_CHARS = 400

_HINTS = {
    401: "the backend rejected the credentials",
    403: "the credentials are not allowed to do this",
    404: "wrong base_url or model name?",
    429: "rate limited by the backend",
    529: "the backend is overloaded",
}


def is_retryable_status(status: int) -> bool:
    return status >= 500 or status in RETRYABLE_STATUSES


def parse_retry_after(headers: Mapping[str, str], now: datetime | None = None) -> float | None:
    """Seconds to wait from `retry-after-ms` (OpenAI) or `Retry-After` (seconds or an HTTP date)."""
    millis = headers.get("retry-after-ms")
    if millis is not None:
        try:
            return max(0.0, float(millis) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def backend_message(body: bytes) -> str:
    """The backend's own explanation from an error body (OpenAI, Anthropic, vLLM or plain text)."""
    text = body.decode("utf-8", errors="replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        return _shorten(text) or "(empty body)"
    return _shorten(_message_from_json(data) or text)


def _message_from_json(data: object) -> str | None:
    if not isinstance(data, dict):
        return None
    error = data.get("error")
    if isinstance(error, dict):
        message = error.get("message")
        kind = error.get("type")
        if isinstance(message, str):
            return f"{kind}: {message}" if isinstance(kind, str) and kind else message
    if isinstance(error, str):
        return error
    for key in ("message", "detail"):
        value = data.get(key)
        if isinstance(value, str):
            return value
    return None


def _shorten(text: str) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= MAX_MESSAGE_CHARS else text[: MAX_MESSAGE_CHARS - 1] + "…"


def status_error(
    backend: str,
    status: int,
    body: bytes,
    headers: Mapping[str, str],
    secrets: Iterable[str] = (),
    key_hint: str | None = None,
) -> WorkerError:
    """The WorkerError for an HTTP error response."""
    message = redact(backend_message(body), secrets)
    hint = _HINTS.get(status)
    if status in (401, 403) and key_hint:
        hint = f"{hint}; {key_hint}"
    if hint:
        message = f"{message} ({hint})"
    retryable = is_retryable_status(status)
    retry_after = parse_retry_after(headers) if retryable else None
    return WorkerError(backend, message, retryable=retryable, status=status, retry_after_s=retry_after)


def event_error(backend: str, payload: dict[str, object], secrets: Iterable[str] = ()) -> WorkerError:
    """An error the backend reported inside an otherwise successful stream.

    OpenAI-style servers send `{"error": {"code": 500, ...}}`; Anthropic sends an `error`
    event whose type says whether it is transient (overloaded_error, api_error).
    """
    message = redact(_message_from_json(payload) or json.dumps(payload)[:MAX_MESSAGE_CHARS], secrets)
    error = payload.get("error")
    status: int | None = None
    kind = ""
    if isinstance(error, dict):
        code = error.get("code")
        status = code if isinstance(code, int) and 100 <= code <= 599 else None
        kind = str(error.get("type", ""))
    if status is None:
        status = {"overloaded_error": 529, "api_error": 500, "rate_limit_error": 429, "timeout_error": 408}.get(kind)
    retryable = status is None or is_retryable_status(status)
    return WorkerError(backend, f"error in the stream: {message}", retryable=retryable, status=status)


def transport_error(
    backend: str, exc: Exception, secrets: Iterable[str] = (), *, what: str = "the request failed"
) -> WorkerError:
    """Connection trouble: always worth a retry (the backend may be restarting)."""
    detail = redact(str(exc), secrets)
    detail = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
    return WorkerError(backend, f"{what} ({_shorten(detail)})", retryable=True)


def malformed(backend: str, what: str, sample: str, secrets: Iterable[str] = ()) -> WorkerError:
    """The backend answered with something that is not its wire format. Not retried:
    a server that sends garbage once will most likely send it again."""
    shown = _shorten(redact(sample, secrets))[:120]
    return WorkerError(backend, f"malformed response: {what} (got {shown!r})", retryable=False)
