"""Secrets: where a tool call may point a worker, and what --check-config may print.

The end-to-end key-leak test (a run with a recognisable fake key through the real HTTP
workers and faults, every output grepped) is in test_resilience_faults.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mcp_orchestrator.cli import main
from mcp_orchestrator.config import Config
from mcp_orchestrator.errors import ConfigError
from mcp_orchestrator.security import REDACTED, OriginRule, is_secret_name, origin_allowed, redact, redact_text
from tests.conftest import error_text, make_config, running, status_of

# ---------------------------------------------------------------------------- the origin policy

label = st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12)
hostnames = st.lists(label, min_size=1, max_size=4).map(".".join)
DEFAULT_RULES = Config().security.rules()


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("https://api.openai.com/v1", True),
        ("https://API.openai.com./v1", True),
        ("https://api.anthropic.com", True),
        ("http://localhost:8080", True),
        ("http://127.0.0.1:8080/v1", True),
        ("http://localhost:8000", True),
        ("http://api.openai.com/v1", False),  # the provider's API is HTTPS only
        ("https://api.openai.com:8443/v1", False),
        ("http://localhost:18777", False),  # loopback is not "any port" any more
        ("http://localhost", False),
        ("http://127.0.0.2:8080", False),
        ("https://api.openai.com.evil.com/v1", False),
        ("https://evilapi.openai.com/v1", False),
        ("ftp://localhost:8080", False),
        ("", False),
    ],
)
def test_default_origins(url: str, allowed: bool) -> None:
    assert origin_allowed(url, DEFAULT_RULES) is allowed


@pytest.mark.parametrize(
    ("entry", "yes", "no"),
    [
        (
            "llm.corp.test:9000",
            ["http://llm.corp.test:9000", "https://llm.corp.test:9000/v1"],
            ["http://llm.corp.test"],
        ),
        ("llm.corp.test", ["http://llm.corp.test", "https://llm.corp.test"], ["http://llm.corp.test:8080"]),
        ("https://llm.corp.test", ["https://llm.corp.test/v1"], ["http://llm.corp.test", "https://llm.corp.test:1"]),
        (
            "*.corp.test",
            ["https://a.corp.test", "http://a.b.corp.test"],
            ["https://corp.test", "https://evilcorp.test"],
        ),
        ("*.corp.test:8080", ["http://a.corp.test:8080"], ["http://a.corp.test"]),
        ("[::1]:8080", ["http://[::1]:8080"], ["http://[::1]:8081"]),
    ],
)
def test_entry_forms(entry: str, yes: list[str], no: list[str]) -> None:
    rules = [OriginRule.parse(entry)]
    assert all(origin_allowed(url, rules) for url in yes)
    assert not any(origin_allowed(url, rules) for url in no)


@pytest.mark.parametrize("entry", ["http://x/path", "*.", "a:b", "localhost:0", "localhost:99999", "ftp://x", "x/y"])
def test_bad_entries_are_refused_at_load(entry: str) -> None:
    with pytest.raises(ConfigError) as caught:
        make_config(security={"worker_origins": [entry]})
    assert "security.worker_origins" in str(caught.value)


@given(host=hostnames, other=hostnames, port=st.integers(1, 65535))
def test_an_entry_admits_its_own_origin_only(host: str, other: str, port: int) -> None:
    rules = [OriginRule.parse(f"{host}:{port}")]
    assert origin_allowed(f"http://{host}:{port}", rules)
    assert not origin_allowed(f"http://{host}.{other}:{port}", rules)
    assert not origin_allowed(f"http://{other}{host}:{port}", rules) or other + host == host
    assert not origin_allowed(f"http://{host}:{port % 65535 + 1}", rules)


def test_the_old_key_is_refused_with_the_reason() -> None:
    with pytest.raises(ConfigError) as caught:
        make_config(security={"allowed_hosts": ["localhost"]})
    assert "security.allowed_hosts: not a key: renamed to worker_origins" in str(caught.value)


# ---------------------------------------------------------------------------- redaction


@pytest.mark.parametrize(
    ("name", "secret"),
    [
        ("api_key", True),
        ("apikey", True),
        ("auth_token", True),
        ("client_secret", True),
        ("password", True),
        ("api_key_env", False),
        ("auth_token_env", False),
        ("max_tokens", False),
        ("model", False),
    ],
)
def test_secret_names(name: str, secret: bool) -> None:
    assert is_secret_name(name) is secret


def test_redact_blanks_secret_values_and_url_passwords() -> None:
    data: dict[str, Any] = {
        "api_key": "sk-live-123",
        "api_key_env": "OPENAI_API_KEY",
        "token": None,
        "nested": [{"password": "hunter2", "base_url": "http://bob:pw@host:1/v1"}],
        "redis_url": "redis://:s3cret@cache:6379/0",
    }
    assert redact(data) == {
        "api_key": REDACTED,
        "api_key_env": "OPENAI_API_KEY",
        "token": None,
        "nested": [{"password": REDACTED, "base_url": f"http://bob:{REDACTED}@host:1/v1"}],
        "redis_url": f"redis://:{REDACTED}@cache:6379/0",
    }
    assert redact_text("no url here") == "no url here"
    # A user part alone is often a token; a password may hold an "@" of its own.
    assert redact_text("http://sk-hunter2@host:8080/v1") == f"http://{REDACTED}@host:8080/v1"
    assert redact_text("http://u:hun@ter2@host/x") == f"http://u:{REDACTED}@host/x"
    assert redact_text("http://host/a@b") == "http://host/a@b"


def test_a_redis_password_is_never_shown(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """--check-config prints the resolved settings: the Redis URL's password is redacted, and a
    bad URL is refused without echoing it."""
    path = tmp_path / "config.toml"
    path.write_text('[distributed]\nredis_url = "redis://:TOPSECRET-redis@cache:6379/0"\n', encoding="utf-8")
    code = main(["--config", str(path), "--check-config"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "cache:6379" in out and "[redacted]" in out
    assert "TOPSECRET" not in out + err
    path.write_text('[distributed]\nredis_url = "http://:TOPSECRET-redis@cache:6379/0"\n', encoding="utf-8")
    code = main(["--config", str(path), "--check-config"])
    out, err = capsys.readouterr()
    assert code == 2 and "distributed.redis_url" in err
    assert "TOPSECRET" not in out + err


def test_check_config_prints_resolved_settings_redacted(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    inference = '[stages.inference]\nworker = "llama_cpp"\nbase_url = "http://{}127.0.0.1:9/"\n'
    rest = (
        "[resilience]\ncircuit_breaker_threshold = 3\n"
        '[security]\nworker_origins = ["localhost:8080", "*.corp.example"]\n'
    )
    path.write_text(inference.format("") + rest, encoding="utf-8")
    code = main(["--config", str(path), "--check-config"])
    out, err = capsys.readouterr()
    assert code == 0, err
    settings = json.loads(out)
    assert settings["resilience"] == {**Config().resilience.model_dump(), "circuit_breaker_threshold": 3}
    assert settings["security"] == {"allow_configure": None, "worker_origins": ["localhost:8080", "*.corp.example"]}
    # Credentials in a backend's URL are refused (httpx would send them instead of the API
    # key), and the refusal does not show them.
    for credentials in ("user:TOPSECRET-url@", "TOPSECRET-url@", "user:TOP@SECRET-url@"):
        path.write_text(inference.format(credentials) + rest, encoding="utf-8")
        code = main(["--config", str(path), "--check-config"])
        out, err = capsys.readouterr()
        assert (code, out) == (2, "")
        assert "stages.inference.base_url: must not carry a user name or password" in err
        assert "TOP" not in err and "SECRET" not in err, err


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ("[resilience]\nretry_atempts = 2\n", "resilience.retry_atempts: unknown key; did you mean 'retry_attempts'?"),
        ("[security]\nworker_origin = []\n", "security.worker_origin: unknown key; did you mean 'worker_origins'?"),
        ("[resilience]\ncircuit_breaker_success_rate = 1.5\n", "resilience.circuit_breaker_success_rate:"),
        ("[resilience]\nretry_base_ms = 9000\n", "retry_base_ms (9000) must not be greater than retry_max_ms (5000)"),
        (
            "[tasks]\nmax_open_per_caller = 2000\n",
            "max_open_per_caller (2000) must not be greater than max_open (1000)",
        ),
        ("[stages.inference.http]\nconect_timeout_s = 1\n", "stages.inference.http.conect_timeout_s: unknown key"),
        (
            "[stages.inference]\nworker = 'pool'\n[[stages.inference.replicas]]\nkind = 'llama_cpp'\nbse_url = 'x'\n",
            "replicas.0.bse_url: not an option of worker kind 'llama_cpp'",
        ),
        ("[stages.inference]\nworker = 'pool'\n[[stages.inference.replica]]\n", "did you mean 'replicas'?"),
    ],
)
def test_config_errors_name_the_key(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, toml: str, expected: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml, encoding="utf-8")
    code = main(["--config", str(path), "--check-config"])
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""  # nothing resolved, nothing started
    assert expected in err


# ---------------------------------------------------------------------------- configure_worker's guard


@pytest.mark.anyio
@pytest.mark.parametrize(
    "options",
    [
        {"kind": "open_ai", "base_url": "https://evil.example/v1"},
        {"kind": "anthropic", "base_url": "https://api.anthropic.com.evil.example"},
        {"kind": "llama_cpp", "base_url": "http://10.0.0.7:8080"},
        {"kind": "llama_cpp", "base_url": "http://127.0.0.1:18777"},
        {"kind": "pool", "replicas": [{"kind": "echo"}, {"kind": "open_ai", "base_url": "http://evil.example/v1"}]},
        {"kind": "fallback", "members": [{"kind": "vllm", "base_url": "http://attacker.test:8000"}]},
    ],
)
async def test_configure_worker_refuses_origins_nobody_named(options: dict[str, Any]) -> None:
    async with running() as (orchestrator, client):
        before = (await status_of(client))["worker"]
        message = error_text(await client.call_tool("configure_worker", options))
        assert "base_url" in message
        assert "is not an origin configure_worker may reach" in message
        assert "https://api.openai.com" in message and "[security] worker_origins" in message
        assert (await status_of(client))["worker"] == before
        assert orchestrator.pipeline.worker.kind == "echo"


@pytest.mark.anyio
async def test_worker_origins_from_the_config_file_replace_the_default() -> None:
    config = make_config(security={"worker_origins": ["*.corp.test:9"]})
    async with running(config) as (_, client):
        result = await client.call_tool("configure_worker", {"kind": "llama_cpp", "base_url": "http://localhost:8080"})
        assert "is not an origin" in error_text(result)  # the list replaces the default
        result = await client.call_tool("configure_worker", {"kind": "llama_cpp", "base_url": "http://llm.corp.test:9"})
        assert "failed its health check" in error_text(result)  # allowed; no such host, though


@pytest.mark.anyio
async def test_origins_the_operator_wrote_are_reachable(monkeypatch: pytest.MonkeyPatch) -> None:
    """A base URL in the config (a replica's too) or a provider's URL variable names an origin."""
    monkeypatch.setenv("VLLM_URL", "http://gpu-box.invalid:8001")
    config = make_config(
        stages={
            "inference": {
                "worker": "pool",
                "replicas": [{"kind": "echo"}, {"kind": "llama_cpp", "base_url": "http://box.invalid:7000"}],
            }
        },
        security={"worker_origins": []},
    )
    async with running(config) as (_, client):
        for options in (
            {"kind": "llama_cpp", "base_url": "http://box.invalid:7000/v1"},
            {"kind": "llama_cpp", "base_url": "http://gpu-box.invalid:8001"},
            {"kind": "vllm"},  # VLLM_URL itself
        ):
            assert "failed its health check" in error_text(await client.call_tool("configure_worker", options))
        refused = await client.call_tool(
            "configure_worker", {"kind": "llama_cpp", "base_url": "http://box.invalid:7001"}
        )
        assert "is not an origin" in error_text(refused)
        assert "(allowed: http://box.invalid:7000, http://gpu-box.invalid:8001;" in error_text(refused)


@pytest.mark.anyio
async def test_configure_worker_can_be_disabled_and_is_then_not_listed() -> None:
    async with running(make_config(security={"allow_configure": False})) as (orchestrator, client):
        listed = {tool.name for tool in (await client.list_tools()).tools}
        result = await client.call_tool("configure_worker", {"kind": "echo", "model": "other"})
        assert result.is_error
        assert orchestrator.pipeline.worker.model == "echo"
    assert "configure_worker" not in listed


@pytest.mark.anyio
async def test_configure_worker_is_off_by_default_over_http_and_on_over_stdio() -> None:
    async with running(make_config(server={"transport": "http"})) as (_, client):
        assert "configure_worker" not in {tool.name for tool in (await client.list_tools()).tools}
    async with running(make_config(server={"transport": "http"}, security={"allow_configure": True})) as (_, client):
        assert "configure_worker" in {tool.name for tool in (await client.list_tools()).tools}
    async with running() as (_, client):
        assert "configure_worker" in {tool.name for tool in (await client.list_tools()).tools}


def test_redaction_leaves_long_text_alone_and_finds_secrets_in_it() -> None:
    """Error messages quote values through the redaction. The URL pattern once backtracked over
    every run of letters (quadratic: a 300,000-character prompt took minutes); these inputs
    pass through in milliseconds now, and the secrets inside long text are still found."""
    from mcp_orchestrator.security import redact_text

    for text in ["a" * 300_000, "?" + "a" * 300_000, "&" * 300_000, "http://" * 40_000]:
        assert redact_text(text) == text
    padded = "a" * 100_000 + " http://u:pw@h/?api_key=k " + "b" * 100_000
    assert redact_text(padded) == "a" * 100_000 + " http://u:[redacted]@h/?api_key=[redacted] " + "b" * 100_000
