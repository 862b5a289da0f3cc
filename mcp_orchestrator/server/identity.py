"""Who is calling, when OAuth says so: `oauth:<issuer>|<subject>`.

Why issuer and subject together: a subject is unique only within its issuer (RFC 9068), and the
client id is left out on purpose, so one person keeps one identity (their tasks, their session
count) whichever MCP client they connect with. The token itself is never part of it: identities
go into logs and error messages.
"""

from __future__ import annotations

from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken
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
