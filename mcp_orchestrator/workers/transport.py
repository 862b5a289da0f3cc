"""HTTP for the workers: one pooled httpx2 client, SSE streams and JSON calls whose every
failure comes out as a classified WorkerError.

httpx2 because the MCP SDK already depends on it (one HTTP stack, no second
connection pool implementation to patch), it is async-native on anyio and has
separate connect/read/write/pool timeouts. Streams are parsed by sse.py on the
response's bytes as they arrive.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx2
from anyio.abc import TaskGroup

from mcp_orchestrator import __version__
from mcp_orchestrator.errors import WorkerError
from mcp_orchestrator.workers import taxonomy
from mcp_orchestrator.workers.options import HttpSettings
from mcp_orchestrator.workers.replies import backend_json
from mcp_orchestrator.workers.sse import MAX_EVENT_BYTES, SSEDecoder, SSEEvent, SSEFramingError

log = logging.getLogger(__name__)

MAX_ERROR_BODY = 64 * 1024
MAX_JSON_BODY = 16 * 1024 * 1024
DRAIN_TIMEOUT_S = 0.5
USER_AGENT = f"mcp-orchestrator/{__version__}"


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
    _parsed: dict[str, httpx2.URL] = field(default_factory=dict, init=False, repr=False, compare=False)

    def url(self, path: str) -> str:
        return self.base_url.rstrip("/") + path

    def parsed_url(self, path: str) -> httpx2.URL:
        """`url(path)` parsed once: httpx2 parses a string URL on every request (~20 µs)."""
        parsed = self._parsed.get(path)
        if parsed is None:
            parsed = self._parsed[path] = httpx2.URL(self.url(path))
        return parsed


UNSENT_RETRIES = 2
"""Times a request is sent again when it provably never reached the backend.

A pooled keep-alive connection can turn out to be dead when a request is written into it
(servers close idle connections at will). When writing the request failed before its last
byte, the backend cannot have acted on it, so it is sent again on a fresh connection and
counts as no backend call. Once the whole request was written, a failure is an ordinary
failed call: the retry policy decides (backoff, deadline, breaker), and every such send
counts, so a request never costs more than `retry_attempts + 1` backend calls."""


class _WriteWatch:
    """Learns from httpcore2's public `trace` extension whether the request was written whole."""

    __slots__ = ("_chained", "written")

    def __init__(self, chained: Any = None) -> None:
        self._chained = chained
        self.written = False

    async def __call__(self, name: str, info: dict[str, Any]) -> None:
        if name.endswith(".send_request_body.complete"):
            self.written = True
        if self._chained is not None:
            await self._chained(name, info)


async def _send(
    client: httpx2.AsyncClient, endpoint: Endpoint, method: str, path: str, body: dict[str, Any] | None
) -> httpx2.Response:
    """Send the request; the response comes back with its body still unread (the caller closes it)."""
    request = client.build_request(method, endpoint.parsed_url(path), json=body, headers=endpoint.headers)
    chained = request.extensions.get("trace")
    for attempt in range(UNSENT_RETRIES + 1):
        watch = request.extensions["trace"] = _WriteWatch(chained)
        try:
            return await client.send(request, stream=True)
        except (httpx2.RemoteProtocolError, httpx2.ReadError, httpx2.WriteError):
            if watch.written or attempt == UNSENT_RETRIES:
                raise
            log.debug("%s: the connection failed before the request was written; sending it again", endpoint.backend)
    raise AssertionError("unreachable")  # the loop returns or raises


@asynccontextmanager
async def open_response(
    client: httpx2.AsyncClient, endpoint: Endpoint, method: str, path: str, body: dict[str, Any] | None = None
) -> AsyncIterator[httpx2.Response]:
    """Send the request and yield the response with its body still unread."""
    response = await _send(client, endpoint, method, path, body)
    try:
        yield response
    finally:
        await response.aclose()


class BackgroundReads:
    """Reads the rest of answered responses after the worker has handed on its answer.

    A stream's last event ([DONE], message_stop) is often followed by the end of the HTTP
    body in a later packet (llama-server sends it ~0.4 ms after). Reading it returns the
    connection to the pool (a keep-alive server then needs no new connection, nor a new
    TLS handshake, for the next request), but nobody needs to wait for it: a worker hands
    the response over here and a task of this object's task group reads what is left (at
    most DRAIN_TIMEOUT_S) and closes it. The owner (the orchestrator, beside the shared
    client) runs it with `async with`; while it is not running, workers read inline.
    """

    def __init__(self) -> None:
        self._group: TaskGroup | None = None
        self._stack: AsyncExitStack | None = None

    async def __aenter__(self) -> BackgroundReads:
        async with AsyncExitStack() as stack:
            self._group = await stack.enter_async_context(anyio.create_task_group())
            self._stack = stack.pop_all()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        group, stack = self._group, self._stack
        self._group = self._stack = None
        if group is not None and stack is not None:
            group.cancel_scope.cancel()  # shutting down: the client closes the connections anyway
            await stack.aclose()

    def take(self, events: EventStream) -> bool:
        """Finish reading `events`' response in the background; False when not running."""
        if self._group is None:
            return False
        self._group.start_soon(self._finish, events, name="http:finish-response")
        return True

    @staticmethod
    async def _finish(events: EventStream) -> None:
        try:
            await events.drain_and_close()
        except Exception as exc:  # the answer is delivered: a failure here only costs the connection
            log.debug("finishing a streamed response failed: %r", exc)


class EventStream:
    """The events of one streamed answer, a batch (those one read completed) at a time.

    Batches rather than single events: one read often completes several events (the
    last text, the finish reason, usage and the end marker arrive together), and
    handing them over together saves a suspension per event."""

    __slots__ = ("_background", "_decoder", "_response", "_source", "handed_off")

    def __init__(self, response: httpx2.Response, background: BackgroundReads | None = None) -> None:
        # Without a content encoding the raw bytes are the body: skip httpx2's decoder layer.
        encoded = response.headers.get("content-encoding", "identity").strip().lower() != "identity"
        self._response = response
        self._source = response.aiter_bytes() if encoded else response.aiter_raw()
        self._decoder = SSEDecoder(MAX_EVENT_BYTES)
        self._background = background
        self.handed_off = False
        """The response now belongs to `background`, which reads its end and closes it."""

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> list[SSEEvent]:
        feed = self._decoder.feed
        while True:
            events = feed(await anext(self._source))
            if events:
                return events

    async def finish(self) -> None:
        """The answer is complete. What follows its last event (normally only the end of
        the body) is read, so the connection goes back to the pool instead of being closed:
        in the background when a BackgroundReads runs, else here."""
        if self._background is not None and self._background.take(self):
            self.handed_off = True
            return
        await self.drain()

    async def drain(self) -> None:
        """Read and ignore the rest of the body; never wait long for it."""
        with anyio.move_on_after(DRAIN_TIMEOUT_S):
            try:
                async for _ in self._source:
                    pass
            except httpx2.TransportError:
                pass

    async def drain_and_close(self) -> None:
        """`drain`, then close the response (BackgroundReads runs this)."""
        try:
            await self.drain()
        finally:
            with anyio.move_on_after(DRAIN_TIMEOUT_S, shield=True):
                await self.aclose()

    async def aclose(self) -> None:
        """Close the byte iterator and the response (its connection goes back to the pool
        when the body was read to its end)."""
        await self._source.aclose()
        await self._response.aclose()


@asynccontextmanager
async def open_event_stream(
    client: httpx2.AsyncClient,
    endpoint: Endpoint,
    path: str,
    body: dict[str, Any],
    background: BackgroundReads | None = None,
) -> AsyncIterator[EventStream]:
    """POST `body` and yield the answer's event stream. Every HTTP failure, also while the
    block reads the stream, comes out as a classified WorkerError. The response is closed
    on leaving the block, unless the block's `finish()` handed it to `background`."""
    with _classified(endpoint):
        response = await _send(client, endpoint, "POST", path, body)
        events: EventStream | None = None
        try:
            await _raise_for_status(response, endpoint)
            content_type = response.headers.get("content-type", "").partition(";")[0].strip().lower()
            if content_type != "text/event-stream":
                sample = (await _read_limited(response, 200)).decode("utf-8", "replace")
                raise taxonomy.malformed(
                    endpoint.backend, f"expected an SSE stream, content-type is {content_type or 'missing'!r}", sample
                )
            events = EventStream(response, background)
            yield events
        finally:
            if events is None:
                await response.aclose()
            elif not events.handed_off:
                await events.aclose()


async def request_json(
    client: httpx2.AsyncClient, endpoint: Endpoint, method: str, path: str, body: dict[str, Any] | None = None
) -> Any:
    """One JSON call (health checks, model lists, non-streaming completions)."""
    with _classified(endpoint):
        async with open_response(client, endpoint, method, path, body) as response:
            await _raise_for_status(response, endpoint)
            raw = await _read_limited(response, MAX_JSON_BODY)
    try:
        return backend_json(raw)
    except ValueError:
        raise taxonomy.malformed(
            endpoint.backend, "the body is not JSON", raw[:200].decode("utf-8", "replace"), endpoint.secrets
        ) from None


def decode_event(endpoint: Endpoint, event: SSEEvent) -> dict[str, Any]:
    """The JSON object in an event's data, or a clear error."""
    try:
        data = backend_json(event.data)
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


@contextmanager
def _classified(endpoint: Endpoint) -> Iterator[None]:
    """Every HTTP failure inside the block as a classified WorkerError (secrets redacted)."""
    try:
        yield
    except httpx2.TimeoutException as exc:
        raise _timeout_error(endpoint, exc) from None
    except httpx2.TransportError as exc:
        raise taxonomy.transport_error(endpoint.backend, exc, endpoint.secrets, what=_phase(exc)) from None
    except SSEFramingError as exc:
        raise taxonomy.malformed(endpoint.backend, "bad SSE framing", str(exc), endpoint.secrets) from None


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
    with _classified(endpoint):
        async with open_response(client, endpoint, "GET", path) as response:
            await _raise_for_status(response, endpoint)
