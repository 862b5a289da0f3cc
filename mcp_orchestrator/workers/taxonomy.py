"""Backend failures -> WorkerError: which are worth retrying, how long the backend asked
us to wait, and what the backend itself said.

What a backend sends back reaches the model that called the tool, so only a provider's own
error shape is shown (`{"error": {"message": ..., "type": ...}}` and the like), cut to a
few hundred characters with control characters removed and keys redacted. Any other body
(an HTML page, some service's JSON) is described by its size only; the body itself goes to
the debug log, never to a client.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

from mcp_orchestrator.errors import WorkerError
from mcp_orchestrator.security import redact_secrets as redact

RETRYABLE_STATUSES = frozenset({408, 409, 425, 429, 529})
"""Besides every 5xx: timeouts, conflicts, too early, rate limited, overloaded (Anthropic's 529)."""
MAX_MESSAGE_CHARS = 300
log = logging.getLogger(__name__)
# Lone surrogates too: valid in JSON, but no UTF-8 writer can send them on (replies.py).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u200b-\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")

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


def backend_message(backend: str, body: bytes, secrets: Iterable[str] = ()) -> str:
    """The provider's own explanation from an error body, or what kind of body it was (not its text)."""
    message = provider_message(body)
    if message is not None:
        return _shorten(redact(message, secrets))
    log.debug(
        "%s: error body not shown to the caller: %r", backend, redact(body[:4096].decode("utf-8", "replace"), secrets)
    )
    if not body.strip():
        return "empty body"
    return f"{_body_kind(body)} of {len(body)} bytes (not shown)"


def provider_message(body: bytes | str) -> str | None:
    """`type: message` from a provider's JSON error shape (OpenAI, Anthropic, llama.cpp, vLLM);
    None for any other body."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    return _message_from_json(data)


def _body_kind(body: bytes) -> str:
    try:
        json.loads(body)
    except ValueError:
        return "non-JSON body"
    return "JSON body without an error message"


def _message_from_json(data: object) -> str | None:
    if not isinstance(data, dict):
        return None
    error = data.get("error")
    if isinstance(error, dict):  # OpenAI, Anthropic, llama.cpp
        message = error.get("message")
        kind = error.get("type")
        if isinstance(message, str):
            return f"{kind}: {message}" if isinstance(kind, str) and kind else message
    if isinstance(error, str):
        return error
    if data.get("object") == "error" and isinstance(data.get("message"), str):  # vLLM
        kind = data.get("type")
        return f"{kind}: {data['message']}" if isinstance(kind, str) and kind else str(data["message"])
    return None


def _shorten(text: str) -> str:
    text = re.sub(r"\s+", " ", _CONTROL.sub(" ", text)).strip()
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
    message = backend_message(backend, body, secrets)
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
    found = _message_from_json(payload)
    if found is None:
        log.debug("%s: error event not shown to the caller: %r", backend, redact(json.dumps(payload)[:4096], secrets))
    message = _shorten(redact(found, secrets)) if found is not None else "an error event without a message"
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
    """The backend answered with something that is not its wire format. Not retried: a server
    that sends garbage once will most likely send it again. What it sent goes to the debug log."""
    log.debug("%s: malformed response (%s): %r", backend, what, redact(sample[:4096], secrets))
    return WorkerError(backend, f"malformed response: {what} ({len(sample)} characters, not shown)", retryable=False)
