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
from mcp_orchestrator.config import DEFAULT_ALLOWED_HOSTS, Config
from mcp_orchestrator.security import REDACTED, host_allowed, is_secret_name, redact, redact_text
from tests.conftest import error_text, make_config, running, status_of

# ---------------------------------------------------------------------------- the host policy

label = st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12)
hostnames = st.lists(label, min_size=1, max_size=4).map(".".join)


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("localhost", True),
        ("LOCALHOST", True),
        ("127.0.0.1", True),
        ("[::1]", True),
        ("api.openai.com", True),
        ("api.openai.com.", True),
        ("api.anthropic.com", True),
        ("evil.com", False),
        ("api.openai.com.evil.com", False),
        ("evilapi.openai.com", False),
        ("localhost.evil.com", False),
        ("127.0.0.2", False),
        ("", False),
    ],
)
def test_default_hosts(host: str, allowed: bool) -> None:
    assert host_allowed(host, DEFAULT_ALLOWED_HOSTS) is allowed


def test_wildcard_means_subdomains_only() -> None:
    allowed = ["*.corp.example"]
    assert host_allowed("llm.corp.example", allowed)
    assert host_allowed("a.b.corp.example", allowed)
    assert not host_allowed("corp.example", allowed)
    assert not host_allowed("evilcorp.example", allowed)
    assert not host_allowed(".corp.example", allowed)


@given(host=hostnames, allowed=st.lists(hostnames, max_size=5))
def test_exact_entries_match_only_themselves(host: str, allowed: list[str]) -> None:
    assert host_allowed(host, allowed) == (host in allowed)


@given(host=hostnames, suffix=hostnames)
def test_an_allowed_host_never_admits_a_longer_name(host: str, suffix: str) -> None:
    assert not host_allowed(f"{host}.{suffix}", [host])
    assert not host_allowed(f"{suffix}{host}", [host])


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


def test_distributed_redis_url_is_refused_without_echoing_it(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Redis sharing is not implemented: saying so beats silently running single-process."""
    path = tmp_path / "config.toml"
    path.write_text('[distributed]\nredis_url = "redis://:TOPSECRET-redis@cache:6379/0"\n', encoding="utf-8")
    code = main(["--config", str(path), "--check-config"])
    out, err = capsys.readouterr()
    assert code == 2
    assert "distributed.redis_url: distributed mode" in err
    assert "TOPSECRET" not in out + err


def test_check_config_prints_resolved_settings_redacted(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(
        '[stages.inference]\nworker = "llama_cpp"\nbase_url = "http://user:TOPSECRET-url@127.0.0.1:9/"\n'
        "[resilience]\ncircuit_breaker_threshold = 3\n"
        '[security]\nallowed_hosts = ["localhost", "*.corp.example"]\n',
        encoding="utf-8",
    )
    code = main(["--config", str(path), "--check-config"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "TOPSECRET" not in out + err
    settings = json.loads(out)
    assert settings["resilience"] == {**Config().resilience.model_dump(), "circuit_breaker_threshold": 3}
    assert settings["security"] == {"allow_configure": True, "allowed_hosts": ["localhost", "*.corp.example"]}


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ("[resilience]\nretry_atempts = 2\n", "resilience.retry_atempts: unknown key; did you mean 'retry_attempts'?"),
        ("[security]\nallowed_host = []\n", "security.allowed_host: unknown key; did you mean 'allowed_hosts'?"),
        ("[resilience]\ncircuit_breaker_success_rate = 1.5\n", "resilience.circuit_breaker_success_rate:"),
        ("[resilience]\nretry_base_ms = 9000\n", "retry_base_ms (9000) must not be greater than retry_max_ms (5000)"),
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
        {"kind": "pool", "replicas": [{"kind": "echo"}, {"kind": "open_ai", "base_url": "http://evil.example/v1"}]},
        {"kind": "fallback", "members": [{"kind": "vllm", "base_url": "http://attacker.test:8000"}]},
    ],
)
async def test_configure_worker_refuses_hosts_outside_allowed_hosts(options: dict[str, Any]) -> None:
    async with running() as (orchestrator, client):
        before = (await status_of(client))["worker"]
        result = await client.call_tool("configure_worker", options)
        message = error_text(result)
        assert "base_url" in message
        assert "not allowed" in message
        assert "allowed_hosts" in message
        assert (await status_of(client))["worker"] == before
        assert orchestrator.pipeline.worker.kind == "echo"


@pytest.mark.anyio
async def test_allowed_hosts_from_the_config_file_replace_the_default() -> None:
    config = make_config(security={"allowed_hosts": ["*.corp.test"]})
    async with running(config) as (_, client):
        result = await client.call_tool("configure_worker", {"kind": "llama_cpp", "base_url": "http://localhost:9"})
        assert "not allowed" in error_text(result)  # the list replaces the default: loopback is out now
        result = await client.call_tool("configure_worker", {"kind": "llama_cpp", "base_url": "http://llm.corp.test:9"})
        assert "not allowed" not in error_text(result)  # allowed; fails later, at the health check


@pytest.mark.anyio
async def test_configure_worker_can_be_disabled() -> None:
    async with running(make_config(security={"allow_configure": False})) as (orchestrator, client):
        message = error_text(await client.call_tool("configure_worker", {"kind": "echo", "model": "other"}))
        assert message.endswith("configure_worker is disabled by [security] allow_configure = false")
        assert orchestrator.pipeline.worker.model == "echo"
