"""Two guards for secrets: where a tool call may send a worker, and what output may show.

`configure_worker` is a tool, so a prompt-injected model can call it. If it could point a
worker at any URL, one call would read any HTTP service the server can reach (a backend's
reply reaches the model) or send the API key and every later prompt to an attacker. So a
tool call's worker may only reach an origin (scheme, host and port) the operator named:
an entry of `[security] worker_origins` (default: the providers' official HTTPS hosts and
the local llama.cpp and vLLM defaults), a base URL in the config file or on the command
line, or a provider's base-URL environment variable. The config file and the command
line, which the operator writes, are not limited by it.

`redact` blanks secrets out of anything printed, such as `--check-config`'s resolved
settings: values of secret-looking keys and the password part of URLs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

REDACTED = "[redacted]"

# `api_key`, `auth_token`, `client_secret`, `password`...; not `api_key_env` or
# `auth_token_env`, which name an environment variable rather than hold a value.
_SECRET_NAME = re.compile(r"(^|_)(api_?key|key|token|secret|password|passwd|credentials?)$", re.IGNORECASE)
_SECRET_QUERY = re.compile(
    r"(?P<name>[?&;][^=&;#\s\"]{0,40}(?:key|token|secret|passw|sig|auth)[^=&;#\s\"]{0,40})=[^&;#\s\"]*",
    re.IGNORECASE,
)
# Bounded repeats and a scheme that starts a word: linear time on any input (an unbounded
# `[a-z]*://` backtracks quadratically over a long run of letters).
_URL_WITH_CREDENTIALS = re.compile(
    # Up to the last "@" before the path: a password may hold an "@" of its own.
    r"(?<![a-z0-9+.-])(?P<scheme>[a-z][a-z0-9+.-]{0,31}://)(?P<userinfo>[^/\s?#]{1,1024})@",
    re.I,
)


def normalize_host(host: str) -> str:
    """Lower case, no brackets around IPv6, no trailing dot: one spelling per host."""
    return host.strip().strip("[]").rstrip(".").lower()


DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a URL leads: scheme, host and port (the scheme's default port when none is written)."""

    scheme: str
    host: str
    port: int

    @classmethod
    def of(cls, url: str) -> Origin:
        """The origin of an http(s) URL; ValueError when it has no http(s) scheme or no host."""
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in DEFAULT_PORTS or not parts.hostname:
            raise ValueError(f"not an http:// or https:// URL with a host: {url!r}")
        return cls(scheme, normalize_host(parts.hostname), parts.port or DEFAULT_PORTS[scheme])

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = DEFAULT_PORTS[self.scheme] == self.port
        return f"{self.scheme}://{host}" if default else f"{self.scheme}://{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class OriginRule:
    """One entry of an origin allow-list.

    - `https://host[:port]`: exactly that origin;
    - `host:port`: that host on that port, over http or https;
    - `host`: that host on its scheme's default port (80 or 443), never "any port";
    - `*.example.com[:port]`: the same for any subdomain of example.com.
    """

    text: str
    scheme: str | None
    host: str
    port: int | None
    subdomains: bool

    @classmethod
    def parse(cls, entry: str) -> OriginRule:
        """The rule an entry spells; ValueError saying which forms are allowed when it spells none."""
        text = entry.strip()
        scheme: str | None = None
        rest = text
        if "://" in text:
            scheme, _, rest = text.partition("://")
            scheme = scheme.lower()
            if scheme not in DEFAULT_PORTS:
                raise ValueError(f"{entry!r}: the scheme must be http or https")
            if "/" in rest.rstrip("/"):
                raise ValueError(f"{entry!r}: an origin is http(s)://host[:port], without a path")
            rest = rest.rstrip("/")
        parts = urlsplit(f"//{rest}")
        try:
            port = parts.port
        except ValueError:
            port = 0
        if port == 0:
            raise ValueError(f"{entry!r}: the port must be a number from 1 to 65535")
        host = normalize_host(parts.hostname or "")
        subdomains = host.startswith("*.")
        if subdomains:
            host = host[2:]
        if not host or "*" in host or parts.path or parts.query or parts.username:
            raise ValueError(
                f"{entry!r}: expected https://host[:port], host:port, host or *.domain[:port] (a host without a "
                "port allows its scheme's default port only)"
            )
        return cls(text, scheme, host, port, subdomains)

    def allows(self, origin: Origin) -> bool:
        if self.scheme is not None and origin.scheme != self.scheme:
            return False
        port = self.port if self.port is not None else DEFAULT_PORTS[self.scheme or origin.scheme]
        if origin.port != port:
            return False
        if self.subdomains:
            return origin.host.endswith(f".{self.host}")
        return origin.host == self.host


def origin_allowed(url: str, rules: Iterable[OriginRule]) -> bool:
    """Whether `url` leads to an origin one of `rules` allows (False for anything but http(s))."""
    try:
        origin = Origin.of(url)
    except ValueError:
        return False
    return any(rule.allows(origin) for rule in rules)


def is_secret_name(name: str) -> bool:
    return bool(_SECRET_NAME.search(name)) and not name.lower().endswith("_env")


def redact_secrets(text: str, secrets: Iterable[str]) -> str:
    """`text` with every one of `secrets` replaced: a backend may echo the key it was sent."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return text


def redact_text(text: str) -> str:
    """The credentials of any URL in `text` replaced (its password, or a user part alone: often
    a token), and the values of secret-looking query parameters (`?api_key=…`, `&token=…`)."""
    text = _URL_WITH_CREDENTIALS.sub(_without_credentials, text)
    return _SECRET_QUERY.sub(lambda m: f"{m['name']}={REDACTED}", text)


def _without_credentials(match: re.Match[str]) -> str:
    """user:password@ keeps the user name; a user part alone (often a token) goes whole."""
    user, colon, _ = match["userinfo"].partition(":")
    return f"{match['scheme']}{user}:{REDACTED}@" if colon else f"{match['scheme']}{REDACTED}@"


def redact(data: Any) -> Any:
    """A copy of JSON-like `data` with secret-looking keys' values and URL passwords blanked."""
    if isinstance(data, Mapping):
        return {
            key: (REDACTED if value not in (None, "") else value)
            if isinstance(key, str) and is_secret_name(key)
            else redact(value)
            for key, value in data.items()
        }
    if isinstance(data, list | tuple):
        return [redact(item) for item in data]
    if isinstance(data, str):
        return redact_text(data)
    return data
