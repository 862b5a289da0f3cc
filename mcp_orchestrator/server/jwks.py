"""The signing keys of an OAuth issuer: found from its metadata, fetched over HTTP(S), cached.

Why our own fetch rather than PyJWT's PyJWKClient: that client uses blocking urllib, which would
stall the event loop (and every MCP client on it) while the issuer is slow; this one uses httpx2
under one deadline for the whole fetch. The keys are fetched again every REFRESH_S, and when a
token names a key id we do not hold (the issuer rotated its keys) at most once per MIN_REFETCH_S,
so a flood of tokens with made-up key ids cannot make us hammer the issuer. A failed fetch keeps
the keys we had: an issuer that is briefly down does not lock the whole team out.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import anyio
import httpx2
from jwt import PyJWK, PyJWTError

log = logging.getLogger(__name__)

ALLOWED_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
"""Public-key signatures only: never `none`, never an HMAC (a public key used as an HMAC secret
would let anyone who read the JWKS sign tokens)."""
FETCH_TIMEOUT_S = 10.0
REFRESH_S = 3600.0
MIN_REFETCH_S = 30.0
MAX_DOCUMENT_BYTES = 1024 * 1024
METADATA_PATHS = ("/.well-known/oauth-authorization-server", "/.well-known/openid-configuration")


class KeyProblem(Exception):
    """Why a token's signing key cannot be had (unknown key id, issuer unreachable, ...)."""


def metadata_urls(issuer: str) -> list[str]:
    """Where an issuer publishes its metadata: RFC 8414 inserts the well-known path before the
    issuer's own path, OpenID Connect Discovery appends it; both are tried, in that order."""
    parts = urlsplit(issuer)
    path = parts.path.rstrip("/")
    origin = f"{parts.scheme}://{parts.netloc}"
    oauth, openid = METADATA_PATHS
    return [f"{origin}{oauth}{path}", f"{origin}{path}{openid}"]


class IssuerKeys:
    """The JWKS of one issuer, by key id. `jwks_url` None: discovered from the issuer's metadata."""

    def __init__(self, issuer: str, jwks_url: str | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.issuer = issuer
        self.jwks_url = jwks_url
        self._clock = clock
        self._keys: dict[str, dict[str, Any]] = {}
        """JWKs by key id ("" for a key without one)."""
        self._parsed: dict[tuple[str, str], PyJWK] = {}
        self._attempted_at: float | None = None
        self._lock = anyio.Lock()
        self.fetches = 0
        """Fetches of the key set that succeeded (tests and the operator's debugging)."""

    async def key(self, kid: str | None, algorithm: str) -> PyJWK:
        """The key that verifies a token signed with `algorithm` under key id `kid`."""
        if self._due(REFRESH_S):
            await self._refresh()
        jwk = self._find(kid)
        if jwk is None and self._due(MIN_REFETCH_S):  # rotated since the last fetch? look again, rarely
            await self._refresh()
            jwk = self._find(kid)
        if jwk is None and not self._keys:
            raise KeyProblem(f"the signing keys of {self.issuer} could not be fetched (the reason is logged)")
        if jwk is None:
            raise KeyProblem(f"the issuer publishes no signing key with id {kid[:64] if kid else kid!r}")
        return self._parse(jwk, algorithm)

    def _find(self, kid: str | None) -> dict[str, Any] | None:
        if kid is None:  # a token without a key id is accepted only from an issuer with one key
            return next(iter(self._keys.values())) if len(self._keys) == 1 else None
        return self._keys.get(kid)

    def _parse(self, jwk: dict[str, Any], algorithm: str) -> PyJWK:
        """The key bound to the algorithm its JWK names (or, without `alg`, the token's): PyJWT
        then refuses a token whose header names another algorithm."""
        chosen = str(jwk.get("alg") or algorithm)
        if chosen != algorithm:
            raise KeyProblem(f"the token is signed with {algorithm[:20]!r} but its key is for {chosen!r}")
        cache_key = (str(jwk.get("kid", "")), chosen)
        parsed = self._parsed.get(cache_key)
        if parsed is None:
            if chosen not in ALLOWED_ALGORITHMS:
                raise KeyProblem(f"the signing key is for algorithm {chosen!r}, which is not accepted")
            try:
                parsed = PyJWK(jwk, algorithm=chosen)
            except PyJWTError as exc:
                raise KeyProblem(f"the signing key does not fit algorithm {chosen}: {exc}") from None
            self._parsed[cache_key] = parsed
        return parsed

    def _due(self, age_s: float) -> bool:
        return self._attempted_at is None or self._clock() - self._attempted_at >= age_s

    async def _refresh(self) -> None:
        seen = self._attempted_at
        async with self._lock:
            if self._attempted_at != seen:  # another request fetched while this one waited
                return
            self._attempted_at = self._clock()
            try:
                keys = await self._fetch()
            except KeyProblem as exc:
                held = f"; keeping the {len(self._keys)} keys fetched before" if self._keys else ""
                log.warning("OAuth: cannot fetch the signing keys of %s: %s%s", self.issuer, exc, held)
                return
            self._keys, self._parsed = keys, {}
            self.fetches += 1

    async def _fetch(self) -> dict[str, dict[str, Any]]:
        try:
            with anyio.fail_after(FETCH_TIMEOUT_S):
                async with httpx2.AsyncClient(timeout=FETCH_TIMEOUT_S, follow_redirects=False) as http:
                    if self.jwks_url is None:
                        self.jwks_url = await self._discover(http)
                    return signing_keys(await get_json(http, self.jwks_url))
        except TimeoutError:
            raise KeyProblem(f"no answer within {FETCH_TIMEOUT_S:g} s") from None

    async def _discover(self, http: httpx2.AsyncClient) -> str:
        """The issuer's `jwks_uri`, from metadata whose `issuer` is exactly ours (RFC 8414 section 3.3:
        metadata naming another issuer must not be used)."""
        problems = []
        for url in metadata_urls(self.issuer):
            try:
                metadata = await get_json(http, url)
            except KeyProblem as exc:
                problems.append(str(exc))
                continue
            jwks_uri = metadata.get("jwks_uri")
            if metadata.get("issuer") != self.issuer:
                problems.append(f"{url} names issuer {metadata.get('issuer')!r}, not {self.issuer!r}")
            elif not isinstance(jwks_uri, str) or urlsplit(jwks_uri).scheme not in ("http", "https"):
                problems.append(f"{url} has no http(s) jwks_uri")
            else:
                return jwks_uri
        raise KeyProblem(f"no usable issuer metadata ({'; '.join(problems)}); or set [server] oauth_jwks_url")


async def get_json(http: httpx2.AsyncClient, url: str) -> dict[str, Any]:
    try:
        response = await http.get(url, headers={"Accept": "application/json"})
    except httpx2.HTTPError as exc:
        raise KeyProblem(f"{url}: {type(exc).__name__}: {exc}") from None
    if response.status_code != 200:
        raise KeyProblem(f"{url} answered HTTP {response.status_code}")
    if len(response.content) > MAX_DOCUMENT_BYTES:
        raise KeyProblem(f"{url} answered more than {MAX_DOCUMENT_BYTES} bytes")
    try:
        document = response.json()
    except ValueError:
        raise KeyProblem(f"{url} did not answer JSON") from None
    if not isinstance(document, dict):
        raise KeyProblem(f"{url} did not answer a JSON object")
    return document


def signing_keys(jwks: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The signature keys of a JWKS by key id; encryption keys and symmetric keys are left out."""
    entries = jwks.get("keys")
    if not isinstance(entries, list):
        raise KeyProblem("the JWKS has no 'keys' list")
    keys: dict[str, dict[str, Any]] = {}
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("kty") not in ("RSA", "EC", "OKP"):
            continue
        if entry.get("use", "sig") != "sig":
            continue
        keys[str(entry.get("kid", ""))] = entry
    return keys
