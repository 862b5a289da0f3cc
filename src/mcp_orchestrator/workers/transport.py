"""HTTP for the workers: one pooled httpx2 client, SSE streams and JSON calls whose every
failure comes out as a classified WorkerError.

httpx2 because the MCP SDK already depends on it (one HTTP stack, no second
connection pool implementation to patch), it is async-native on anyio, has
separate connect/read/write/pool timeouts and ships an incremental SSE parser
with an event-size bound.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx2

from mcp_orchestrator import __version__
from mcp_orchestrator.workers import taxonomy
from mcp_orchestrator.workers.base import WorkerError

MAX_ERROR_BODY = 64 * 1024
MAX_EVENT_BYTES = 1024 * 1024
MAX_JSON_BODY = 16 * 1024 * 1024
USER_AGENT = f"mcp-orchestrator/{__version__}"


@dataclass(frozen=True, slots=True)
class HttpSettings:
    """Timeouts (seconds) and connection limits of the shared client."""

    connect_timeout_s: float = 5.0
    read_timeout_s: float = 60.0
    """Longest silence between two pieces of a response (so also the longest time to first token)."""
    write_timeout_s: float = 10.0
    pool_timeout_s: float = 5.0
    """Longest wait for a free connection when max_connections are all busy."""
    max_connections: int = 100
    max_keepalive_connections: int = 20
    keepalive_expiry_s: float = 30.0


def new_client(settings: HttpSettings | None = None) -> httpx2.AsyncClient:
    """The pooled client all HTTP workers of one orchestrator share."""
    settings = settings or HttpSettings()
    return httpx2.AsyncClient(
        timeout=httpx2.Timeout(
            connect=settings.connect_timeout_s,
            read=settings.read_timeout_s,
            write=settings.write_timeout_s,
            pool=settings.pool_timeout_s,
        ),
        limits=httpx2.Limits(
            max_connections=settings.max_connections,
            max_keepalive_connections=settings.max_keepalive_connections,
            keepalive_expiry=settings.keepalive_expiry_s,
        ),
        headers={"user-agent": USER_AGENT},
        follow_redirects=False,  # a redirect could carry the key to another host
    )


class ClientHandle:
    """The shared client when there is one; otherwise a private one made on first use
    (and closed by `aclose`), so a worker built for validation alone opens nothing."""

    def __init__(self, shared: httpx2.AsyncClient | None, settings: HttpSettings | None = None) -> None:
        self._shared = shared
        self._settings = settings
        self._own: httpx2.AsyncClient | None = None

    def get(self) -> httpx2.AsyncClient:
        if self._shared is not None:
            return self._shared
        if self._own is None:
            self._own = new_client(self._settings)
        return self._own

    async def aclose(self) -> None:
        if self._own is not None:
            own, self._own = self._own, None
            await own.aclose()


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One backend as the transport sees it. `secrets` are redacted from every message."""

    backend: str
    """Names the backend in errors, e.g. 'open_ai at https://api.openai.com/v1'."""
    base_url: str
    headers: Mapping[str, str] = field(default_factory=dict)
    secrets: tuple[str, ...] = ()
    key_hint: str | None = None
    """Appended to 401/403 errors: where the key comes from, or why none was sent."""

    def url(self, path: str) -> str:
        return self.base_url.rstrip("/") + path


STALE_CONNECTION_RETRIES = 2
"""Times a request is sent again when a pooled keep-alive connection turns out to be dead.

Servers close idle or finished keep-alive connections at will (llama-server drops
some right after a streamed answer), and a request written into such a connection
fails before any byte of response. Nothing was answered, so sending it again on a
fresh connection is safe; the OpenAI and Anthropic SDKs do the same. Failures after
the response has started are never retried here."""


@asynccontextmanager
async def open_response(
    client: httpx2.AsyncClient, endpoint: Endpoint, method: str, path: str, body: dict[str, Any] | None = None
) -> AsyncIterator[httpx2.Response]:
    """Send the request and yield the response with its body still unread."""
    request = client.build_request(method, endpoint.url(path), json=body, headers=endpoint.headers)
    for attempt in range(STALE_CONNECTION_RETRIES + 1):
        try:
            response = await client.send(request, stream=True)
            break
        except (httpx2.RemoteProtocolError, httpx2.ReadError, httpx2.WriteError):
            if attempt == STALE_CONNECTION_RETRIES:
                raise
    try:
        yield response
    finally:
        await response.aclose()


async def stream_events(
    client: httpx2.AsyncClient, endpoint: Endpoint, path: str, body: dict[str, Any]
) -> AsyncGenerator[httpx2.ServerSentEvent, None]:
    """POST `body` and yield the server-sent events of the answer as they arrive."""
    try:
        async with open_response(client, endpoint, "POST", path, body) as response:
            await _raise_for_status(response, endpoint)
            content_type = response.headers.get("content-type", "").partition(";")[0].strip().lower()
            if content_type != "text/event-stream":
                sample = (await _read_limited(response, 200)).decode("utf-8", "replace")
                raise taxonomy.malformed(
                    endpoint.backend, f"expected an SSE stream, content-type is {content_type or 'missing'!r}", sample
                )
            async for event in httpx2.EventSource(response, max_event_size=MAX_EVENT_BYTES):
                yield event
    except httpx2.SSEError as exc:
        raise taxonomy.malformed(endpoint.backend, "bad SSE framing", str(exc), endpoint.secrets) from None
    except httpx2.TimeoutException as exc:
        raise _timeout_error(endpoint, exc) from None
    except httpx2.TransportError as exc:
        raise taxonomy.transport_error(endpoint.backend, exc, endpoint.secrets, what=_phase(exc)) from None


async def request_json(
    client: httpx2.AsyncClient, endpoint: Endpoint, method: str, path: str, body: dict[str, Any] | None = None
) -> Any:
    """One JSON call (health checks, model lists, non-streaming completions)."""
    try:
        async with open_response(client, endpoint, method, path, body) as response:
            await _raise_for_status(response, endpoint)
            raw = await _read_limited(response, MAX_JSON_BODY)
    except httpx2.TimeoutException as exc:
        raise _timeout_error(endpoint, exc) from None
    except httpx2.TransportError as exc:
        raise taxonomy.transport_error(endpoint.backend, exc, endpoint.secrets, what=_phase(exc)) from None
    try:
        return json.loads(raw)
    except ValueError:
        raise taxonomy.malformed(
            endpoint.backend, "the body is not JSON", raw[:200].decode("utf-8", "replace"), endpoint.secrets
        ) from None


DRAIN_TIMEOUT_S = 0.5


async def drain(events: AsyncIterator[Any]) -> None:
    """Read what follows a stream's last event (normally only the end of the body), so the
    connection goes back to the pool instead of being closed (a new TLS handshake per
    request otherwise); never wait long for it."""
    with anyio.move_on_after(DRAIN_TIMEOUT_S):
        try:
            async for _ in events:
                pass
        except WorkerError:
            pass


def decode_event(endpoint: Endpoint, event: httpx2.ServerSentEvent) -> dict[str, Any]:
    """The JSON object in an event's data, or a clear error."""
    try:
        data = json.loads(event.data)
    except ValueError:
        raise taxonomy.malformed(endpoint.backend, "event data is not JSON", event.data, endpoint.secrets) from None
    if not isinstance(data, dict):
        raise taxonomy.malformed(endpoint.backend, "event data is not a JSON object", event.data, endpoint.secrets)
    return data


def ended_early(endpoint: Endpoint, expected: str) -> WorkerError:
    """The connection closed cleanly but the stream's terminating event never came."""
    return WorkerError(
        endpoint.backend, f"the stream ended before {expected} (connection closed early)", retryable=True
    )


async def _raise_for_status(response: httpx2.Response, endpoint: Endpoint) -> None:
    if response.status_code < 300:
        return
    body = await _read_limited(response, MAX_ERROR_BODY)
    raise taxonomy.status_error(
        endpoint.backend, response.status_code, body, response.headers, endpoint.secrets, endpoint.key_hint
    )


async def _read_limited(response: httpx2.Response, limit: int) -> bytes:
    parts: list[bytes] = []
    size = 0
    async for piece in response.aiter_bytes():
        parts.append(piece)
        size += len(piece)
        if size >= limit:
            break
    return b"".join(parts)[:limit]


def _timeout_error(endpoint: Endpoint, exc: httpx2.TimeoutException) -> WorkerError:
    what = {
        httpx2.ConnectTimeout: "connecting timed out",
        httpx2.ReadTimeout: "the backend sent nothing within the read timeout",
        httpx2.WriteTimeout: "sending the request timed out",
        httpx2.PoolTimeout: "no free connection in the pool within the pool timeout",
    }.get(type(exc), "timed out")
    return WorkerError(endpoint.backend, what, retryable=True)


def _phase(exc: httpx2.TransportError) -> str:
    if isinstance(exc, httpx2.ConnectError):
        return "cannot connect"
    if isinstance(exc, httpx2.ReadError | httpx2.RemoteProtocolError):
        return "the connection broke while reading the answer"
    return "the request failed"


async def check_ok(client: httpx2.AsyncClient, endpoint: Endpoint, path: str) -> None:
    """GET `path` and require a 2xx answer (health endpoints may have empty bodies)."""
    try:
        async with open_response(client, endpoint, "GET", path) as response:
            await _raise_for_status(response, endpoint)
    except httpx2.TimeoutException as exc:
        raise _timeout_error(endpoint, exc) from None
    except httpx2.TransportError as exc:
        raise taxonomy.transport_error(endpoint.backend, exc, endpoint.secrets, what=_phase(exc)) from None
