"""The public face: the library API README shows, one exception tree, one declaration per
worker option, and config keys that either do something or are refused."""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

import anyio
import pytest

import mcp_orchestrator
from mcp_orchestrator import errors
from mcp_orchestrator.config import Config, InferenceSection, config_from_mapping, leaf_values
from mcp_orchestrator.errors import ConfigError, OrchestratorError
from mcp_orchestrator.workers.options import CONFIG_ONLY, KIND_OPTIONS, WorkerOptions
from mcp_orchestrator.workers.registry import kinds
from tests.conftest import make_config, running, status_of

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_library_example() -> str:
    """The Python block under README's "Use it as a library" heading."""
    text = README.read_text(encoding="utf-8")
    section = text.split("## Use it as a library", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match is not None, "README has no library example"
    return match.group(1)


def test_the_readme_library_example_runs_as_written(capsys: pytest.CaptureFixture[str]) -> None:
    exec(compile(readme_library_example(), "README.md", "exec"), {"__name__": "readme"})
    printed = capsys.readouterr().out
    assert "hello pipeline" in printed
    assert "Context:" in printed  # the example's context source was used


def test_every_public_name_imports() -> None:
    for name in mcp_orchestrator.__all__:
        assert getattr(mcp_orchestrator, name) is not None
    with pytest.raises(AttributeError):
        _ = mcp_orchestrator.NoSuchThing  # type: ignore[attr-defined]


def test_one_exception_tree() -> None:
    raised_on_purpose = [
        value
        for value in vars(errors).values()
        if inspect.isclass(value) and issubclass(value, BaseException) and value.__module__ == errors.__name__
    ]
    assert len(raised_on_purpose) > 10
    assert all(issubclass(error, OrchestratorError) for error in raised_on_purpose)


@pytest.mark.anyio
async def test_pipeline_name_version_and_description_are_the_servers() -> None:
    config = make_config(pipeline={"name": "team-llm", "version": "7.1", "description": "Our shared pipeline."})
    async with running(config) as (_, client):
        info = client.server_info
    assert info is not None
    assert (info.name, info.version, info.description) == ("team-llm", "7.1", "Our shared pipeline.")


@pytest.mark.anyio
async def test_the_default_version_is_the_packages() -> None:
    async with running() as (_, client):
        info = client.server_info
    assert info is not None and info.version == mcp_orchestrator.__version__


# ---------------------------------------------------------------------------- one declaration per worker option


@pytest.mark.anyio
async def test_configure_worker_arguments_are_the_worker_options() -> None:
    async with running() as (_, client):
        listing = await client.list_tools()
    (configure,) = [tool for tool in listing.tools if tool.name == "configure_worker"]
    properties = configure.input_schema["properties"]
    assert set(properties) == {"kind"} | (set(WorkerOptions.model_fields) - CONFIG_ONLY)
    for name, field in WorkerOptions.model_fields.items():
        if name in CONFIG_ONLY:
            continue
        assert properties[name]["description"] == field.description, name
    assert properties["max_tokens"]["anyOf"][0]["maximum"] == 1_000_000  # the limit declared once


def test_the_config_file_takes_the_same_worker_options() -> None:
    assert set(WorkerOptions.model_fields) <= set(InferenceSection.model_fields)
    assert set(KIND_OPTIONS) == set(kinds())
    assert all(options <= set(WorkerOptions.model_fields) for options in KIND_OPTIONS.values())


# ---------------------------------------------------------------------------- every key does something or is refused


@pytest.mark.parametrize(
    ("mapping", "line"),
    [
        ({"stages": {"rag": {"enabled": "yes"}}}, 'stages.rag.enabled: Input should be a valid boolean (got "yes")'),
        ({"stages": {"rag": {"enabled": 1}}}, "stages.rag.enabled: Input should be a valid boolean (got 1)"),
        ({"deduplication": {"enabled": "false"}}, "deduplication.enabled: Input should be a valid boolean"),
        (
            {"stages": {"inference": {"concurrency": 1.5}}},
            "stages.inference.concurrency: Input should be a valid integer",
        ),
        ({"stages": {"inference": {"stream": "no"}}}, "stages.inference.stream: Input should be a valid boolean"),
        (
            {"stages": {"assemble": {"enabled": False}}},
            "stages.assemble.enabled: the assemble stage cannot be disabled: it builds the messages the worker "
            "receives (only rag and post_process can be)",
        ),
        ({"stages": {"stream": {"enabled": False}}}, "stages.stream.enabled: the stream stage cannot be disabled"),
        ({"stages": {"inference": {"enabled": False}}}, "stages.inference.enabled: the inference stage cannot be"),
        (
            {"stages": {"post_process": {"timeout_ms": 10}}},
            "stages.post_process.timeout_ms: not a key: the post_process stage does its work at once, so it has no "
            "timeout",
        ),
        ({"stages": {"assemble": {"timeout_ms": 10}}}, "stages.assemble.timeout_ms: not a key: the assemble stage"),
        ({"distributed": {"redis_url": "http://user:pw@host"}}, "distributed.redis_url: must start with redis://"),
        ({"stages": {"rag": {"source": "not a reference"}}}, "stages.rag.source: String should match pattern"),
    ],
)
def test_keys_that_cannot_work_are_refused_with_the_reason(mapping: dict[str, Any], line: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_mapping(mapping, "team.toml")
    assert f"team.toml: {line}" in str(caught.value)


def test_the_seeds_own_keys_that_do_work_are_accepted() -> None:
    config = config_from_mapping(
        {
            "stages": {
                "rag": {"enabled": True, "timeout_ms": 5000, "max_context_tokens": 2048},
                "assemble": {"enabled": True, "channel_capacity": 512},
                "inference": {"worker": "echo", "max_tokens": 1024, "temperature": 0.7, "timeout_ms": 30000},
                "post_process": {"enabled": True},
                "stream": {"enabled": True},
            }
        }
    )
    assert config.stages.post_process.enabled and config.stages.rag.timeout_ms == 5000


@pytest.mark.anyio
async def test_counters_that_were_kept_are_shown() -> None:
    limits = {"enabled": True, "requests_per_second": 1e6, "burst_capacity": 1000}
    config = make_config(
        pipeline={"dead_letter_capacity": 1},
        stages={"inference": {"delay_ms": 20}},
        rate_limits={**limits, "per_session_rps": 0.001, "per_session_burst": 1},
    )
    async with running(config) as (orchestrator, client):
        with anyio.fail_after(20):
            await client.call_tool("infer", {"prompt": "miss then store"})
            await client.call_tool("infer", {"prompt": "miss then store"})  # a hit
            await client.call_tool("infer", {"prompt": "spend", "session_id": "s"})
            refused = await client.call_tool("infer", {"prompt": "no token", "session_id": "s", "deadline_ms": 1000})
            assert refused.is_error
            for index in range(2):  # two dead letters in a ring of one: one dropped
                assert (await client.call_tool("infer", {"prompt": f"late {index}", "deadline_ms": 1})).is_error
            status = await status_of(client)
            metrics = orchestrator.pipeline.metrics.render().decode()
    assert (status["cache"]["hits"], status["cache"]["misses"], status["cache"]["stored"]) == (1, 5, 2)
    assert status["rate_limit"]["refused"] == 1
    letters = status["dead_letters"]
    assert (letters["held"], letters["capacity"], letters["dropped"]) == (1, 1, 1)
    assert 0 < letters["bytes"] < letters["max_bytes"] == 64 * 1024 * 1024
    assert "orchestrator_cache_misses_total 5.0" in metrics
    assert "orchestrator_cache_stored_total 2.0" in metrics
    assert "orchestrator_dead_letters_dropped_total 1.0" in metrics


def test_defaults_have_one_source() -> None:
    """The config's resilience defaults are the generic pieces' own defaults."""
    from mcp_orchestrator.resilience.breaker import BreakerSettings
    from mcp_orchestrator.resilience.retry import RetryPolicy

    resilience = Config().resilience
    assert resilience.breaker_settings() == BreakerSettings()
    assert resilience.retry_policy() == RetryPolicy()


# ---------------------------------------------------------------------------- the docs match the code

DOCS = Path(__file__).resolve().parent.parent / "docs"


@pytest.mark.parametrize("key", sorted(leaf_values(Config())))
def test_every_config_key_is_documented(key: str) -> None:
    section, _, name = key.rpartition(".")
    text = (DOCS / "configuration.md").read_text(encoding="utf-8")
    assert f"## `[{section}]`" in text or f"`[{section}]`" in text, f"[{section}] has no section"
    assert f"| `{name}` |" in text or f"`{name}`" in text, f"{key} is not in docs/configuration.md"


@pytest.mark.anyio
async def test_every_tool_argument_is_documented() -> None:
    text = (DOCS / "tools.md").read_text(encoding="utf-8")
    async with running(make_config(security={"allow_configure": True})) as (_, client):
        tools = (await client.list_tools()).tools
    for tool in tools:
        assert f"## `{tool.name}`" in text, tool.name
        for argument in tool.input_schema.get("properties", {}):
            assert f"`{argument}`" in text, f"{tool.name}.{argument} is not in docs/tools.md"
