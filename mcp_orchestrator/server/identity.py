"""Who is calling: with OAuth, `oauth:<issuer>|<subject>`; and whose a task or background
request is (`owner_of`).

Why issuer and subject together: a subject is unique only within its issuer (RFC 9068), and the
client id is left out on purpose, so one person keeps one identity (their tasks, their session
count) whichever MCP client they connect with. The token itself is never part of it: identities
go into logs and error messages.
"""

from __future__ import annotations

import hashlib
from typing import Any

from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken
from mcp.server.context import ServerRequestContext
from mcp.server.streamable_http import MCP_SESSION_ID_HEADER
from starlette.types import Scope


def token_identity(token: AccessToken) -> str | None:
    """The identity a verified access token carries; None without an issuer or a subject."""
    issuer = (token.claims or {}).get("iss")
    if not issuer or not token.subject:
        return None
    return f"oauth:{issuer}|{token.subject}"


def caller_identity() -> str | None:
    """The identity of the caller of the tool call (or HTTP request) being served: from the OAuth
    access token the SDK verified for it, or None without OAuth (stdio, a static token, loopback)."""
    token = get_access_token()
    return None if token is None else token_identity(token)


def request_identity(scope: Scope) -> str | None:
    """The identity of an HTTP request an authentication middleware has already run on."""
    user = scope.get("user")
    return token_identity(user.access_token) if isinstance(user, AuthenticatedUser) else None


def owner_of(context: ServerRequestContext[Any, Any]) -> str:
    """Who a job belongs to: only the same caller may read or cancel it.

    The token's identity first (an OAuth subject, or the bearer token itself, hashed, so
    a client that reconnects keeps its jobs; everyone holding one shared static token is one
    caller), then the HTTP session. Without HTTP the caller is the process's own: a stdio
    server has exactly one client, its parent (in-memory clients of a library user share
    that owner). An HTTP call with none of these can only reach a loopback server without
    authentication (a non-loopback bind needs it), stateless: every such caller is one, the
    operator's machine.
    """
    identity = caller_identity()
    if identity is not None:
        return identity
    request = context.request
    headers = getattr(request, "headers", None)
    if headers is None:
        return "local"
    authorization = headers.get("authorization", "")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return "token:" + hashlib.sha256(token.strip().encode()).hexdigest()[:32]
    session = headers.get(MCP_SESSION_ID_HEADER)
    if session:
        return f"session:{session}"
    return "http:anonymous"
