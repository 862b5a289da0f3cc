"""A client side of the MCP tasks extension, for tests: the claim that accepts a task handle,
and the three request types the SDK client has no helper for (tasks/get, update, cancel)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import anyio
from mcp import Client
from mcp.client.extension import ClaimContext, ClientExtension, ResultClaim
from mcp.shared.exceptions import MCPError
from mcp_types import CallToolResult, Request, RequestParams, Result
from pydantic import ConfigDict, Field

TASKS = "io.modelcontextprotocol/tasks"
POLL_TIMEOUT_S = 30.0


class TaskHandle(Result):
    """CreateTaskResult (resultType "task") as the client receives it."""

    model_config = ConfigDict(extra="allow")
    result_type: Literal["task"]
    task_id: str
    status: str
    created_at: str
    last_updated_at: str
    ttl_ms: int | None
    poll_interval_ms: int | None = None
    status_message: str | None = None


class TaskState(Result):
    """A tasks/get answer: the Task with its status-specific fields (result, error)."""

    model_config = ConfigDict(extra="allow")
    task_id: str
    status: str
    status_message: str | None = None
    created_at: str
    last_updated_at: str
    ttl_ms: int | None
    poll_interval_ms: int | None = None
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None


class TaskIdParams(RequestParams):
    task_id: str


class UpdateParams(TaskIdParams):
    input_responses: dict[str, Any] = Field(default_factory=dict)


class GetTask(Request[TaskIdParams, Literal["tasks/get"]]):
    method: Literal["tasks/get"] = "tasks/get"
    name_param = "taskId"


class CancelTask(Request[TaskIdParams, Literal["tasks/cancel"]]):
    method: Literal["tasks/cancel"] = "tasks/cancel"
    name_param = "taskId"


class UpdateTask(Request[UpdateParams, Literal["tasks/update"]]):
    method: Literal["tasks/update"] = "tasks/update"
    name_param = "taskId"


class Ack(Result):
    model_config = ConfigDict(extra="allow")


async def _unresolved(handle: TaskHandle, ctx: ClaimContext) -> CallToolResult:
    raise AssertionError("tests take task handles unresolved (allow_claimed=True) and poll themselves")


class TasksClient(ClientExtension):
    """Declares the tasks extension on every request and accepts `resultType: "task"`."""

    identifier = TASKS

    def claims(self) -> Sequence[ResultClaim[Any]]:
        return [ResultClaim(result_type="task", model=TaskHandle, resolve=_unresolved)]


async def call(client: Client, tool: str, arguments: dict[str, Any]) -> CallToolResult | TaskHandle:
    """A tools/call that may come back as a task handle."""
    result = await client.session.call_tool(tool, arguments, allow_claimed=True)
    assert isinstance(result, CallToolResult | TaskHandle), result
    return result


async def get_task(client: Client, task_id: str) -> TaskState:
    return await client.session.send_request(GetTask(params=TaskIdParams(task_id=task_id)), TaskState)


async def cancel_task(client: Client, task_id: str) -> None:
    await client.session.send_request(CancelTask(params=TaskIdParams(task_id=task_id)), Ack)


async def update_task(client: Client, task_id: str) -> None:
    await client.session.send_request(UpdateTask(params=UpdateParams(task_id=task_id)), Ack)


async def poll_until_ended(client: Client, task_id: str) -> TaskState:
    """tasks/get until the task is completed, failed or cancelled (fails after POLL_TIMEOUT_S)."""
    with anyio.fail_after(POLL_TIMEOUT_S):
        while True:
            state = await get_task(client, task_id)
            if state.status != "working":
                return state
            await anyio.sleep(0.02)


async def error_of(request: Any) -> MCPError:
    """The JSON-RPC error an awaitable raises (fails if it succeeds)."""
    try:
        await request
    except MCPError as exc:
        return exc
    raise AssertionError("expected a JSON-RPC error")
