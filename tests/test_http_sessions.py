"""Streamable-HTTP sessions: one client cannot lock the others out, abandoned sessions go
away, and a legacy (session) request whose client disconnects is cancelled.

The caps run against the real console script. Every test client is on loopback, so "another
client" is a second loopback source address (127.0.0.2, which Linux routes to lo); the
accounting itself is also tested with ASGI scopes whose "client" differs. The cancellation
tests serve a blocking worker in this process, so they can see the backend call cancelled.
"""

from __future__ import annotations

import json
import socket
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from mcp import Client
from mcp.shared.exceptions import MCPError
from starlette.types import Message, Scope

from mcp_orchestrator import Orchestrator
from mcp_orchestrator.config import config_from_mapping
from mcp_orchestrator.errors import ConfigError
from mcp_orchestrator.server.sessions import SessionCaps, SessionLimits, SessionTable, client_key
from tests.conftest import wait_for
from tests.support_admission import GatedWorker
from tests.support_processes import HttpServer, http_server
from tests.support_served import served
from tests.test_http import leaves

pytestmark = pytest.mark.anyio

TIMEOUT_S = 30.0
LEGACY_VERSION = "2025-11-25"
OTHER_LOOPBACK = "127.0.0.2"
HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": LEGACY_VERSION, "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}},
}


def can_bind(address: str) -> bool:
    try:
        with socket.socket() as sock:
            sock.bind((address, 0))
    except OSError:
        return False
    return True


needs_second_loopback = pytest.mark.skipif(
    not can_bind(OTHER_LOOPBACK), reason=f"cannot use {OTHER_LOOPBACK} as a source address here"
)


def server_with(tmp_path: Path, **server: Any) -> AbstractContextManager[HttpServer]:
    lines = ["[server]", *(f"{key} = {json.dumps(value)}" for key, value in server.items())]
    config = tmp_path / "sessions.toml"
    config.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return http_server("--config", str(config), workdir=tmp_path)


def open_session(server: HttpServer, source: str = "127.0.0.1") -> httpx2.Response:
    """A raw `initialize` POST from `source`: the request that opens a session."""
    transport = httpx2.HTTPTransport(local_address=source)
    with httpx2.Client(transport=transport, timeout=10.0) as http:
        return http.post(server.mcp_url, json=INITIALIZE, headers=HEADERS)


def session_id(response: httpx2.Response) -> str:
    assert response.status_code == 200, response.text
    return response.headers["mcp-session-id"]


def session_request(server: HttpServer, method: str, sid: str) -> httpx2.Response:
    with httpx2.Client(timeout=10.0) as http:
        headers = HEADERS | {"mcp-session-id": sid, "mcp-protocol-version": LEGACY_VERSION}
        body = {"jsonrpc": "2.0", "id": 7, "method": "ping"} if method == "POST" else None
        return http.request(method, server.mcp_url, json=body, headers=headers)


def refusal_message(response: httpx2.Response) -> str:
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["jsonrpc"] == "2.0" and body["id"] is None
    return str(body["error"]["message"])


# ---------------------------------------------------------------------------- caps, real server


@needs_second_loopback
def test_one_address_over_its_cap_is_refused_while_another_gets_in(tmp_path: Path) -> None:
    with server_with(tmp_path, max_sessions_per_client=3) as server:
        opened = [session_id(open_session(server)) for _ in range(3)]
        refused = open_session(server)
        other = open_session(server, OTHER_LOOPBACK)
        still_open = session_request(server, "POST", opened[0])
    assert len(set(opened)) == 3
    assert refused.status_code == 429, refused.text
    message = refusal_message(refused)
    assert "127.0.0.1" in message
    assert "at most 3 per client address (server.max_sessions_per_client)" in message
    assert "server.session_idle_s" in message
    assert int(refused.headers["retry-after"]) >= 1
    assert "mcp-session-id" not in refused.headers
    assert session_id(other)
    assert still_open.status_code == 200, still_open.text  # the address's own sessions keep working


async def test_an_sdk_client_over_the_cap_gets_the_error_naming_the_key(tmp_path: Path) -> None:
    with server_with(tmp_path, max_sessions_per_client=1) as server:
        session_id(open_session(server))
        with anyio.fail_after(TIMEOUT_S), pytest.raises(BaseException) as caught:
            async with Client(server.mcp_url, mode="legacy") as client:
                await client.list_tools()
    errors = [leaf for leaf in leaves(caught.value) if isinstance(leaf, MCPError)]
    assert errors, caught.value
    assert "at most 1 per client address (server.max_sessions_per_client)" in str(errors[0])


@needs_second_loopback
def test_the_total_cap_is_refused_with_its_key(tmp_path: Path) -> None:
    with server_with(tmp_path, max_sessions=3, max_sessions_per_client=2) as server:
        for source in ("127.0.0.1", "127.0.0.1", OTHER_LOOPBACK):
            session_id(open_session(server, source))
        refused = open_session(server, OTHER_LOOPBACK)
    assert refused.status_code == 503, refused.text
    assert "at most 3 for all clients together (server.max_sessions)" in refusal_message(refused)


def test_deleting_a_session_frees_its_slot(tmp_path: Path) -> None:
    with server_with(tmp_path, max_sessions_per_client=2) as server:
        first, _ = (session_id(open_session(server)) for _ in range(2))
        refused = open_session(server)
        deleted = session_request(server, "DELETE", first)
        gone = session_request(server, "POST", first)
        reopened = open_session(server)
    assert refused.status_code == 429
    assert deleted.status_code == 200, deleted.text
    assert gone.status_code == 404
    assert session_id(reopened)


def test_idle_sessions_expire_and_free_their_slots(tmp_path: Path) -> None:
    with server_with(tmp_path, max_sessions_per_client=2, session_idle_s=1) as server:
        opened = [session_id(open_session(server)) for _ in range(2)]
        deadline = time.monotonic() + TIMEOUT_S
        while (reopened := open_session(server)).status_code == 429:  # refused until the two expire
            assert time.monotonic() < deadline, "idle sessions never freed their slots"
            time.sleep(0.1)
        expired = [session_request(server, "POST", sid).status_code for sid in opened]
    assert session_id(reopened)
    assert expired == [404, 404]  # the SDK closed them: their ids are unknown now


def test_stateless_mode_opens_no_sessions(tmp_path: Path) -> None:
    with server_with(tmp_path, stateless=True, max_sessions_per_client=1) as server:
        answers = [open_session(server) for _ in range(3)]
    assert [answer.status_code for answer in answers] == [200, 200, 200]
    assert all("mcp-session-id" not in answer.headers for answer in answers)


def test_per_client_cap_cannot_exceed_the_total() -> None:
    with pytest.raises(ConfigError, match=r"max_sessions_per_client \(5\) must not be greater than max_sessions"):
        config_from_mapping({"server": {"max_sessions": 4, "max_sessions_per_client": 5}})


# ---------------------------------------------------------------------------- accounting, ASGI level


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def scope_from(client: str | None, session: str | None = None, method: str = "POST") -> Scope:
    headers = [(b"mcp-session-id", session.encode())] if session else []
    return {
        "type": "http",
        "method": method,
        "path": "/mcp",
        "headers": headers,
        "client": None if client is None else (client, 50000),
    }


class FakeSdk:
    """Stands in for the SDK's app: opens a numbered session per request without an id,
    answers 200 to known ids and deletes on DELETE, 404 otherwise."""

    def __init__(self) -> None:
        self.next = 0
        self.open: set[str] = set()

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        sid = dict(scope["headers"]).get(b"mcp-session-id", b"").decode() or None
        headers: list[tuple[bytes, bytes]] = []
        status = 200
        if sid is None:
            self.next += 1
            sid = f"s{self.next}"
            self.open.add(sid)
            headers = [(b"mcp-session-id", sid.encode())]
        elif sid not in self.open:
            status = 404
        elif scope["method"] == "DELETE":
            self.open.discard(sid)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def call(app: SessionLimits, scope: Scope) -> tuple[int, dict[bytes, bytes]]:
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent[0]["status"], dict(sent[0].get("headers", []))


def limited(max_sessions: int = 10, per_client: int = 2, idle_s: float = 5.0) -> tuple[SessionLimits, FakeClock]:
    clock = FakeClock()
    table = SessionTable(SessionCaps(max_sessions, per_client, idle_s), clock)
    return SessionLimits(FakeSdk(), "/mcp", table), clock


async def test_accounting_is_per_client_address() -> None:
    app, _ = limited(per_client=2)
    statuses = [(await call(app, scope_from("10.0.0.1")))[0] for _ in range(3)]
    others = [(await call(app, scope_from("10.0.0.2")))[0] for _ in range(2)]
    assert statuses == [200, 200, 429]
    assert others == [200, 200]
    assert app.table.held("10.0.0.1") == 2 and app.table.total == 4


async def test_accounting_frees_deleted_expired_and_forgotten_sessions() -> None:
    app, clock = limited(per_client=2, idle_s=5.0)
    _, first = await call(app, scope_from("10.0.0.1"))
    await call(app, scope_from("10.0.0.1"))
    await call(app, scope_from("10.0.0.1", first[b"mcp-session-id"].decode(), "DELETE"))
    assert app.table.held("10.0.0.1") == 1
    await call(app, scope_from("10.0.0.1"))
    status, headers = await call(app, scope_from("10.0.0.1"))
    assert status == 429
    assert headers[b"retry-after"] == b"5"
    clock.t += 5.0  # the SDK closes both idle sessions now
    assert (await call(app, scope_from("10.0.0.1")))[0] == 200
    assert app.table.held("10.0.0.1") == 1
    sdk = app.app
    assert isinstance(sdk, FakeSdk)
    sdk.open.clear()  # the SDK forgot a session (it crashed): its 404 frees the slot
    await call(app, scope_from("10.0.0.1", f"s{sdk.next}"))
    assert app.table.held("10.0.0.1") == 0


async def test_a_session_in_use_does_not_expire() -> None:
    app, clock = limited(per_client=1, idle_s=5.0)
    _, headers = await call(app, scope_from("10.0.0.1"))
    assert app.table.begin(headers[b"mcp-session-id"].decode())  # e.g. an open GET stream
    clock.t += 60.0
    assert (await call(app, scope_from("10.0.0.1")))[0] == 429


def test_client_key_groups_an_ipv6_host_and_unwraps_mapped_ipv4() -> None:
    assert client_key(scope_from("2001:db8:1:2:aaaa::1")) == client_key(scope_from("2001:db8:1:2:bbbb::9"))
    assert client_key(scope_from("2001:db8:1:2::1")) == "2001:db8:1:2::/64"
    assert client_key(scope_from("2001:db8:1:3::1")) != client_key(scope_from("2001:db8:1:2::1"))
    assert client_key(scope_from("::ffff:10.1.2.3")) == "10.1.2.3"
    assert client_key(scope_from(None)) == "unknown"


# ---------------------------------------------------------------------------- cancellation on disconnect


class LegacySession:
    """A raw session-mode (2025-11-25) client: initialize once, then one POST per request."""

    def __init__(self, http: httpx2.AsyncClient, url: str) -> None:
        self.http = http
        self.url = url
        self.headers = dict(HEADERS)

    async def start(self) -> None:
        response = await self.http.post(self.url, json=INITIALIZE, headers=self.headers)
        assert response.status_code == 200, response.text
        self.headers["mcp-protocol-version"] = LEGACY_VERSION
        if "mcp-session-id" in response.headers:  # none in stateless mode
            self.headers["mcp-session-id"] = response.headers["mcp-session-id"]
        initialized = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        assert (await self.http.post(self.url, json=initialized, headers=self.headers)).status_code == 202

    def infer(self, request_id: int, prompt: str) -> Any:
        """The POST of an `infer` call, as a stream the caller opens and may close mid-call."""
        body = {"jsonrpc": "2.0", "id": request_id, "method": "tools/call"}
        body["params"] = {"name": "infer", "arguments": {"prompt": prompt}}
        return self.http.stream("POST", self.url, json=body, headers=self.headers)


async def answer_of(response: httpx2.Response) -> dict[str, Any]:
    async for line in response.aiter_lines():
        if line.startswith("data: ") and '"id"' in line:
            return dict(json.loads(line.removeprefix("data: ")))
    raise AssertionError("the stream ended without an answer")


async def test_closing_a_session_calls_stream_cancels_it_and_its_backend_call() -> None:
    worker = GatedWorker()
    orchestrator = Orchestrator(config_from_mapping({"server": {"transport": "http"}}), worker)
    with anyio.fail_after(TIMEOUT_S):
        async with served(orchestrator) as url, httpx2.AsyncClient(timeout=TIMEOUT_S) as http:
            session = LegacySession(http, url)
            await session.start()
            async with session.infer(2, "kept") as kept, session.infer(3, "abandoned") as abandoned:
                assert kept.status_code == abandoned.status_code == 200
                await wait_for(lambda: worker.calls == 2)
                await abandoned.aclose()  # the client goes away mid-call
                await wait_for(lambda: orchestrator.status().totals.cancelled == 1)
                assert worker.cancelled == 1
                assert worker.prompts == ["kept", "abandoned"] or worker.prompts == ["abandoned", "kept"]
                assert len(orchestrator.pipeline.ledger.live) == 1  # the other call of the session runs on
                worker.open()
                answer = await answer_of(kept)
            totals = orchestrator.status().totals
            assert totals.completed == 1 and totals.cancelled == 1 and totals.in_flight == 0
            assert worker.finished == 1
            assert orchestrator.pipeline.reconciles()
    assert answer["id"] == 2
    assert answer["result"]["structuredContent"]["text"] == "kept"


async def test_deleting_the_session_cancels_its_running_call() -> None:
    worker = GatedWorker()
    orchestrator = Orchestrator(config_from_mapping({"server": {"transport": "http"}}), worker)
    with anyio.fail_after(TIMEOUT_S):
        async with served(orchestrator) as url, httpx2.AsyncClient(timeout=TIMEOUT_S) as http:
            session = LegacySession(http, url)
            await session.start()
            async with session.infer(2, "orphaned") as running:
                await wait_for(lambda: worker.calls == 1)
                assert (await http.delete(url, headers=session.headers)).status_code == 200
                await wait_for(lambda: orchestrator.status().totals.cancelled == 1)
                await running.aread()
            assert worker.cancelled == 1
            assert orchestrator.status().totals.in_flight == 0
            assert orchestrator.pipeline.reconciles()


async def test_closing_a_stateless_calls_stream_cancels_it() -> None:
    worker = GatedWorker()
    config = config_from_mapping({"server": {"transport": "http", "stateless": True}})
    orchestrator = Orchestrator(config, worker)
    with anyio.fail_after(TIMEOUT_S):
        async with served(orchestrator) as url, httpx2.AsyncClient(timeout=TIMEOUT_S) as http:
            session = LegacySession(http, url)
            await session.start()
            assert "mcp-session-id" not in session.headers
            async with session.infer(2, "abandoned") as abandoned:
                await wait_for(lambda: worker.calls == 1)
            await wait_for(lambda: orchestrator.status().totals.cancelled == 1)
            assert worker.cancelled == 1
            assert orchestrator.status().totals.in_flight == 0
            assert orchestrator.pipeline.reconciles()
    assert abandoned.status_code == 200


async def test_stateless_mode_sends_progress_on_the_calls_stream(tmp_path: Path) -> None:
    progress: list[str] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append(message or "")

    with server_with(tmp_path, stateless=True) as server, anyio.fail_after(TIMEOUT_S):
        async with Client(server.mcp_url, mode="legacy") as client:
            result = await client.call_tool(
                "infer", {"prompt": "streamed without a session"}, progress_callback=on_progress
            )
    assert result.content[0].text == "streamed without a session"
    assert progress == ["streamed", " without", " a", " session"]
