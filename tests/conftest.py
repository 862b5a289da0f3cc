"""Shared fixtures. Helper modules with more fixtures live beside this file (tests/support_*.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from mcp import Client

from mcp_orchestrator.app import Orchestrator
from mcp_orchestrator.config import Config, config_from_mapping


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def make_config(**sections: dict[str, Any]) -> Config:
    """A Config from keyword sections, e.g. make_config(stages={"rag": {"channel_capacity": 2}})."""
    return config_from_mapping(sections, "test")


@asynccontextmanager
async def running(config: Config | None = None) -> AsyncIterator[tuple[Orchestrator, Client]]:
    """A running orchestrator and an in-memory MCP client connected to it.

    On exit, asserts the conservation law (every request ended exactly once)."""
    orchestrator = Orchestrator(config or Config())
    async with orchestrator, Client(orchestrator.server) as client:
        yield orchestrator, client
        assert orchestrator.pipeline.reconciles(), orchestrator.status().totals
    assert orchestrator.pipeline.reconciles(), orchestrator.status().totals


@pytest.fixture
def orchestrator_session() -> Callable[..., Any]:
    return running
