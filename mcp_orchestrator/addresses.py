"""Checks of the addresses a setting names: URLs (a backend's base_url, the OAuth URLs, Redis),
the Host and Origin header values HTTP accepts, and the address it binds.

urlsplit accepts more than a client can use: a port that is not a number or is out of range
only raises when `.port` is read, deep inside whoever connects (a traceback at start, or a
server ended by a SIGHUP reload), and a broken IPv6 bracket raises at once. Credentials in a
URL are refused where the URL is not meant to carry them: httpx sends them as Basic
authentication instead of the API key, and they would show wherever the URL is shown.

Depends on the standard library only (config, options, workers and the HTTP server all use
it). Messages never quote the value: a URL may hold a password, and the config's error
adds the value itself where it is safe to show.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import SplitResult, urlsplit

# A host as a Host or Origin header carries it: a name (underscores too: Docker Compose
# service names have them), an IPv4 address, or an IPv6 address in brackets.
_NAME = r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?)"
_PORT = r"(:(?P<port>\*|[0-9]{1,5}))?"
_HOST_ENTRY = re.compile(f"{_NAME}{_PORT}")
# Browsers and editors send other schemes too (vscode-webview://, app://, chrome-extension://).
_ORIGIN_ENTRY = re.compile(f"[A-Za-z][A-Za-z0-9+.-]*://{_NAME}{_PORT}")
_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


def check_url(value: str, *, schemes: tuple[str, ...], example: str, credentials: bool = False) -> SplitResult:
    """`value` split, or ValueError saying what is wrong with it."""
    try:
        parts = urlsplit(value)
        port = parts.port  # raises for a port that is not a number from 0 to 65535
    except ValueError:
        raise ValueError(
            f"is not a URL a client can use (a port must be a number from 1 to 65535, an IPv6 host goes in "
            f"[brackets]), e.g. {example}"
        ) from None
    allowed = " or ".join(f"{scheme}://" for scheme in schemes)
    if parts.scheme not in schemes or not parts.hostname:
        raise ValueError(f"must be a URL with a host, starting with {allowed}, e.g. {example}")
    if not _usable_host(parts.hostname):
        raise ValueError(
            f"has a host a client cannot use (letters, digits, '-' and '_' between dots, an IP address, or an "
            f"international name written as xn--...), e.g. {example}"
        )
    if port == 0:
        raise ValueError(f"port 0 cannot be connected to (a port is a number from 1 to 65535), e.g. {example}")
    if not credentials and "@" in parts.netloc:
        raise ValueError("must not carry a user name or password (user:password@): put secrets in the environment")
    return parts


def _usable_host(host: str) -> bool:
    """An IP address, or a name of ASCII labels (httpx refuses what IDNA cannot encode, but only
    at the first request)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return all(_LABEL.fullmatch(label) for label in host.removesuffix(".").split("."))
    return True


def check_oauth_url(url: str, *, https_only: bool) -> None:
    """An OAuth URL: http(s) with a host, no credentials, query or fragment; with `https_only`,
    plain http only on loopback (keys fetched over plain http could be swapped by anyone on the path)."""
    parts = check_url(url, schemes=("http", "https"), example="https://login.example.com/")
    if parts.query or parts.fragment:
        raise ValueError("must not have a query or fragment")
    if https_only and parts.scheme == "http" and not is_loopback(parts.hostname or ""):
        raise ValueError("must be https:// (plain http only for a loopback address)")


def is_loopback(host: str) -> bool:
    """localhost, or a loopback IP address (an IPv6 one with or without its brackets)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_entry(value: str) -> str:
    """A Host header value HTTP accepts, as the SDK matches it (exactly, or any port with :*)."""
    if not _header_value(_HOST_ENTRY, value):
        raise ValueError(
            "must be a Host header value: a host name or IP address (IPv6 in [brackets]), optionally :port "
            "or :* (any port), e.g. myserver.lan or myserver.lan:8000"
        )
    return value


def origin_entry(value: str) -> str:
    """An Origin header value HTTP accepts, as the SDK matches it."""
    if not _header_value(_ORIGIN_ENTRY, value):
        raise ValueError(
            "must be an Origin header value: a scheme such as https://, a host, optionally :port or :* "
            "(any port), nothing after it, e.g. https://app.example.com"
        )
    return value


def _header_value(pattern: re.Pattern[str], value: str) -> bool:
    match = pattern.fullmatch(value)
    port = match.group("port") if match else None
    return match is not None and (port in (None, "*") or 1 <= int(port) <= 65535)


def bind_host(value: str) -> str:
    """An address to listen on: an IP address (IPv6 without brackets) or a host name."""
    address, _, scope = value.partition("%")
    try:
        if ipaddress.ip_address(address).version == 4 and scope:
            raise ValueError("a scope (%...) is for IPv6 addresses only")
    except ValueError:
        labels = value.removesuffix(".").split(".")
        if not value or not all(_LABEL.fullmatch(label) for label in labels):
            raise ValueError(
                "must be an IP address (IPv6 without brackets) or a host name to listen on, "
                "e.g. 127.0.0.1, 0.0.0.0, :: or myserver.lan"
            ) from None
    return value
