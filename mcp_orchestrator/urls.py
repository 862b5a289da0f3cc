"""One check for every URL a setting names (a backend's base_url, the OAuth URLs, Redis).

urlsplit accepts more than a client can use: a port that is not a number or is out of range
only raises when `.port` is read, deep inside whoever connects (a traceback at start, or a
server ended by a SIGHUP reload), and a broken IPv6 bracket raises at once. Credentials in a
URL are refused where the URL is not meant to carry them: httpx sends them as Basic
authentication instead of the API key, and they would show wherever the URL is shown.

Depends on the standard library only (config, options and workers all use it). Messages
never quote the URL: it may hold a password.
"""

from __future__ import annotations

from urllib.parse import SplitResult, urlsplit


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
    if port == 0:
        raise ValueError(f"port 0 cannot be connected to (a port is a number from 1 to 65535), e.g. {example}")
    if not credentials and "@" in parts.netloc:
        raise ValueError("must not carry a user name or password (user:password@): put secrets in the environment")
    return parts
