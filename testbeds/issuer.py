"""A local OAuth authorization server for tests and demos: RFC 8414 metadata and a JWKS over
loopback HTTP, and JWT access tokens signed with an RSA key made for this run.

It only issues and publishes: there is no login, authorize or token endpoint to talk to. A
test asks it for a token directly (`issuer.token(audience=..., scopes=[...])`), as if the
team's identity provider had handed one to the MCP client.

    with local_issuer() as issuer:
        token = issuer.token(audience="http://127.0.0.1:8000/mcp", scopes=["orchestrator:read"])
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

JWKS_PATH = "/jwks.json"
METADATA_PATH = "/.well-known/oauth-authorization-server"


def new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@dataclass
class SigningKey:
    kid: str
    private: rsa.RSAPrivateKey = field(default_factory=new_key)

    def jwk(self) -> dict[str, Any]:
        public: dict[str, Any] = json.loads(RSAAlgorithm.to_jwk(self.private.public_key()))
        return public | {"kid": self.kid, "use": "sig", "alg": "RS256"}


class LocalIssuer:
    """Publishes its keys at `url`; `token()` signs with the newest one."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.keys = [SigningKey(f"key-{secrets.token_hex(4)}")]
        self.requests: Counter[str] = Counter()
        """GET requests per path (to see the server cache the keys)."""
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # the stdlib's handler name
                issuer.requests[self.path] += 1
                document = issuer.document(self.path)
                body = json.dumps(document or {"error": "not found"}).encode()
                self.send_response(200 if document is not None else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # tests read their own output
                pass

        self.http = ThreadingHTTPServer((host, 0), Handler)
        self.url = f"http://{host}:{self.http.server_address[1]}"
        """The issuer identifier: what tokens carry in `iss`."""

    def document(self, path: str) -> dict[str, Any] | None:
        if path == METADATA_PATH:
            return {
                "issuer": self.url,
                "jwks_uri": f"{self.url}{JWKS_PATH}",
                "authorization_endpoint": f"{self.url}/authorize",
                "token_endpoint": f"{self.url}/token",
                "response_types_supported": ["code"],
                "grant_types_supported": ["authorization_code", "refresh_token"],
                "code_challenge_methods_supported": ["S256"],
            }
        if path == JWKS_PATH:
            return {"keys": [key.jwk() for key in self.keys]}
        return None

    def rotate(self) -> None:
        """Publish a new key and sign with it from now on (the old one stays published)."""
        self.keys.append(SigningKey(f"key-{secrets.token_hex(4)}"))

    def token(
        self,
        *,
        audience: str | list[str],
        scopes: list[str],
        subject: str = "alice@example.com",
        expires_in_s: int = 600,
        issuer: str | None = None,
        private_key: rsa.RSAPrivateKey | None = None,
        kid: str | None = None,
        **claims: Any,
    ) -> str:
        """A signed access token (RFC 9068 shape). `issuer`, `private_key` and `kid` forge a bad one."""
        now = int(time.time())
        payload = {
            "iss": issuer or self.url,
            "sub": subject,
            "aud": audience,
            "exp": now + expires_in_s,
            "iat": now,
            "scope": " ".join(scopes),
            "client_id": "test-client",
            "jti": secrets.token_hex(8),
        } | claims
        signing = self.keys[-1]
        headers = {"kid": kid or signing.kid, "typ": "at+jwt"}
        return jwt.encode(payload, private_key or signing.private, algorithm="RS256", headers=headers)


@contextmanager
def local_issuer(host: str = "127.0.0.1") -> Iterator[LocalIssuer]:
    issuer = LocalIssuer(host)
    thread = threading.Thread(target=issuer.http.serve_forever, name="local-issuer", daemon=True)
    thread.start()
    try:
        yield issuer
    finally:
        issuer.http.shutdown()
        issuer.http.server_close()
        thread.join()
