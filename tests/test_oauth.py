"""OAuth for team use: JWT access tokens from a local issuer (testbeds/issuer.py, an RSA key made
per run, its JWKS and metadata over loopback HTTP), checked by the real console script serving
streamable HTTP, called through a real MCP client as a remote Claude would."""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.server.auth.provider import AccessToken

from mcp_orchestrator.cli import EXIT_USAGE, main
from mcp_orchestrator.errors import ConfigError
from mcp_orchestrator.server import jwks
from mcp_orchestrator.server.identity import token_identity
from mcp_orchestrator.server.jwks import IssuerKeys
from mcp_orchestrator.server.oauth import JwtVerifier
from mcp_orchestrator.server.scopes import TOOL_CLASSES, ScopeClass, ToolScopes, needed_class
from testbeds.issuer import LocalIssuer, local_issuer, new_key
from tests.conftest import make_config, running
from tests.support_processes import HttpServer, free_port, http_server
from tests.support_tasks import TaskHandle, TasksClient, call, poll_until_ended

SESSION_TIMEOUT_S = 60.0
REQUIRED = "mcp"
READ, USE, ADMIN = "orchestrator:read", "orchestrator:use", "orchestrator:admin"
STRONG_TOKEN = "Zq7rX2pLm9WvK4tN8sB3yH6c"
INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}},
}
MCP_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


@dataclass
class OAuthServer:
    server: HttpServer
    issuer: LocalIssuer
    audience: str

    @property
    def metadata_url(self) -> str:
        return f"{self.server.base_url}/.well-known/oauth-protected-resource/mcp"

    def token(self, *scopes: str, **options: Any) -> str:
        return self.issuer.token(audience=self.audience, scopes=list(scopes), **options)

    def post_initialize(self, token: str | None) -> httpx2.Response:
        headers = MCP_HEADERS | ({"Authorization": f"Bearer {token}"} if token else {})
        with httpx2.Client(timeout=10.0) as http:
            return http.post(self.server.mcp_url, json=INITIALIZE, headers=headers)

    def get(self, path: str, token: str | None = None) -> httpx2.Response:
        with httpx2.Client(timeout=10.0) as http:
            return http.get(
                f"{self.server.base_url}{path}", headers={"Authorization": f"Bearer {token}"} if token else {}
            )


@contextmanager
def oauth_server(issuer: LocalIssuer, workdir: Path, *args: str, server_toml: str = "") -> Iterator[OAuthServer]:
    """The console script with OAuth from `issuer`; its audience names the port it will serve
    (chosen before the start, as an operator writes the public URL into the config)."""
    port = free_port()
    audience = f"http://127.0.0.1:{port}/mcp"
    config = workdir / f"oauth-{port}.toml"
    config.write_text(
        f'[server]\noauth_issuer = "{issuer.url}"\noauth_audience = "{audience}"\n'
        f'oauth_required_scopes = ["{REQUIRED}"]\n{server_toml}\n[security]\nallow_configure = true\n',
        encoding="utf-8",
    )
    with http_server("--config", str(config), "--port", str(port), *args, workdir=workdir) as running_server:
        yield OAuthServer(running_server, issuer, audience)


@pytest.fixture(scope="module")
def issuer() -> Iterator[LocalIssuer]:
    with local_issuer() as running_issuer:
        yield running_issuer


@pytest.fixture(scope="module")
def team(issuer: LocalIssuer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OAuthServer]:
    workdir = tmp_path_factory.mktemp("oauth")
    with oauth_server(issuer, workdir, "--worker", "echo", "--model", "oauth-echo", "--log-level", "info") as server:
        yield server


def bearer_client(team: OAuthServer, token: str, **options: Any) -> tuple[httpx2.AsyncClient, Client]:
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=30.0)
    return http, Client(streamable_http_client(team.server.mcp_url, http_client=http), **options)


def challenge(response: httpx2.Response) -> dict[str, str]:
    """The parameters of a `WWW-Authenticate: Bearer k="v", ...` header."""
    scheme, _, rest = response.headers["www-authenticate"].partition(" ")
    assert scheme == "Bearer"
    pairs = (part.strip().split("=", 1) for part in rest.split('", '))
    return {key: value.strip('"') for key, value in pairs}


def unsigned(claims: dict[str, Any]) -> str:
    """A token with `alg: none` (no signature at all)."""

    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}."


# ---------------------------------------------------------------------------- the HTTP answers


def test_the_metadata_document_names_the_issuer_and_every_scope(team: OAuthServer) -> None:
    response = team.get("/.well-known/oauth-protected-resource/mcp")
    assert response.status_code == 200
    assert response.json() == {
        "resource": team.audience,
        "authorization_servers": [team.issuer.url],
        "scopes_supported": [REQUIRED, READ, USE, ADMIN],
        "bearer_methods_supported": ["header"],
        "resource_name": "mcp-orchestrator",
    }


def test_a_request_without_a_token_gets_401_naming_the_metadata(team: OAuthServer) -> None:
    for response in (team.post_initialize(None), team.get("/metrics"), team.get("/anything-else")):
        assert response.status_code == 401
        assert challenge(response)["error"] == "invalid_token"
        assert challenge(response)["resource_metadata"] == team.metadata_url


@pytest.mark.parametrize(
    "forge",
    [
        pytest.param(lambda t: t.token(REQUIRED, READ, expires_in_s=-3600), id="expired"),
        pytest.param(
            lambda t: t.issuer.token(audience="http://127.0.0.1:1/mcp", scopes=[REQUIRED, READ]), id="wrong-audience"
        ),
        pytest.param(lambda t: t.token(REQUIRED, READ, issuer="http://127.0.0.1:1"), id="wrong-issuer"),
        pytest.param(lambda t: t.token(REQUIRED, READ, private_key=new_key()), id="bad-signature"),
        pytest.param(lambda t: t.token(REQUIRED, READ, kid="no-such-key"), id="unknown-key"),
        pytest.param(
            lambda t: unsigned({"iss": t.issuer.url, "aud": t.audience, "sub": "mallory", "exp": 2**40}), id="unsigned"
        ),
        pytest.param(lambda t: "not-a-jwt", id="garbage"),
    ],
)
def test_a_bad_token_gets_401_with_the_challenge(team: OAuthServer, forge: Any) -> None:
    token = forge(team)
    response = team.post_initialize(token)
    assert response.status_code == 401
    assert challenge(response) == {
        "error": "invalid_token",
        "error_description": "Authentication required",
        "resource_metadata": team.metadata_url,
    }
    assert token not in team.server.stderr()


def test_a_token_without_a_required_scope_gets_403(team: OAuthServer) -> None:
    response = team.post_initialize(team.token(READ, USE, ADMIN))  # every tool scope, but not "mcp"
    assert response.status_code == 403
    assert challenge(response)["error"] == "insufficient_scope"
    assert challenge(response)["resource_metadata"] == team.metadata_url


def test_a_valid_token_opens_a_session(team: OAuthServer) -> None:
    response = team.post_initialize(team.token(REQUIRED, READ))
    assert response.status_code == 200
    assert "mcp-session-id" in response.headers


def test_metrics_need_a_tool_scope_and_healthz_details_a_token(team: OAuthServer) -> None:
    assert team.get("/metrics", team.token(REQUIRED, READ)).status_code == 200
    refused = team.get("/metrics", team.token(REQUIRED))
    assert refused.status_code == 403
    assert challenge(refused)["scope"] == READ
    assert team.get("/healthz").json() == {"status": "ok"}
    assert team.get("/healthz", team.token(REQUIRED, "other")).json() == {"status": "ok"}
    detailed = team.get("/healthz", team.token(REQUIRED, ADMIN)).json()
    assert detailed["worker"]["model"] == "oauth-echo"


# ---------------------------------------------------------------------------- tools by scope, through a real client


@pytest.mark.anyio
async def test_a_valid_token_calls_a_tool(team: OAuthServer) -> None:
    http, client = bearer_client(team, team.token(REQUIRED, USE))
    with anyio.fail_after(SESSION_TIMEOUT_S):
        async with http, client:
            result = await client.call_tool("infer", {"prompt": "hello from the team"})
    assert not result.is_error, result.content
    assert result.content[0].text == "hello from the team"


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_a_read_only_token_reads_and_is_refused_the_rest(team: OAuthServer, mode: str) -> None:
    http, client = bearer_client(team, team.token(REQUIRED, READ), mode=mode)
    with anyio.fail_after(SESSION_TIMEOUT_S):
        async with http, client:
            names = {tool.name for tool in (await client.list_tools()).tools}
            before = (await client.call_tool("pipeline_status", {})).structured_content
            letters = await client.call_tool("dead_letters", {})
            configure = await client.call_tool("configure_worker", {"kind": "echo", "model": "hijacked"})
            infer = await client.call_tool("infer", {"prompt": "spend the keys"})
            after = (await client.call_tool("pipeline_status", {})).structured_content
    assert "configure_worker" in names
    assert not letters.is_error
    assert configure.is_error
    assert "configure_worker needs the OAuth scope orchestrator:admin" in configure.content[0].text
    assert "only grants orchestrator:read" in configure.content[0].text
    assert infer.is_error
    assert "infer needs the OAuth scope orchestrator:use or orchestrator:admin" in infer.content[0].text
    assert before is not None and after is not None
    assert after["worker"] == before["worker"]
    assert after["worker"]["model"] == "oauth-echo"
    assert after["totals"]["submitted"] == before["totals"]["submitted"]
    assert f"OAuth: oauth:{team.issuer.url}|alice@example.com may not call configure_worker" in team.server.stderr()


@pytest.mark.anyio
async def test_admin_includes_use_and_read(team: OAuthServer) -> None:
    http, client = bearer_client(team, team.token(REQUIRED, ADMIN))
    with anyio.fail_after(SESSION_TIMEOUT_S):
        async with http, client:
            status = await client.call_tool("pipeline_status", {})
            answer = await client.call_tool("infer", {"prompt": "admin can use"})
            configured = await client.call_tool("configure_worker", {"kind": "echo", "model": "oauth-echo"})
    assert not status.is_error and not answer.is_error
    assert not configured.is_error, configured.content


async def outcome(client: Client, tool: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """A tools/call's result as a dict, whether it was answered inline or as a task (then polled)."""
    answer = await call(client, tool, arguments)
    if isinstance(answer, TaskHandle):
        state = await poll_until_ended(client, answer.task_id)
        assert state.result is not None, state
        return state.result
    return answer.model_dump(by_alias=True)


@pytest.mark.anyio
async def test_scopes_hold_for_calls_run_as_tasks(team: OAuthServer) -> None:
    """A task runs in the background: it still sees the token of the call that started it."""
    results = []
    for scope in (READ, USE):
        http, client = bearer_client(team, team.token(REQUIRED, scope), extensions=[TasksClient()])
        with anyio.fail_after(SESSION_TIMEOUT_S):
            async with http, client:
                results.append(await outcome(client, "infer", {"prompt": "as a task"}))
    refused, answered = results
    assert refused["isError"] is True
    assert "infer needs the OAuth scope orchestrator:use" in refused["content"][0]["text"]
    assert answered.get("isError") is not True, answered
    assert answered["content"][0]["text"] == "as a task"


# ---------------------------------------------------------------------------- identity: session caps and logs


def test_session_caps_count_per_subject_and_logs_name_it(issuer: LocalIssuer, tmp_path: Path) -> None:
    """Every client here has the same address: only the subject tells alice from bob."""
    with oauth_server(issuer, tmp_path, "--log-level", "debug", server_toml="max_sessions_per_client = 1") as server:
        alice = server.token(REQUIRED, READ, subject="alice")
        first = server.post_initialize(alice)
        second = server.post_initialize(server.token(REQUIRED, READ, subject="alice"))
        bob = server.post_initialize(server.token(REQUIRED, READ, subject="bob"))
        refused = server.post_initialize(server.token(REQUIRED, READ, expires_in_s=-3600))
        stderr = server.server.stderr()
    identity = f"oauth:{issuer.url}|alice"
    assert first.status_code == 200
    assert second.status_code == 429
    assert identity in second.json()["error"]["message"]
    assert bob.status_code == 200
    assert refused.status_code == 401
    assert f"too many open MCP sessions from {identity}" in stderr
    assert "OAuth: bearer token refused: Signature has expired" in stderr
    assert alice not in stderr and "eyJ" not in stderr  # no token, nor any part of one


def test_the_metrics_port_is_behind_oauth_too(issuer: LocalIssuer, tmp_path: Path) -> None:
    metrics_port = free_port()
    with oauth_server(issuer, tmp_path, "--metrics-port", str(metrics_port)) as server:
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        with httpx2.Client(timeout=10.0) as http:
            anonymous = http.get(url)
            read = http.get(url, headers={"Authorization": f"Bearer {server.token(REQUIRED, READ)}"})
    assert anonymous.status_code == 401
    assert challenge(anonymous)["resource_metadata"] == server.metadata_url
    assert read.status_code == 200
    assert "orchestrator_requests_total" in read.text


def test_the_identity_is_issuer_and_subject() -> None:
    token = AccessToken(token="t", client_id="c", scopes=[], subject="bob", claims={"iss": "https://idp"})
    assert token_identity(token) == "oauth:https://idp|bob"
    assert token_identity(token.model_copy(update={"subject": None})) is None


# ---------------------------------------------------------------------------- the scope map


def test_every_tool_has_a_scope_class_and_unknown_tools_need_admin() -> None:
    assert needed_class("some_future_tool") is ScopeClass.admin
    scopes = ToolScopes(READ, USE, ADMIN)
    assert scopes.refusal("pipeline_status", [READ]) is None
    assert scopes.refusal("some_future_tool", [USE]) is not None
    assert scopes.refusal("some_future_tool", [ADMIN]) is None
    assert ToolScopes("x", "x", "x").refusal("configure_worker", ["x"]) is None  # one scope for all: allowed


@pytest.mark.anyio
async def test_every_listed_tool_is_mapped() -> None:
    async with running(make_config(security={"allow_configure": True})) as (_, client):
        names = {tool.name for tool in (await client.list_tools()).tools}
    assert names <= set(TOOL_CLASSES)


# ---------------------------------------------------------------------------- the verifier and its key cache


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.anyio
async def test_keys_are_cached_and_a_rotation_is_picked_up(issuer: LocalIssuer) -> None:
    audience = "https://mcp.example.test/mcp"
    clock = Clock()
    verifier = JwtVerifier(issuer.url, audience, IssuerKeys(issuer.url, None, clock=clock))
    token = issuer.token(audience=audience, scopes=[READ])
    for _ in range(50):
        assert await verifier.verify_token(token) is not None
    assert verifier.keys.fetches == 1
    for index in range(20):  # made-up key ids do not make it fetch again and again
        assert await verifier.verify_token(issuer.token(audience=audience, scopes=[], kid=f"made-up-{index}")) is None
    assert verifier.keys.fetches == 1
    issuer.rotate()
    try:
        rotated = issuer.token(audience=audience, scopes=[READ])
        clock.now += jwks.MIN_REFETCH_S
        verified = await verifier.verify_token(rotated)
    finally:
        issuer.keys.pop()
    assert verified is not None and verified.subject == "alice@example.com"
    assert verifier.keys.fetches == 2


@pytest.mark.anyio
async def test_an_unreachable_issuer_refuses_tokens_and_says_why(caplog: pytest.LogCaptureFixture) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    verifier = JwtVerifier(dead, "https://mcp.example.test/mcp", IssuerKeys(dead, None))
    with local_issuer() as other:
        token = other.token(audience="https://mcp.example.test/mcp", scopes=[READ], issuer=dead)
    with caplog.at_level(logging.INFO), anyio.fail_after(jwks.FETCH_TIMEOUT_S * 2):
        assert await verifier.verify_token(token) is None
    assert f"OAuth: cannot fetch the signing keys of {dead}" in caplog.text
    assert "could not be fetched" in caplog.text
    assert token not in caplog.text


# ---------------------------------------------------------------------------- start-up checks (nothing binds)


def run_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


NON_LOOPBACK = ("--transport", "http", "--host", "0.0.0.0", "--allowed-host", "mcp.example.test")
OAUTH_FLAGS = ("--oauth-issuer", "https://login.example.test", "--oauth-audience", "https://mcp.example.test/mcp")


def test_a_non_loopback_bind_with_oauth_is_accepted(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--check-config runs every start-up check and exits before anything binds."""
    monkeypatch.delenv("MCP_ORCHESTRATOR_TOKEN", raising=False)
    code, out, err = run_main(capsys, *NON_LOOPBACK, *OAUTH_FLAGS, "--check-config")
    assert code == 0, err
    server = json.loads(out)["server"]
    assert server["oauth_issuer"] == "https://login.example.test"
    assert server["oauth_audience"] == "https://mcp.example.test/mcp"


def test_a_non_loopback_bind_without_authentication_is_refused_naming_oauth(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MCP_ORCHESTRATOR_TOKEN", raising=False)
    code, out, err = run_main(capsys, *NON_LOOPBACK, "--check-config")
    assert (code, out) == (EXIT_USAGE, "")
    assert "no authentication is set" in err and "--oauth-issuer" in err and "--insecure-no-auth" in err


@pytest.mark.parametrize("token", [STRONG_TOKEN, "changeme"])
def test_a_static_token_and_oauth_together_are_refused(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, token: str
) -> None:
    monkeypatch.setenv("MCP_ORCHESTRATOR_TOKEN", token)
    code, out, err = run_main(capsys, *NON_LOOPBACK, *OAUTH_FLAGS, "--check-config")
    assert (code, out) == (EXIT_USAGE, "")
    assert "both MCP_ORCHESTRATOR_TOKEN and OAuth" in err
    assert token not in err


def test_a_weak_static_token_is_still_refused(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MCP_ORCHESTRATOR_TOKEN", "changeme")
    code, out, err = run_main(capsys, "--transport", "http", "--check-config")
    assert (code, out) == (EXIT_USAGE, "")
    assert "MCP_ORCHESTRATOR_TOKEN is too weak" in err and "changeme" not in err


@pytest.mark.parametrize(
    ("server", "message"),
    [
        ({"oauth_issuer": "https://idp.test"}, "oauth_issuer needs oauth_audience"),
        ({"oauth_audience": "https://mcp.test/mcp"}, "oauth_audience needs oauth_issuer"),
        (
            {"oauth_issuer": "http://idp.test", "oauth_audience": "https://m.test/mcp"},
            "server.oauth_issuer: must be https",
        ),
        (
            {"oauth_issuer": "idp.test", "oauth_audience": "https://m.test/mcp"},
            "server.oauth_issuer: must be a URL with a host, starting with http:// or https://",
        ),
        ({"oauth_scope_read": "read all"}, "server.oauth_scope_read: String should match pattern"),
        ({"oauth_required_scopes": ['a"b']}, "server.oauth_required_scopes.0: String should match pattern"),
    ],
)
def test_bad_oauth_settings_name_the_key(server: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        make_config(server=server)
    assert message in str(caught.value)
