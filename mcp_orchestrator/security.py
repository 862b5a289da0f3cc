"""Two guards for secrets: where a tool call may send a worker, and what output may show.

`configure_worker` is a tool, so a prompt-injected model can call it. If it could point
a worker that holds an API key at any URL, one call would send the key (and every later
prompt) to an attacker. So a tool call may only use base URLs whose host passes
`host_allowed` against `[security] allowed_hosts` (default: loopback plus each
provider's official API host); the config file and the command line, which the
operator writes, are not limited by it.

`redact` blanks secrets out of anything printed, such as `--check-config`'s resolved
settings: values of secret-looking keys and the password part of URLs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

REDACTED = "[redacted]"

# `api_key`, `auth_token`, `client_secret`, `password`...; not `api_key_env` or
# `auth_token_env`, which name an environment variable rather than hold a value.
_SECRET_NAME = re.compile(r"(^|_)(api_?key|key|token|secret|password|passwd|credentials?)$", re.IGNORECASE)
_URL_WITH_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<password>[^@/\s]+)@", re.I)


def normalize_host(host: str) -> str:
    """Lower case, no brackets around IPv6, no trailing dot: one spelling per host."""
    return host.strip().strip("[]").rstrip(".").lower()


def host_allowed(host: str, allowed: Iterable[str]) -> bool:
    """Whether `host` is one of `allowed`: exact names, or '*.example.com' for any subdomain."""
    host = normalize_host(host)
    if not host:
        return False
    for pattern in allowed:
        pattern = normalize_host(pattern)
        if pattern.startswith("*."):
            if host.endswith(pattern[1:]) and len(host) > len(pattern) - 1:
                return True
        elif host == pattern:
            return True
    return False


def is_secret_name(name: str) -> bool:
    return bool(_SECRET_NAME.search(name)) and not name.lower().endswith("_env")


def redact_secrets(text: str, secrets: Iterable[str]) -> str:
    """`text` with every one of `secrets` replaced: a backend may echo the key it was sent."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return text


def redact_text(text: str) -> str:
    """The password part of any URL in `text` replaced."""
    return _URL_WITH_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:{REDACTED}@", text)


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
