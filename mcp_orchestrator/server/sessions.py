"""Per-client caps on streamable-HTTP sessions, so one client cannot lock the others out.

Why: the SDK's session manager caps the sessions of all clients together (`max_sessions`) and
closes idle ones (`session_idle_timeout`); we pass it both from `[server]`. But it counts every
client alike: one address opening sessions in a loop takes every slot, and every other client
gets 503 until those sessions expire. The SDK has no per-client count, so this ASGI piece in
front of it keeps one and refuses a client over `server.max_sessions_per_client` (429, with a
JSON-RPC error naming the key) while other addresses still get sessions.

How it knows which sessions are open without reaching into the SDK's private state: it sees
every request to the MCP path and applies the SDK's documented rules. A request without a
`Mcp-Session-Id` opens a session, which exists if the answer is below 400 and carries its id;
a session ends on a successful DELETE, answers 404 once the SDK has forgotten it, and is closed
by the SDK once no request has been in flight for the idle timeout, which is mirrored here from
the end of the last request as seen by this piece (a moment after the SDK's own clock starts),
so a slot is never freed here before the SDK frees it.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import anyio
from mcp.server.streamable_http import MCP_SESSION_ID_HEADER
from mcp.shared.inbound import MCP_PROTOCOL_VERSION_HEADER
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mcp_orchestrator.server.identity import request_identity

log = logging.getLogger(__name__)

SESSION_HEADER = MCP_SESSION_ID_HEADER.encode("ascii")
VERSION_HEADER = MCP_PROTOCOL_VERSION_HEADER.encode("ascii")
TOO_MANY_SESSIONS = -32000
"""JSON-RPC error code of a refused session (the range JSON-RPC leaves to servers)."""


@dataclass(frozen=True)
class SessionCaps:
    max_sessions: int
    """All clients together (server.max_sessions)."""
    per_client: int
    """One client address (server.max_sessions_per_client)."""
    idle_s: float
    """The SDK closes a session idle this long (server.session_idle_s)."""


@dataclass(frozen=True)
class Refusal:
    status: int
    message: str
    retry_after_s: int

    def response(self) -> Response:
        body = {"jsonrpc": "2.0", "id": None, "error": {"code": TOO_MANY_SESSIONS, "message": self.message}}
        headers = {"Retry-After": str(self.retry_after_s)}
        return Response(json.dumps(body), self.status, headers, media_type="application/json")


@dataclass
class _Session:
    client: str
    idle_since: float
    in_flight: int = 0


def client_key(scope: Scope) -> str:
    """Who a session counts against: with OAuth, the token's subject (identity.py: one person,
    whichever address or proxy they come through); otherwise the peer's IP, or for IPv6 its /64
    (what one host usually holds). Behind a reverse proxy every address is the proxy's."""
    identity = request_identity(scope)
    if identity is not None:
        return identity
    client = scope.get("client")
    if not client:
        return "unknown"
    try:
        address = ipaddress.ip_address(str(client[0]))
    except ValueError:
        return str(client[0])
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def header(scope: Scope, name: bytes) -> str | None:
    return next((value.decode("latin-1") for key, value in scope["headers"] if key == name), None)


def is_legacy(scope: Scope) -> bool:
    """Whether the SDK serves this request on the session (2025) path: requests of protocol
    2026-07-28 and later are single exchanges that never open a session."""
    version = header(scope, VERSION_HEADER)
    return version is None or version in HANDSHAKE_PROTOCOL_VERSIONS


class SessionTable:
    """Which client address holds which session, and the caps on both counts."""

    def __init__(self, caps: SessionCaps, clock: Callable[[], float] = anyio.current_time) -> None:
        self.caps = caps
        self._clock = clock
        self._sessions: dict[str, _Session] = {}
        self._held: Counter[str] = Counter()
        """Per client: sessions open plus sessions being opened."""
        self._total = 0
        self._refused: set[str] = set()
        """Clients refused (or "*" for the total cap) since the last session was admitted: a
        refusal is logged once, not per attempt. Only clients holding sessions are kept."""

    @property
    def total(self) -> int:
        return self._total

    def held(self, client: str) -> int:
        return self._held[client]

    def admit(self, client: str) -> Refusal | None:
        """Reserve a slot for a session `client` is opening (`opened` settles it), or say why not."""
        if self._over_a_cap(client):
            self._drop_expired()
        refusal = self._refusal(client) if self._over_a_cap(client) else None
        if refusal is not None:
            self._log_once(client if refusal.status == 429 else "*", refusal)
            return refusal
        self._refused.discard(client)
        self._refused.discard("*")
        self._held[client] += 1
        self._total += 1
        return None

    def opened(self, client: str, session_id: str | None) -> None:
        """The opening request ended: keep its slot for `session_id`, or free it (None: refused, failed)."""
        if session_id is None or session_id in self._sessions:
            self._free(client)
        else:
            self._sessions[session_id] = _Session(client, self._clock())

    def begin(self, session_id: str) -> bool:
        """A request for `session_id` starts; False when this table does not know the session."""
        session = self._sessions.get(session_id)
        if session is not None:
            session.in_flight += 1
        return session is not None

    def end(self, session_id: str, gone: bool) -> None:
        """A request `begin` accepted ended; `gone`: the session no longer exists (deleted, or 404)."""
        session = self._sessions.get(session_id)
        if session is None:
            return
        session.in_flight -= 1
        session.idle_since = self._clock()
        if gone:
            self._forget(session_id)

    def _log_once(self, key: str, refusal: Refusal) -> None:
        if key not in self._refused:
            self._refused.add(key)
            log.warning("refusing new MCP sessions: %s", refusal.message)

    def _over_a_cap(self, client: str) -> bool:
        return self._total >= self.caps.max_sessions or self._held[client] >= self.caps.per_client

    def _refusal(self, client: str) -> Refusal:
        idle = f"{self.caps.idle_s:g}"
        close = (
            f"close unused sessions (HTTP DELETE with their Mcp-Session-Id) or wait: a session idle for {idle} s "
            "is closed (server.session_idle_s)"
        )
        if self._held[client] >= self.caps.per_client:
            return Refusal(
                429,
                f"too many open MCP sessions from {client}: {self._held[client]}, at most "
                f"{self.caps.per_client} per client address (server.max_sessions_per_client); {close}",
                self._retry_after_s(client),
            )
        return Refusal(
            503,
            f"too many open MCP sessions on this server: {self._total}, at most {self.caps.max_sessions} "
            f"for all clients together (server.max_sessions); retry later",
            self._retry_after_s(None),
        )

    def _retry_after_s(self, client: str | None) -> int:
        """Seconds until the first idle session (of `client`, or of anyone) expires; the idle
        timeout when every session is busy."""
        now = self._clock()
        waits = [
            session.idle_since + self.caps.idle_s - now
            for session in self._sessions.values()
            if session.in_flight == 0 and (client is None or session.client == client)
        ]
        return max(1, math.ceil(min(waits, default=self.caps.idle_s)))

    def _drop_expired(self) -> None:
        """Forget the sessions the SDK has closed for being idle."""
        deadline = self._clock() - self.caps.idle_s
        for session_id, session in list(self._sessions.items()):
            if session.in_flight == 0 and session.idle_since <= deadline:
                self._forget(session_id)

    def _forget(self, session_id: str) -> None:
        session = self._sessions.pop(session_id, None)
        if session is not None:
            self._free(session.client)

    def _free(self, client: str) -> None:
        self._held[client] -= 1
        if self._held[client] <= 0:
            del self._held[client]
            self._refused.discard(client)
        self._total -= 1


class _Answer:
    """The status and session id of the response sent through `send`."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.status: int | None = None
        self.session_id: str | None = None

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.session_id = next(
                (value.decode("latin-1") for key, value in message.get("headers", ()) if key.lower() == SESSION_HEADER),
                None,
            )
        await self._send(message)

    @property
    def established(self) -> str | None:
        """The session the response opened (the SDK keeps a session whose opening answer is below 400)."""
        return self.session_id if self.status is not None and self.status < 400 else None


class SessionLimits:
    """ASGI middleware on the MCP path: per-client and total session caps (see the module docstring)."""

    def __init__(self, app: ASGIApp, path: str, table: SessionTable) -> None:
        self.app = app
        self.path = path
        self.table = table

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != self.path or not is_legacy(scope):
            await self.app(scope, receive, send)
            return
        session_id = header(scope, SESSION_HEADER)
        if session_id is None:
            await self._open(scope, receive, send)
        else:
            await self._use(session_id, scope, receive, send)

    async def _open(self, scope: Scope, receive: Receive, send: Send) -> None:
        client = client_key(scope)
        refusal = self.table.admit(client)
        if refusal is not None:
            await refusal.response()(scope, receive, send)
            return
        answer = _Answer(send)
        try:
            await self.app(scope, receive, answer.send)
        finally:
            self.table.opened(client, answer.established)

    async def _use(self, session_id: str, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.table.begin(session_id):
            await self.app(scope, receive, send)
            return
        answer = _Answer(send)
        try:
            await self.app(scope, receive, answer.send)
        finally:
            deleted = scope["method"] == "DELETE" and answer.status is not None and answer.status < 300
            self.table.end(session_id, gone=deleted or answer.status == 404)
