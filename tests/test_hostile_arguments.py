"""Hostile tool arguments through a real MCP session (RELIABILITY.md, "hostile input").

hypothesis draws argument sets for every tool: the right names with values of every JSON
type, huge and deeply nested values, unicode edge cases (lone surrogates, control and
zero-width characters, right-to-left marks), names that are blank or misspelt. Every call
gets an answer; a refused call says which argument is wrong and what is allowed, and
changes no counter; the server keeps serving.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.from_thread
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mcp import Client
from mcp.types import CallToolResult

from mcp_orchestrator import Orchestrator
from testbeds.processes import rss_bytes
from tests.conftest import make_config

CALL_TIMEOUT_S = 30.0
TOOLS = {
    "infer": (
        "prompt",
        "session_id",
        "priority",
        "system",
        "max_tokens",
        "temperature",
        "top_p",
        "seed",
        "stop",
        "deadline_ms",
        "dedup",
        "cache",
    ),
    "pipeline_status": (),
    "dead_letters": ("limit", "reason", "session_id"),
    "replay_dead_letter": ("id",),
    "configure_worker": ("kind", "model", "base_url", "max_tokens", "temperature", "replicas", "strategy"),
}
EDGE_TEXT = ["\ud800", "\udfff", "\x00", "\u200b", "\u202e", "\ufeff", " ", "\t\n", "é" * 3, "🦙", "a" * 300_000]


def deep(depth: int) -> Any:
    value: Any = "bottom"
    for level in range(depth):
        value = [value] if level % 2 else {"k": value}
    return value


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.sampled_from(EDGE_TEXT),
)
values = st.one_of(
    scalars,
    st.lists(scalars, max_size=20),
    st.dictionaries(st.text(max_size=8), scalars, max_size=5),
    st.integers(min_value=1, max_value=200).map(deep),  # the SDK client cannot send deeper (pydantic)
    st.integers(min_value=1, max_value=20_000).map(lambda n: ["stop"] * n),
)


@st.composite
def tool_calls(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    tool = draw(st.sampled_from(sorted(TOOLS)))
    names = list(TOOLS[tool])
    chosen = draw(st.lists(st.sampled_from(names), unique=True)) if names else []
    arguments = {name: draw(values) for name in chosen}
    if draw(st.booleans()):
        arguments[draw(st.sampled_from(["", " ", "\u200b", "max_token", "promt", "x" * 500]))] = draw(scalars)
    return tool, arguments


@dataclass
class Session:
    """An orchestrator and a client in an event loop of their own (hypothesis calls plain functions)."""

    portal: anyio.from_thread.BlockingPortal
    orchestrator: Orchestrator
    client: Client
    calls: int = 0
    refused: int = 0
    rss_kib: list[int] = field(default_factory=list)

    def call(self, tool: str, arguments: dict[str, Any]) -> CallToolResult:
        async def call() -> CallToolResult:
            with anyio.fail_after(CALL_TIMEOUT_S):
                return await self.client.call_tool(tool, arguments)

        self.calls += 1
        return self.portal.call(call)

    def submitted(self) -> int:
        return self.orchestrator.status().totals.submitted


@pytest.fixture(scope="module")
def session() -> Iterator[Session]:
    config = make_config(security={"allow_configure": True, "worker_origins": ["http://127.0.0.1:9"]})
    orchestrator = Orchestrator(config)
    with anyio.from_thread.start_blocking_portal() as portal:
        with portal.wrap_async_context_manager(orchestrator):
            client = Client(orchestrator.server)
            with portal.wrap_async_context_manager(client):
                live = Session(portal, orchestrator, client)
                yield live
                print(
                    f"\nhostile arguments: {live.calls} calls, {live.refused} refused as invalid arguments; "
                    f"RSS {live.rss_kib[0] // 1024 if live.rss_kib else 0} -> "
                    f"{live.rss_kib[-1] // 1024 if live.rss_kib else 0} MiB"
                )
        assert orchestrator.pipeline.reconciles()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(call=tool_calls())
def test_every_hostile_call_gets_an_answer_and_a_refusal_changes_nothing(
    session: Session, call: tuple[str, dict[str, Any]]
) -> None:
    tool, arguments = call
    before = session.submitted()
    result = session.call(tool, arguments)
    assert result.content, result
    text = getattr(result.content[0], "text", "")
    if result.is_error:
        assert text.strip(), result  # never an empty or blank error
        if text.startswith(f"Invalid arguments for {tool}: "):
            session.refused += 1
            assert session.submitted() == before, text  # a refused call changes no counter
    if session.calls % 100 < 2:
        session.rss_kib.append(rss_bytes() // 1024)
    alive = session.call("pipeline_status", {})
    assert not alive.is_error and alive.structured_content is not None
    assert alive.structured_content["reconciles"] is True


def test_the_known_hostile_values_are_refused_by_name(session: Session) -> None:
    cases = [
        ("infer", {"prompt": "\ud800"}, "prompt: Input should be a valid string"),  # a lone surrogate is no text
        ("infer", {"prompt": "hi", "stop": deep(200)}, "stop.0: Input should be a valid string"),
        ("infer", {"prompt": "hi", "max_tokens": 2**70}, "max_tokens:"),
        ("dead_letters", {"limit": deep(200)}, "limit:"),
        ("replay_dead_letter", {"id": "x" * 100_000}, "id:"),
        ("configure_worker", {"kind": "open_ai", "base_url": "http://169.254.169.254/"}, "base_url"),
    ]
    for tool, arguments, named in cases:
        before = session.submitted()
        result = session.call(tool, arguments)
        text = getattr(result.content[0], "text", "")
        assert result.is_error and named in text, text
        assert session.submitted() == before
