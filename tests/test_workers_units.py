"""The worker layer's pure parts: error taxonomy, Retry-After, parameter layering, specs,
key trust, the hash ring, and pool/fallback choices over real (echo) workers."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from mcp_orchestrator.errors import WorkerSpecError
from mcp_orchestrator.models import GenerationParams, Message
from mcp_orchestrator.security import OriginRule
from mcp_orchestrator.workers.base import WorkerError, WorkerRequest, layer_params
from mcp_orchestrator.workers.echo import EchoWorker
from mcp_orchestrator.workers.hashring import HashRing
from mcp_orchestrator.workers.keys import resolve_key, without_credentials
from mcp_orchestrator.workers.pool import PoolWorker, Strategy
from mcp_orchestrator.workers.registry import BuildContext, build_worker
from mcp_orchestrator.workers.taxonomy import (
    backend_message,
    is_retryable_status,
    parse_retry_after,
    redact,
    status_error,
)

pytestmark = pytest.mark.anyio


def request(prompt: str = "one two three", session_id: str | None = None) -> WorkerRequest:
    return WorkerRequest((Message(role="user", content=prompt),), GenerationParams(), session_id=session_id)


# ---------------------------------------------------------------------------- taxonomy


@pytest.mark.parametrize("status", [408, 409, 429, 500, 502, 503, 504, 529])
def test_transient_statuses_are_retryable(status: int) -> None:
    assert is_retryable_status(status)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_client_errors_are_permanent(status: int) -> None:
    assert not is_retryable_status(status)


def test_retry_after_in_seconds_milliseconds_and_http_date() -> None:
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after({"retry-after": "7"}) == 7.0
    assert parse_retry_after({"retry-after": "1.5"}) == 1.5
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert parse_retry_after({"retry-after": "Thu, 01 Jan 2026 12:00:30 GMT"}, now) == 30.0
    assert parse_retry_after({"retry-after": "Thu, 01 Jan 2026 11:00:00 GMT"}, now) == 0.0  # in the past
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({}) is None


def test_status_error_names_status_message_and_retry_after_but_never_the_key() -> None:
    body = b'{"error": {"message": "Incorrect API key provided: sk-live-123", "type": "invalid_request_error"}}'
    error = status_error("open_ai at https://api.openai.com/v1", 401, body, {}, ["sk-live-123"], "check OPENAI_API_KEY")
    text = str(error)
    assert not error.retryable and error.status == 401
    assert "open_ai at https://api.openai.com/v1 (HTTP 401), permanent" in text
    assert "Incorrect API key provided" in text and "check OPENAI_API_KEY" in text
    assert "sk-live-123" not in text

    limited = status_error(
        "anthropic", 429, b'{"type":"error","error":{"type":"rate_limit_error","message":"slow"}}', {"retry-after": "3"}
    )
    assert limited.retryable and limited.retry_after_s == 3.0
    assert "rate_limit_error: slow" in str(limited) and "retry after 3 s" in str(limited)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"error": {"message": "bad", "type": "invalid_request_error"}}', "invalid_request_error: bad"),
        (
            b'{"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}',
            "overloaded_error: Overloaded",
        ),
        (b'{"object": "error", "message": "model not found", "code": 404}', "model not found"),  # vLLM
        (b'{"error": {"code": 400, "message": "bad\\u0007 input\\n\\u202eok", "type": "x"}}', "x: bad input ok"),
        # Anything else is described, never shown: it may be any service's page.
        (b'{"detail": "root:x:0:0 SECRET"}', "JSON body without an error message of 31 bytes (not shown)"),
        (b"<html>root:x:0:0 SECRET</html>", "non-JSON body of 30 bytes (not shown)"),
        (b"", "empty body"),
    ],
)
def test_backend_message_shows_only_a_providers_error_shape(body: bytes, expected: str) -> None:
    assert backend_message("backend", body) == expected


def test_a_providers_message_is_cut_short() -> None:
    body = json.dumps({"error": {"message": "x" * 5000}}).encode()
    assert len(backend_message("backend", body)) <= 300


def test_redact_and_credentials_in_urls() -> None:
    assert redact("key sk-1 and sk-1 again", ["sk-1", ""]) == "key [redacted] and [redacted] again"
    assert without_credentials("https://user:pw@proxy.example/v1") == "https://proxy.example/v1"


# ---------------------------------------------------------------------------- parameters and specs


def test_layers_give_the_call_precedence_then_the_worker_then_the_config() -> None:
    call = GenerationParams(temperature=0.1)
    worker = GenerationParams(temperature=0.5, max_tokens=50, stop=("END",))
    config = GenerationParams(temperature=0.7, max_tokens=1024, top_p=0.9)
    assert layer_params(call, worker, config) == GenerationParams(
        temperature=0.1, max_tokens=50, top_p=0.9, stop=("END",)
    )


def test_worker_defaults_sit_between_the_call_and_the_config() -> None:
    context = BuildContext(base=GenerationParams(max_tokens=1024, temperature=0.7))
    worker: Any = build_worker("llama_cpp", {"base_url": "http://127.0.0.1:1", "temperature": 0.2}, context)
    assert worker.defaults == GenerationParams(max_tokens=1024, temperature=0.2)
    _, params = worker.prepare(WorkerRequest((Message(role="user", content="x"),), GenerationParams(max_tokens=5)))
    assert params == GenerationParams(max_tokens=5, temperature=0.2)


@pytest.mark.parametrize(
    ("kind", "options", "fragments"),
    [
        ("gpt", {}, ["kind: unknown worker kind 'gpt'", "open_ai", "llama_cpp", "pool"]),
        ("open_ai", {"base_url": "ftp://x"}, ["base_url", "http:// or https://", "ftp://x"]),
        ("open_ai", {"base_url": "http://x/v1?key=1"}, ["base_url", "query string"]),
        ("anthropic", {"seed": 3}, ["seed: not an option of worker kind 'anthropic'", "temperature"]),
        ("echo", {"base_url": "http://x"}, ["base_url: not an option of worker kind 'echo'"]),
        ("vllm", {"temperature": 3}, ["temperature", "less than or equal to 2", "3"]),
        ("pool", {"replicas": []}, ["replicas", "at least 1"]),
        ("pool", {"replicas": [{"kind": "echo"}], "strategy": "random"}, ["strategy", "round_robin", "random"]),
        (
            "pool",
            {"replicas": [{"kind": "echo"}, {"kind": "llama_cpp", "base_url": "nope"}]},
            ["replicas.1.base_url", "http://"],
        ),
        ("fallback", {"members": [{"base_url": "http://x"}]}, ["members.0.kind: required"]),
    ],
)
def test_bad_options_are_named_with_what_is_allowed(kind: str, options: dict[str, Any], fragments: list[str]) -> None:
    with pytest.raises(WorkerSpecError) as caught:
        build_worker(kind, options)
    for fragment in fragments:
        assert fragment in str(caught.value), f"{fragment!r} not in {caught.value}"


def test_a_tool_call_cannot_choose_the_key_variable_or_an_unlisted_origin() -> None:
    rules = tuple(OriginRule.parse(entry) for entry in ("localhost:8080", "*.corp.example:8000"))
    untrusted = BuildContext(trusted=False, origins=rules, env={"VLLM_URL": "http://gpu9.lan:7000"})
    with pytest.raises(WorkerSpecError, match="api_key_env: can only be set in the config file"):
        build_worker("open_ai", {"api_key_env": "AWS_SECRET_ACCESS_KEY"}, untrusted)
    with pytest.raises(WorkerSpecError, match=r"replicas\.0\.api_key_env: can only be set in the config file"):
        build_worker("pool", {"replicas": [{"kind": "open_ai", "api_key_env": "X"}]}, untrusted)
    with pytest.raises(WorkerSpecError, match=r"base_url: https://evil\.example is not an origin"):
        build_worker("open_ai", {"base_url": "https://evil.example/v1"}, untrusted)
    with pytest.raises(WorkerSpecError, match=r"https://api\.openai\.com is not an origin"):
        build_worker("open_ai", {}, untrusted)  # the default URL is checked too: the list left it out
    build_worker("vllm", {"base_url": "http://gpu1.corp.example:8000"}, untrusted)  # wildcard match
    build_worker("llama_cpp", {"base_url": "http://localhost:8080/v1"}, untrusted)
    build_worker("vllm", {}, untrusted)  # VLLM_URL names its origin


def test_keys_go_only_to_trusted_hosts() -> None:
    env = {"OPENAI_API_KEY": "sk-abc"}
    common: dict[str, Any] = {"trusted_hosts": {"api.openai.com"}, "required": True}
    assert (
        resolve_key("OPENAI_API_KEY", env, "https://api.openai.com/v1", operator_configured=False, **common).value
        == "sk-abc"
    )
    withheld = resolve_key("OPENAI_API_KEY", env, "http://127.0.0.1:9/v1", operator_configured=False, **common)
    assert withheld.value is None and withheld.status == "withheld"
    assert "sk-abc" not in repr(withheld)
    operator = resolve_key("OPENAI_API_KEY", env, "http://proxy.lan/v1", operator_configured=True, **common)
    assert operator.status == "set"
    assert (
        resolve_key("OPENAI_API_KEY", {}, "https://api.openai.com/v1", operator_configured=True, **common).status
        == "missing"
    )


def test_describe_says_whether_a_key_is_set_without_showing_it() -> None:
    context = BuildContext(env={"OPENAI_API_KEY": "sk-visible-nowhere"})
    worker = build_worker("open_ai", {}, context)
    info = worker.describe()
    assert info["api_key"] == "set" and info["base_url"] == "https://api.openai.com/v1"
    assert "sk-visible-nowhere" not in repr(info)
    assert build_worker("open_ai", {}, BuildContext(env={})).describe()["api_key"] == "missing"


async def test_a_missing_key_for_the_real_api_fails_before_any_request() -> None:
    worker = build_worker("anthropic", {}, BuildContext(env={}))
    with pytest.raises(WorkerError) as caught:
        async for _ in worker.generate(request()):
            pass
    assert not caught.value.retryable
    assert "ANTHROPIC_API_KEY environment variable is not set" in str(caught.value)
    await worker.aclose()


def test_env_urls_are_the_defaults_with_or_without_v1() -> None:
    env = {"VLLM_URL": "http://gpu:8000/v1", "LLAMA_CPP_URL": "http://cpu:8080/", "OPENAI_BASE_URL": "http://gw/v1"}
    context = BuildContext(env=env)
    assert build_worker("vllm", {}, context).describe()["base_url"] == "http://gpu:8000"
    assert build_worker("llama_cpp", {}, context).describe()["base_url"] == "http://cpu:8080"
    assert build_worker("open_ai", {}, context).describe()["base_url"] == "http://gw/v1"
    assert build_worker("llama_cpp", {}, BuildContext(env={})).describe()["base_url"] == "http://localhost:8080"
    assert build_worker("vllm", {}, BuildContext(env={})).describe()["base_url"] == "http://localhost:8000"
    assert build_worker("anthropic", {}, BuildContext(env={})).describe()["base_url"] == "https://api.anthropic.com"


# ---------------------------------------------------------------------------- consistent hashing


def test_adding_a_replica_moves_few_sessions_and_only_to_the_new_one() -> None:
    sessions = [f"session-{i}" for i in range(2000)]
    before = HashRing([f"replica-{i}" for i in range(4)])
    after = HashRing([f"replica-{i}" for i in range(5)])
    moved = [s for s in sessions if before.owner(s) != after.owner(s)]
    assert all(after.owner(s) == 4 for s in moved)  # moved sessions all went to the newcomer
    assert 0.10 < len(moved) / len(sessions) < 0.30  # about 1/5, far from a full reshuffle
    counts = [sum(1 for s in sessions if after.owner(s) == i) for i in range(5)]
    assert min(counts) > 0.5 * len(sessions) / 5  # virtual nodes keep the spread even


def test_an_unusable_owner_hands_its_sessions_to_the_next_replica_on_the_ring() -> None:
    ring = HashRing(["a", "b", "c"])
    owner = ring.owner("s1")
    assert owner is not None
    fallback = ring.owner("s1", lambda index: index != owner)
    assert fallback is not None and fallback != owner
    assert ring.owner("s1", lambda index: False) is None


# ---------------------------------------------------------------------------- composites over echo workers


async def test_round_robin_and_least_loaded_choices() -> None:
    workers = [EchoWorker(f"m{i}") for i in range(3)]
    pool = PoolWorker(workers, Strategy.round_robin)
    for _ in range(6):
        [chunk async for chunk in pool.generate(request())]
    assert [w.calls for w in workers] == [2, 2, 2]

    slow, fast = EchoWorker("slow", delay_ms=60_000), EchoWorker("fast")
    pool = PoolWorker([slow, fast], Strategy.least_loaded)
    async with anyio.create_task_group() as tg:
        tg.start_soon(_drain, pool)
        with anyio.fail_after(10):
            while slow.calls == 0:  # the first request went to the slow replica and waits there
                await anyio.lowlevel.checkpoint()
        for _ in range(3):
            await _drain(pool)
        tg.cancel_scope.cancel()
    assert (slow.calls, fast.calls) == (1, 3)


async def test_session_affinity_keeps_a_session_on_one_replica() -> None:
    workers = [EchoWorker(f"m{i}") for i in range(3)]
    pool = PoolWorker(workers, Strategy.session_affinity)
    chosen = {s: pool.choose(f"user-{s}") for s in range(30)}
    assert all(pool.choose(f"user-{s}") == chosen[s] for s in range(30))
    assert len(set(chosen.values())) == 3


async def _drain(worker: Any) -> None:
    async for _ in worker.generate(request()):
        pass


def test_a_config_file_names_every_bad_member_on_its_own_line(
    tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from mcp_orchestrator.cli import EXIT_USAGE, main

    path = tmp_path / "chain.toml"
    path.write_text(
        "[stages.inference]\nworker = 'fallback'\n"
        "[[stages.inference.members]]\nkind = 'open_ai'\nbase_url = 'api.openai.com'\n"
        "[[stages.inference.members]]\nkind = 'anthropic'\nseed = 3\n"
        "[[stages.inference.members]]\nkind = 'llama_cpp'\nbase_url = 'http://127.0.0.1:8080'\n"
    )
    assert main(["--config", str(path), "--check-config"]) == EXIT_USAGE
    lines = capsys.readouterr().err.splitlines()
    # The file's own keys, under the file's name (the worker key is `worker`, not the tool's `kind`).
    assert lines == [
        f"mcp-orchestrator: {path}: stages.inference.members.0.base_url: must be a URL with a host, starting "
        'with http:// or https://, e.g. http://localhost:8080 (got "api.openai.com")',
        f"mcp-orchestrator: {path}: stages.inference.members.1.seed: not an option of worker kind 'anthropic' "
        "(its options: api_key_env, base_url, max_tokens, model, stop, stream, system, temperature, top_p)",
    ]
    path.write_text("[stages.inference]\nworker = 'gpt'\n")
    assert main(["--config", str(path), "--check-config"]) == EXIT_USAGE
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"mcp-orchestrator: {path}: stages.inference.worker: unknown worker kind 'gpt'; allowed:")
    assert main(["--worker", "gpt", "--check-config"]) == EXIT_USAGE
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("mcp-orchestrator: command line: --worker (stages.inference.worker): unknown worker kind")

    path.write_text(
        "[stages.inference]\nworker = 'pool'\nstrategy = 'least_loaded'\n"
        "[[stages.inference.replicas]]\nkind = 'vllm'\nbase_url = 'http://10.0.0.12:8000/v1'\n"
        "[[stages.inference.replicas]]\nkind = 'llama_cpp'\n"
    )
    assert main(["--config", str(path), "--check-config"]) == 0
    capsys.readouterr()
