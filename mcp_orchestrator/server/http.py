"""Streamable HTTP: the MCP endpoint at /mcp plus /healthz and /metrics, behind one guard.

The guard checks Host/Origin on every path (DNS-rebinding protection stays on for
any bind address) and, when a bearer token is configured, the Authorization header; with
OAuth configured instead, oauth.py's gate checks access tokens behind it.
Behind it, MCP sessions are capped per client address and in total, idle ones expire, and
a session request whose client went away is cancelled ([server] keys, see session_guards);
a 2026-07-28 call that asked for no progress is answered without the SDK's per-call tasks
(quiet_calls.py). Served by uvicorn with the protocol in protocol.py (`HTTP_PROTOCOL`).
"""

from __future__ import annotations

import hmac
import logging

from mcp.server.transport_security import TransportSecurityMiddleware, TransportSecuritySettings
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from mcp_orchestrator.addresses import is_loopback
from mcp_orchestrator.config import ServerSection
from mcp_orchestrator.errors import BindError
from mcp_orchestrator.orchestrator import Orchestrator
from mcp_orchestrator.server.bodies import read_body, replaying
from mcp_orchestrator.server.disconnect import CancelOnDisconnect
from mcp_orchestrator.server.messages import INVALID_REQUEST, Rejection, check
from mcp_orchestrator.server.oauth import protect
from mcp_orchestrator.server.protocol import OrchestratorH11Protocol
from mcp_orchestrator.server.quiet_calls import QuietCalls, answer_quiet_calls_as_json
from mcp_orchestrator.server.sessions import SessionCaps, SessionLimits, SessionTable

log = logging.getLogger(__name__)

MCP_PATH = "/mcp"
MIN_TOKEN_CHARS = 16
PLACEHOLDER_TOKENS = frozenset(
    {"changeme", "change-me", "secret", "password", "token", "test", "admin", "example", "default", "your-token-here"}
)
HEALTH_PATH = "/healthz"
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
HTTP_PROTOCOL = OrchestratorH11Protocol
"""uvicorn's `http=` for the MCP server: quiet calls need its ClientGone to be cancelled when their client leaves."""


def security_settings(host: str, extra_hosts: list[str], extra_origins: list[str]) -> TransportSecuritySettings:
    """Allowed Host/Origin values: loopback always, plus what the user listed.

    Binding a non-loopback interface without listing the names clients will use is
    refused: protection would otherwise reject every remote client or be switched off.
    """
    if not is_loopback(host) and not extra_hosts:
        raise BindError(
            f"--host / server.host {host} is not a loopback address: list the host names clients will use in "
            "server.allowed_hosts or with --allowed-host NAME (repeatable), e.g. --allowed-host myserver.lan:8000"
        )
    hosts = [f"{name}:*" for name in LOOPBACK_NAMES] + list(LOOPBACK_NAMES)
    origins = [f"http://{name}:*" for name in LOOPBACK_NAMES] + [f"http://{name}" for name in LOOPBACK_NAMES]
    for name in extra_hosts:
        hosts.append(name)
        if ":" not in name.strip("[]").split("]")[-1]:
            hosts.append(f"{name}:*")
            origins += [f"http://{name}:*", f"https://{name}:*", f"http://{name}", f"https://{name}"]
        else:
            origins += [f"http://{name}", f"https://{name}"]
    origins += extra_origins
    return TransportSecuritySettings(enable_dns_rebinding_protection=True, allowed_hosts=hosts, allowed_origins=origins)


class Guard:
    """ASGI middleware: Host/Origin validation and the optional bearer token, on every path."""

    def __init__(self, app: ASGIApp, settings: TransportSecuritySettings, token: str | None) -> None:
        self.app = app
        self.checker = TransportSecurityMiddleware(settings)
        self.expected = token.encode() if token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        refusal = await self.checker.validate_request(request, is_post=False)
        given = bearer_token(request.headers.get("authorization", ""))
        if refusal is None and self.expected is not None and not hmac.compare_digest(given, self.expected):
            if scope["path"] == HEALTH_PATH:  # load balancers ask without a token: the bare status only
                scope.setdefault("state", {})["details"] = False
            else:
                refusal = JSONResponse(
                    {"error": "missing or wrong bearer token"}, status_code=401, headers={"WWW-Authenticate": "Bearer"}
                )
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        await self.app(scope, receive, send)


class CheckedMessages:
    """ASGI middleware: each JSON POST to the MCP endpoint is checked as JSON-RPC before the
    SDK sees it (messages.check), so HTTP answers a bad message as stdio does: 400 with the
    JSON-RPC error for it and the message's own id (the SDK answers id null, and takes a
    message whose id is an object for a notification: 202, no answer). A body over `limit`
    is answered 413 as soon as it passes the limit, without reading the rest."""

    def __init__(self, app: ASGIApp, path: str, limit: int) -> None:
        self.app = app
        self.path = path
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not _json_post_to(scope, self.path):
            await self.app(scope, receive, send)
            return
        read, body = await read_body(receive, self.limit)
        if body is None and read[-1]["type"] != "http.request":
            # The client went away mid-body: nobody to answer, and no message reached the SDK
            # (which would log a ClientDisconnect traceback as an error).
            log.debug("HTTP client left before its request body ended")
            return
        rejection = (
            check(body.decode("utf-8", "replace"))
            if body is not None
            else Rejection(INVALID_REQUEST, f"message larger than {self.limit} bytes ([server] max_message_bytes)")
        )
        if rejection is not None and rejection.answered:
            log.warning("HTTP message refused: %s", rejection.message)
            answer = rejection.answer().model_dump(mode="json", by_alias=True, exclude_unset=True)
            await JSONResponse(answer, status_code=400 if body is not None else 413)(scope, receive, send)
            return
        await self.app(scope, replaying(read, receive), send)


def _json_post_to(scope: Scope, path: str) -> bool:
    """A POST to the MCP endpoint whose body the SDK would read as JSON, by the SDK's own rule
    (the first Content-Type header; any of its comma-separated types `application/json`);
    other POSTs the SDK refuses unread (400, 'Invalid Content-Type header')."""
    if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != path:
        return False
    content_type = Request(scope).headers.get("content-type", "")
    return any(part.split(";")[0].strip().lower() == "application/json" for part in content_type.split(","))


def weak_token(token: str) -> str | None:
    """Why a static bearer token is too weak to guard the server, or None. Never quotes it."""
    if len(token) < MIN_TOKEN_CHARS:
        return f"it has {len(token)} characters, at least {MIN_TOKEN_CHARS} are needed"
    if token.lower() in PLACEHOLDER_TOKENS or len(set(token)) < 4:
        return "it is a placeholder, not a random token"
    return None


def auth_refusal(
    host: str, token: str | None, token_env: str, insecure_no_auth: bool, oauth: bool = False
) -> str | None:
    """Why the HTTP server must not start with this authentication, or None.

    A non-loopback address without authentication would let anyone who reaches the port spend
    the operator's API keys; --insecure-no-auth is the explicit way round for closed networks.
    A static token and OAuth together are refused: a shared token would bypass the per-person
    scopes and identities OAuth is there for."""
    make_one = "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"
    if token is not None and oauth:
        return (
            f"both {token_env} and OAuth ([server] oauth_issuer) are set: use one. A shared token would "
            f"bypass OAuth's per-person scopes; unset {token_env} to use OAuth"
        )
    if token is not None and (problem := weak_token(token)) is not None:
        return f"{token_env} is too weak to guard the server: {problem}; make one with {make_one}"
    if token is None and not oauth and not is_loopback(host) and not insecure_no_auth:
        return (
            f"--host {host} is not a loopback address and no authentication is set: anyone who reaches the "
            f"port could use the server and its API keys. Set {token_env} to a random token (clients send "
            f"'Authorization: Bearer <token>'; make one with {make_one}), or configure OAuth (--oauth-issuer "
            "and --oauth-audience), or pass --insecure-no-auth on a closed network"
        )
    return None


def bearer_token(authorization: str) -> bytes:
    """The credentials of an `Authorization: Bearer ...` header (the scheme is case-insensitive,
    RFC 9110 section 11.1); empty for any other scheme."""
    scheme, _, credentials = authorization.strip().partition(" ")
    return credentials.strip().encode() if scheme.lower() == "bearer" else b""


def build_http_app(
    orchestrator: Orchestrator,
    host: str,
    allowed_hosts: list[str],
    allowed_origins: list[str],
    token: str | None,
) -> ASGIApp:
    server = orchestrator.server
    settings = security_settings(host, allowed_hosts, allowed_origins)

    @server.custom_route(HEALTH_PATH, methods=["GET"])  # type: ignore[untyped-decorator]
    async def healthz(request: Request) -> Response:
        pipeline = orchestrator.pipeline
        body: dict[str, object] = {"status": "ok" if pipeline.running else "stopped"}
        if getattr(request.state, "details", True):  # not for a caller without the token (see Guard)
            body |= {
                "worker": pipeline.worker.describe(),
                "in_flight": len(pipeline.ledger.live),
                "uptime_s": pipeline.uptime_s(),
            }
        return JSONResponse(body, status_code=200 if pipeline.running else 503)

    @server.custom_route("/metrics", methods=["GET"])  # type: ignore[untyped-decorator]
    async def metrics(request: Request) -> Response:
        return PlainTextResponse(orchestrator.pipeline.metrics.render(), media_type=PROMETHEUS_CONTENT_TYPE)

    section = orchestrator.config.server
    app: Starlette = server.streamable_http_app(
        streamable_http_path=MCP_PATH,
        transport_security=settings,
        host=host,
        json_response=False,
        stateless_http=section.stateless,
        session_idle_timeout=section.session_idle_s,
        max_sessions=section.max_sessions,
        max_request_body_size=section.max_message_bytes,
    )
    answer_quiet_calls_as_json(server.session_manager)
    quiet = QuietCalls(app, MCP_PATH, section.max_message_bytes)
    checked = CheckedMessages(session_guards(quiet, section), MCP_PATH, section.max_message_bytes)
    # OAuth outside the session caps and the message check: they then see who is calling, and an
    # unauthenticated request is refused before its body is read.
    return Guard(protect(checked, orchestrator.oauth, MCP_PATH, HEALTH_PATH), settings, token)


def session_guards(app: ASGIApp, section: ServerSection) -> ASGIApp:
    """Per-client session caps (the SDK caps only the total) and cancellation of a session
    request whose client closed its stream (the SDK lets it run): see sessions.py and
    disconnect.py. Stateless mode has no sessions, and its requests already end with their POST."""
    if section.stateless:
        return app
    caps = SessionCaps(section.max_sessions, section.max_sessions_per_client, section.session_idle_s)
    return CancelOnDisconnect(SessionLimits(app, MCP_PATH, SessionTable(caps)), MCP_PATH, section.max_message_bytes)
