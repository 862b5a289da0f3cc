"""OAuth resource server: JWT access tokens from one issuer, through the MCP SDK's auth support.

Given `MCPServer(auth=AuthSettings(...), token_verifier=...)`, the SDK answers a request to the
MCP endpoint without a valid token with 401 and a `WWW-Authenticate` header naming the
protected-resource metadata (RFC 9728), one without a required scope with 403
`insufficient_scope`, and puts the verified token in the request's context
(`get_access_token()`, see identity.py). What it leaves to us is here:

- `JwtVerifier` checks a token's signature against the issuer's keys (jwks.py), `iss`, `aud`
  (this server's resource URL, so a token minted for another service is refused), `exp`, `nbf`,
  and reads the scopes (`scope` or `scp`), `sub` and the client id.
- `OAuthGate` sits in front of everything else: it authenticates a request once, before the
  session caps (which then count per subject, sessions.py) and before a body is read, refuses
  `/metrics` and every other path without a token, keeps the details of `/healthz` for token
  holders, and serves the metadata document with the tool scopes listed too (the SDK lists only
  the required ones, and clients ask for the scopes listed there).
- `ResourceServer.refusal` is the per-tool check (scopes.py), called for every tool call.

A token is never logged nor put into an error: refusals say why (expired, wrong audience, ...).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import jwt
from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser, BearerAuthBackend, RequireAuthMiddleware
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.routes import build_resource_metadata_url, create_protected_resource_routes
from mcp.server.auth.settings import AuthSettings
from pydantic import AnyHttpUrl
from starlette.authentication import AuthCredentials
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from mcp_orchestrator.config import ServerSection
from mcp_orchestrator.server.identity import token_identity
from mcp_orchestrator.server.jwks import ALLOWED_ALGORITHMS, IssuerKeys, KeyProblem
from mcp_orchestrator.server.scopes import ToolScopes

log = logging.getLogger(__name__)

LEEWAY_S = 30
"""Clock difference tolerated between the issuer and this server for `exp`, `nbf` and `iat`."""
REQUIRED_CLAIMS = ["exp", "iss", "aud", "sub"]


class JwtVerifier:
    """The SDK's TokenVerifier for JWT access tokens of one issuer, for one audience."""

    def __init__(self, issuer: str, audience: str, keys: IssuerKeys) -> None:
        self.issuer = issuer
        self.audience = audience
        self.keys = keys

    async def verify_token(self, token: str) -> AccessToken | None:
        try:
            claims = await self.claims(token)
        except (jwt.PyJWTError, KeyProblem) as exc:
            log.info("OAuth: bearer token refused: %s", exc)  # the reason only, never the token
            return None
        return AccessToken(
            token=token,
            client_id=str(claims.get("client_id") or claims.get("azp") or ""),
            scopes=token_scopes(claims),
            expires_at=int(claims["exp"]),
            resource=self.audience,
            subject=claims["sub"],
            claims=claims,
        )

    async def claims(self, token: str) -> dict[str, Any]:
        """The claims of a token that passes every check; a PyJWTError or KeyProblem says which failed."""
        header = jwt.get_unverified_header(token)
        algorithm, kid = header.get("alg"), header.get("kid")
        if algorithm not in ALLOWED_ALGORITHMS:
            raise jwt.InvalidAlgorithmError(f"signature algorithm {str(algorithm)[:20]!r} is not accepted")
        if kid is not None and not isinstance(kid, str):
            raise jwt.InvalidTokenError("the key id (kid) is not a string")
        key = await self.keys.key(kid, algorithm)
        claims: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=[algorithm],
            audience=self.audience,
            issuer=self.issuer,
            leeway=LEEWAY_S,
            options={"require": REQUIRED_CLAIMS},
        )
        if not isinstance(claims["sub"], str) or not claims["sub"]:
            raise jwt.InvalidTokenError("the subject (sub) is not a non-empty string")
        return claims


def token_scopes(claims: dict[str, Any]) -> list[str]:
    """The scopes a token grants: `scope`, a space-separated string (RFC 9068), and `scp`, a list
    or string (what Azure AD and Okta issue)."""
    found: list[str] = []
    for claim in (claims.get("scope"), claims.get("scp")):
        if isinstance(claim, str):
            found += claim.split()
        elif isinstance(claim, list):
            found += [item for item in claim if isinstance(item, str)]
    return list(dict.fromkeys(found))


@dataclass(frozen=True)
class ResourceServer:
    """OAuth as [server] configures it: the SDK's settings, the verifier and the tool scopes."""

    settings: AuthSettings
    verifier: JwtVerifier
    scopes: ToolScopes
    token_required: bool
    """HTTP transport: every tool call must come with a token (the SDK already refuses a request
    without one; a call without a token would mean a path round it, so it is refused too)."""

    @property
    def required_scopes(self) -> list[str]:
        return list(self.settings.required_scopes or [])

    @property
    def metadata_url(self) -> str:
        assert self.settings.resource_server_url is not None  # always set by resource_server()
        return str(build_resource_metadata_url(self.settings.resource_server_url))

    def refusal(self, tool: str) -> str | None:
        """Why the caller of the tool call being served may not call `tool`, or None."""
        token = get_access_token()
        if token is None:
            return "this server requires an OAuth access token for every tool call" if self.token_required else None
        refusal = self.scopes.refusal(tool, token.scopes)
        if refusal is not None:  # who tried what, for the operator: the identity, never the token
            log.info("OAuth: %s may not call %s: %s", token_identity(token), tool, refusal.split(";")[0])
        return refusal

    def metadata_route(self) -> Route:
        """The RFC 9728 document, built by the SDK, listing the required scopes and the tool scopes."""
        assert self.settings.resource_server_url is not None
        (route,) = create_protected_resource_routes(
            resource_url=self.settings.resource_server_url,
            authorization_servers=[self.settings.issuer_url],
            scopes_supported=list(dict.fromkeys(self.required_scopes + self.scopes.supported())),
            resource_name="mcp-orchestrator",
        )
        return route


def resource_server(section: ServerSection) -> ResourceServer | None:
    """OAuth as configured, or None when `oauth_issuer` is not set."""
    if section.oauth_issuer is None or section.oauth_audience is None:
        return None
    # Validated from strings, so AuthSettings keeps a path-less issuer without a trailing slash
    # (clients compare it with the issuer's own metadata character for character, RFC 8414).
    settings = AuthSettings.model_validate(
        {
            "issuer_url": section.oauth_issuer,
            "resource_server_url": section.oauth_audience,
            "required_scopes": list(section.oauth_required_scopes) or None,
            "validate_token_resource": False,  # JwtVerifier checks `aud` itself
        }
    )
    keys = IssuerKeys(section.oauth_issuer, section.oauth_jwks_url)
    verifier = JwtVerifier(section.oauth_issuer, section.oauth_audience, keys)
    scopes = ToolScopes(section.oauth_scope_read, section.oauth_scope_use, section.oauth_scope_admin)
    return ResourceServer(settings, verifier, scopes, token_required=section.transport == "http")


class OAuthGate:
    """ASGI middleware in front of the HTTP app (see the module docstring)."""

    def __init__(self, app: ASGIApp, resource: ResourceServer, mcp_path: str, health_path: str) -> None:
        self.app = app
        self.resource = resource
        self.mcp_path = mcp_path
        self.health_path = health_path
        self.metadata = resource.metadata_route()
        self.metadata_path = urlsplit(resource.metadata_url).path
        self.authenticated = AuthenticationMiddleware(self._route, backend=BearerAuthBackend(resource.verifier))
        # The SDK's own check, so the 401/403 answers (and their WWW-Authenticate) are the SDK's.
        self.require = RequireAuthMiddleware(app, resource.required_scopes, AnyHttpUrl(resource.metadata_url))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
        elif scope["path"] == self.metadata_path:  # clients read it before they have a token
            await self.metadata.handle(scope, receive, send)
        else:
            await self.authenticated(scope, receive, send)

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] == self.health_path:  # load balancers ask without a token: the bare status only
            scope.setdefault("state", {})["details"] = self._may_read(scope)
            await self.app(scope, receive, send)
        elif scope["path"] != self.mcp_path and isinstance(scope.get("user"), AuthenticatedUser):
            if self._may_read(scope):  # /metrics and whatever comes later: the read scope at least
                await self.require(scope, receive, send)
            else:
                await self._insufficient(self.resource.scopes.read)(scope, receive, send)
        else:
            await self.require(scope, receive, send)

    def _may_read(self, scope: Scope) -> bool:
        credentials = scope.get("auth")
        if not isinstance(scope.get("user"), AuthenticatedUser) or not isinstance(credentials, AuthCredentials):
            return False
        return self.resource.scopes.granted(credentials.scopes) is not None

    def _insufficient(self, scope_name: str) -> JSONResponse:
        description = f"Required scope: {scope_name}"
        challenge = (
            f'Bearer error="insufficient_scope", error_description="{description}", scope="{scope_name}", '
            f'resource_metadata="{self.resource.metadata_url}"'
        )
        body = {"error": "insufficient_scope", "error_description": description}
        return JSONResponse(body, status_code=403, headers={"WWW-Authenticate": challenge})


def protect(app: ASGIApp, resource: ResourceServer | None, mcp_path: str, health_path: str) -> ASGIApp:
    """`app` behind OAuth when it is configured; unchanged otherwise."""
    return app if resource is None else OAuthGate(app, resource, mcp_path, health_path)
