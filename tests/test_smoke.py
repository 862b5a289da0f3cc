import pytest

from tests.conftest import running

pytestmark = pytest.mark.anyio


async def test_infer_round_trip_in_memory() -> None:
    async with running() as (orchestrator, client):
        result = await client.call_tool("infer", {"prompt": "hello world"})
        assert not result.is_error
        assert result.content[0].text == "hello world"
        assert result.structured_content is not None
        assert result.structured_content["worker"] == "echo"
        assert orchestrator.status().totals.completed == 1
