"""API keys: read from environment variables (the config file may only name which one)
and sent only to hosts the operator trusts with them.

A tool call can point a worker at any base_url; if the stored key followed it, one
prompt-injected `configure_worker` call could send the key to an attacker. So a key
goes only to the provider's own host, the host of the provider's base-URL variable
(e.g. OPENAI_BASE_URL), hosts the operator configured, or any host when the worker
was configured by the operator (config file, command line) rather than a tool call.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

KeyStatus = Literal["set", "missing", "withheld", "not needed"]


@dataclass(frozen=True, slots=True)
class ApiKey:
    value: str | None
    env: str | None
    """The variable it comes from, named in 401/403 hints."""
    status: KeyStatus

    def __repr__(self) -> str:  # never show the value, even in a traceback
        return f"ApiKey(env={self.env!r}, status={self.status!r})"


def host_of(url: str) -> str:
    """Lower-case host[:port] of a URL, without credentials."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    return f"{host}:{parts.port}" if parts.port else host


def without_credentials(url: str) -> str:
    """The URL as safe to show: any user:password@ part dropped."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


def resolve_key(
    env_name: str | None,
    env: Mapping[str, str],
    base_url: str,
    *,
    trusted_hosts: Collection[str],
    operator_configured: bool,
    required: bool,
) -> ApiKey:
    """The key (from the environment variable `env_name`) to send to `base_url`, or why there is none."""
    value = (env.get(env_name) if env_name else None) or None
    if value is None:
        return ApiKey(None, env_name, "missing" if required else "not needed")
    if operator_configured or host_of(base_url) in trusted_hosts:
        return ApiKey(value, env_name, "set")
    return ApiKey(None, env_name, "withheld")


def key_hint(key: ApiKey) -> str | None:
    """What to tell a user whose request was refused for want of a key."""
    if key.env is None:
        return None
    if key.status == "withheld":
        return (
            f"the key in {key.env} was not sent because this host is not trusted with it "
            "(put the base_url in the config file to allow it)"
        )
    if key.status in ("missing", "not needed"):
        return f"the {key.env} environment variable is not set"
    return f"check the {key.env} environment variable"
