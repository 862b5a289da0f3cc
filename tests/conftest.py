"""Shared fixtures. Helper modules with more fixtures live beside this file (tests/support_*.py)."""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from hypothesis import settings
from mcp import Client

from mcp_orchestrator import ContextSource, Orchestrator
from mcp_orchestrator.config import Config, config_from_mapping

# Support modules are imported by test modules and listed in pytest_plugins; registering them
# here lets pytest rewrite their asserts whichever way they are first imported.
pytest.register_assert_rewrite("tests.support_llama", "tests.support_fault_server", "tests.support_faults_extra")


# A developer's own REDIS_URL would make every test orchestrator share state through that Redis
# (and child servers inherit it): the tests that share start their own server and say so.
os.environ.pop("REDIS_URL", None)

# CI replays the same examples every run, so a submission never fails on an example that
# was never seen before; local runs keep exploring (and keep what fails in .hypothesis/).
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


_progress_tokens = itertools.count(1)


def with_progress(callback: Callable[[float, float | None, str | None], Awaitable[None]]) -> dict[str, Any]:
    """`call_tool` keyword arguments that ask for progress: the callback, and a progress token in
    the request's `_meta` (what wire clients send; the in-process client needs it given)."""
    return {"progress_callback": callback, "meta": {"progress_token": f"p{next(_progress_tokens)}"}}


def make_config(**sections: dict[str, Any]) -> Config:
    """A Config from keyword sections, e.g. make_config(stages={"rag": {"channel_capacity": 2}})."""
    return config_from_mapping(sections, "test")


@asynccontextmanager
async def running(
    config: Config | None = None, *, context_source: ContextSource | None = None, **client_options: Any
) -> AsyncIterator[tuple[Orchestrator, Client]]:
    """A running orchestrator and an in-memory MCP client connected to it.

    `client_options` go to `mcp.Client` (e.g. mode="legacy" for JSON-RPC over memory streams).
    On exit, asserts the conservation law (every request ended exactly once)."""
    orchestrator = Orchestrator(config or Config(), context_source=context_source)
    async with orchestrator, Client(orchestrator.server, **client_options) as client:
        yield orchestrator, client
        assert orchestrator.pipeline.reconciles(), orchestrator.status().totals
    assert orchestrator.pipeline.reconciles(), orchestrator.status().totals


@pytest.fixture
def orchestrator_session() -> Callable[..., Any]:
    return running


WAIT_TIMEOUT_S = 10.0


async def wait_for(condition: Callable[[], bool], timeout_s: float = WAIT_TIMEOUT_S) -> None:
    """Poll `condition` until it holds; fail (TimeoutError) instead of hanging if it never does.

    For pipeline state that has no event of its own to wait on (queue depths, counters)."""
    with anyio.fail_after(timeout_s):
        while not condition():  # noqa: ASYNC110 - polling state that offers no event
            await anyio.sleep(0.002)


async def status_of(client: Client) -> dict[str, Any]:
    """pipeline_status as the client sees it (structured content)."""
    result = await client.call_tool("pipeline_status", {})
    assert not result.is_error, result.content
    assert result.structured_content is not None
    return result.structured_content


async def totals_of(client: Client) -> dict[str, Any]:
    totals: dict[str, Any] = (await status_of(client))["totals"]
    return totals


def error_text(result: Any) -> str:
    """The text of an is_error tool result."""
    assert result.is_error, f"expected a tool error, got {result.structured_content or result.content}"
    return "\n".join(block.text for block in result.content if getattr(block, "type", "") == "text")
