"""An attacker who controls text Claude reads cannot use configure_worker to read a local HTTP
service: the service's origin is refused before any request, and even a service the operator
allowed never has its page shown (only a provider's own error shape is). Over the in-memory
client, a real stdio server and a real HTTP server; redirects are never followed."""

from __future__ import annotations

import http.server
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client

from tests.conftest import error_text, make_config, running, status_of
from tests.support_processes import http_server, stdio_params

pytestmark = pytest.mark.anyio

SECRET = "INTERNAL-SECRET-TOKEN-123"
PAGE = f"<html><body>root:x:0:0 {SECRET}</body></html>".encode()
SESSION_TIMEOUT_S = 60.0


@dataclass
class LocalService:
    """A loopback HTTP service that answers every request the same way, and counts them."""

    status: int = 403
    body: bytes = PAGE
    headers: dict[str, str] = field(default_factory=lambda: {"content-type": "text/html"})
    requests: list[str] = field(default_factory=list)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextmanager
def local_service(**options: Any) -> Iterator[LocalService]:
    service = LocalService(**options)

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self) -> None:
            service.requests.append(f"{self.command} {self.path}")
            self.send_response(service.status)
            for name, value in service.headers.items():
                self.send_header(name, value)
            self.send_header("content-length", str(len(service.body)))
            self.end_headers()
            self.wfile.write(service.body)

        do_GET = do_POST = _answer

        def log_message(self, format: str, *args: Any) -> None:
            return None

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    service.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield service
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.mark.parametrize("kind", ["llama_cpp", "open_ai", "vllm", "anthropic"])
async def test_a_service_nobody_named_is_refused_before_any_request(kind: str) -> None:
    with local_service() as service:
        async with running() as (_, client):
            result = await client.call_tool("configure_worker", {"kind": kind, "base_url": service.url})
    message = error_text(result)
    assert "is not an origin configure_worker may reach" in message
    assert SECRET not in message
    assert service.requests == []  # not even a health check: no port scanning either


@pytest.mark.parametrize("kind", ["llama_cpp", "open_ai", "vllm", "anthropic"])
@pytest.mark.parametrize("content", ["html", "json"])
async def test_an_allowed_service_never_has_its_page_shown(kind: str, content: str) -> None:
    body = PAGE if content == "html" else b'{"detail": "%s"}' % SECRET.encode()
    headers = {"content-type": "text/html" if content == "html" else "application/json"}
    with local_service(body=body, headers=headers) as service:
        config = make_config(security={"worker_origins": [f"127.0.0.1:{service.port}"]})
        async with running(config) as (_, client):
            result = await client.call_tool("configure_worker", {"kind": kind, "base_url": service.url})
            after = await status_of(client)
    message = error_text(result)
    assert "failed its health check" in message and "(HTTP 403)" in message
    assert f"of {len(body)} bytes (not shown)" in message
    assert SECRET not in message
    assert after["worker"]["kind"] == "echo"


async def test_a_redirect_is_not_followed() -> None:
    with local_service(status=200, body=b'{"status": "ok"}') as elsewhere:
        redirect = {"location": f"{elsewhere.url}/health", "content-type": "text/plain"}
        with local_service(status=302, body=b"moved", headers=redirect) as service:
            config = make_config(security={"worker_origins": [f"127.0.0.1:{service.port}"]})
            async with running(config) as (_, client):
                result = await client.call_tool("configure_worker", {"kind": "llama_cpp", "base_url": service.url})
    assert "(HTTP 302)" in error_text(result)
    assert service.requests == ["GET /health"]
    assert elsewhere.requests == []  # the key and the request stay with the origin that was allowed


async def test_a_providers_own_error_still_reaches_the_caller() -> None:
    body = b'{"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}}'
    with local_service(status=401, body=body, headers={"content-type": "application/json"}) as service:
        config = make_config(security={"worker_origins": [f"127.0.0.1:{service.port}"]})
        async with running(config) as (_, client):
            result = await client.call_tool("configure_worker", {"kind": "open_ai", "base_url": f"{service.url}/v1"})
    assert "invalid_request_error: Incorrect API key provided" in error_text(result)


async def test_over_stdio_the_attack_is_refused() -> None:
    with local_service() as service, tempfile.TemporaryFile("w+") as errlog:
        with anyio.fail_after(SESSION_TIMEOUT_S):
            async with Client(stdio_params("--worker", "echo")) as client:
                result = await client.call_tool("configure_worker", {"kind": "llama_cpp", "base_url": service.url})
        errlog.seek(0)
        logged = errlog.read()
    assert "is not an origin configure_worker may reach" in error_text(result)
    assert SECRET not in error_text(result) + logged
    assert service.requests == []


async def test_over_http_configure_worker_is_not_offered_and_refuses_when_it_is(tmp_path: Path) -> None:
    with local_service() as service:
        with http_server("--worker", "echo", workdir=tmp_path) as server:
            async with Client(server.mcp_url) as client:
                listed = {tool.name for tool in (await client.list_tools()).tools}
        assert "configure_worker" not in listed  # off by default over HTTP: one client would change it for all
        config = tmp_path / "on.toml"
        config.write_text("[security]\nallow_configure = true\n", encoding="utf-8")
        with http_server("--worker", "echo", "--config", str(config), workdir=tmp_path) as server:
            async with Client(server.mcp_url) as client:
                result = await client.call_tool("configure_worker", {"kind": "llama_cpp", "base_url": service.url})
            logged = server.stderr()
    assert "is not an origin configure_worker may reach" in error_text(result)
    assert SECRET not in error_text(result) + logged
    assert service.requests == []
