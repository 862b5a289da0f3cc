"""Unknown tool arguments are refused with a did-you-mean; argument errors are one plain line each."""

from __future__ import annotations

import pytest

from tests.conftest import running

pytestmark = pytest.mark.anyio


async def test_a_misspelt_argument_is_refused_not_dropped() -> None:
    async with running() as (orchestrator, client):
        result = await client.call_tool("infer", {"prompt": "hi", "max_token": 5})
        assert result.is_error
        text = result.content[0].text  # type: ignore[union-attr]
        assert "max_token: unknown argument; did you mean 'max_tokens'?" in text
        assert "allowed: prompt, session_id" in text
        assert orchestrator.status().totals.submitted == 0


async def test_tools_without_arguments_refuse_any() -> None:
    async with running() as (_, client):
        result = await client.call_tool("pipeline_status", {"verbose": True})
        assert result.is_error
        assert result.content[0].text == (  # type: ignore[union-attr]
            "Invalid arguments for pipeline_status: verbose: unknown argument (allowed: none)"
        )


async def test_argument_errors_are_short_and_name_each_argument() -> None:
    async with running() as (orchestrator, client):
        result = await client.call_tool("infer", {"prompt": "", "temperature": 5})
        assert result.is_error
        text = result.content[0].text  # type: ignore[union-attr]
        assert text == (
            'Invalid arguments for infer: prompt: String should have at least 1 character (got ""); '
            "temperature: Input should be less than or equal to 2 (got 5)"
        )
        assert "errors.pydantic.dev" not in text
        assert orchestrator.status().totals.submitted == 0


async def test_errors_raised_by_the_tool_itself_are_kept() -> None:
    async with running() as (_, client):
        result = await client.call_tool("replay_dead_letter", {"id": "dl-404"})
        assert result.is_error
        assert "no dead letter 'dl-404'" in result.content[0].text  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("tool", "arguments", "expected"),
    [
        ("infer", {"prompt": "hi", "max_tokens": True}, "max_tokens: Input should be a valid integer (got true)"),
        ("infer", {"prompt": "hi", "temperature": False}, "temperature: Input should be a valid number (got false)"),
        ("dead_letters", {"limit": True}, "limit: Input should be a valid integer (got true)"),
    ],
)
async def test_booleans_are_not_numbers(tool: str, arguments: dict[str, object], expected: str) -> None:
    async with running() as (orchestrator, client):
        result = await client.call_tool(tool, arguments)
        assert result.is_error
        assert expected in result.content[0].text  # type: ignore[union-attr]
        assert orchestrator.status().totals.submitted == 0


async def test_blank_argument_names_are_shown_quoted() -> None:
    async with running() as (_, client):
        result = await client.call_tool("infer", {"prompt": "hi", " ": 1, "\t": 2})
        text = result.content[0].text  # type: ignore[union-attr]
        assert result.is_error
        assert '" ": unknown argument' in text
        assert '"\\t": unknown argument' in text
