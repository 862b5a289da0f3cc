"""The MCP tasks extension (`io.modelcontextprotocol/tasks`, protocol 2026-07-28).

Spec: modelcontextprotocol/ext-tasks, specification/2026-07-28/tasks.md. A client that
declares the extension on a `tools/call` of infer or batch_infer may get a task handle
(`resultType: "task"`) instead of the result: the call starts as a job (jobs/), waits
inline up to `[tasks] inline_ms`, and answers normally when the result is there by then.
Otherwise the client polls `tasks/get` until the task is `completed` (with the very
`CallToolResult` the call would have returned inline; a tool error is `completed` with
`isError: true`), `failed` (a JSON-RPC error only) or `cancelled`; `tasks/cancel` asks it
to stop. Built on the SDK's extension interface (SEP-2133): one `tools/call` interceptor
and three request methods, no patching.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.extension import Extension, MethodBinding
from mcp.server.mcpserver.server import require_client_extension
from mcp.shared.exceptions import MCPError
from mcp_types import CallToolRequestParams, RequestParams

from mcp_orchestrator.config import TasksSection
from mcp_orchestrator.errors import JobError, OrchestratorError, ShuttingDown, shown
from mcp_orchestrator.jobs import Job, JobFailure, Jobs, JobState
from mcp_orchestrator.pipeline import Pipeline
from mcp_orchestrator.server.background import CURRENT_JOB, describe, error_result
from mcp_orchestrator.server.identity import owner_of

TASKS = "io.modelcontextprotocol/tasks"
TASK_TOOLS = frozenset({"infer", "batch_infer"})
"""The tools that may answer with a task (the others are quick)."""
INVALID_PARAMS = -32602


class TaskIdParams(RequestParams):
    """Taken as sent and checked in `task_id_of`, so that an error names the field (the SDK's
    own check answers "Invalid request parameters" and nothing more)."""

    task_id: Any = None


class UpdateTaskParams(TaskIdParams):
    input_responses: Any = None


MAX_TASK_ID = 64


def task_id_of(params: TaskIdParams) -> str:
    value = params.task_id
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_TASK_ID:
        got = "missing" if value is None else f"got {shown(value, 40)}"
        message = f"taskId: required, a string of 1-{MAX_TASK_ID} characters ({got})"
        raise MCPError(code=INVALID_PARAMS, message=message)
    return value


def declared(ctx: ServerRequestContext[Any, Any]) -> bool:
    """Whether this request's client declared the extension (per request on 2026-07-28)."""
    capabilities = ctx.session.client_capabilities
    return bool(capabilities and capabilities.extensions and TASKS in capabilities.extensions)


def iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class TasksExtension(Extension):
    identifier = TASKS

    def __init__(self, jobs: Jobs, pipeline: Pipeline, settings: TasksSection) -> None:
        self._jobs = jobs
        self._pipeline = pipeline
        self._settings = settings

    def methods(self) -> list[MethodBinding]:
        return [
            MethodBinding("tasks/get", TaskIdParams, self._get),
            MethodBinding("tasks/update", UpdateTaskParams, self._update),
            MethodBinding("tasks/cancel", TaskIdParams, self._cancel),
        ]

    async def intercept_tool_call(
        self, params: CallToolRequestParams, ctx: ServerRequestContext[Any, Any], call_next: CallNext
    ) -> HandlerResult:
        if params.name not in TASK_TOOLS or not declared(ctx) or CURRENT_JOB.get() is not None:
            return await call_next(ctx)
        if (params.arguments or {}).get("background") is True:  # answers at once with its own id
            return await call_next(ctx)

        async def work(job: Job) -> HandlerResult:
            token = CURRENT_JOB.set(job)  # the tool body submits for the job, sends no progress
            try:
                return await call_next(ctx)
            except MCPError as exc:
                raise JobFailure(exc.error.code, exc.error.message) from None
            finally:
                CURRENT_JOB.reset(token)

        try:
            job = self._jobs.start(owner_of(ctx), params.name, "task", work)
        except OrchestratorError:  # over a bound, or stopping: this call is simply answered inline
            return await call_next(ctx)
        try:
            finished = await self._jobs.wait(job, self._settings.inline_ms / 1000)
            if not finished:
                await self._jobs.hand_out(job)
                return self._task(job, "task")
        except BaseException:
            # The caller left before it was told the task's id: nobody could ever fetch it.
            self._jobs.stop(job)
            raise
        self._jobs.forget(job)  # answered inline: never a task to the client
        if job.failure is not None:
            raise MCPError(code=job.failure.code, message=job.failure.message)
        if job.state is JobState.cancelled:  # the server is stopping
            return error_result(ShuttingDown())
        result: HandlerResult = job.result
        return result

    # ------------------------------------------------------------------ methods

    async def _find(self, ctx: ServerRequestContext[Any, Any], params: TaskIdParams) -> Job:
        require_client_extension(ctx, TASKS)  # -32021 for a client that did not declare it
        task_id = task_id_of(params)
        try:
            return await self._jobs.find(owner_of(ctx), task_id)
        except JobError as exc:
            raise MCPError(code=INVALID_PARAMS, message=f"Failed to retrieve task: {exc}") from None

    async def _get(self, ctx: ServerRequestContext[Any, Any], params: TaskIdParams) -> HandlerResult:
        return self._task(await self._find(ctx, params), "complete")

    async def _update(self, ctx: ServerRequestContext[Any, Any], params: UpdateTaskParams) -> HandlerResult:
        if params.input_responses is not None and not isinstance(params.input_responses, dict):
            raise MCPError(
                code=INVALID_PARAMS,
                message=f"inputResponses: must be an object (got {shown(params.input_responses, 40)})",
            )
        await self._find(ctx, params)  # no tool here asks for input: responses are acknowledged and ignored
        return {"resultType": "complete"}

    async def _cancel(self, ctx: ServerRequestContext[Any, Any], params: TaskIdParams) -> HandlerResult:
        job = await self._find(ctx, params)
        await self._jobs.cancel(job.owner, job.id)
        return {"resultType": "complete"}

    # ------------------------------------------------------------------ the wire shape

    def _ttl_ms(self, job: Job) -> int | None:
        """Time to live counted from creation, as the spec reads it: none while the work runs
        (it is kept until it ends), then its run time plus [tasks] ttl_s."""
        if not job.ended:
            return None
        return int((job.updated_at - job.created_at + self._settings.ttl_s) * 1000)

    def _task(self, job: Job, result_type: str) -> dict[str, Any]:
        """A Task (CreateTaskResult with result_type "task", a tasks/get answer with "complete")."""
        task: dict[str, Any] = {
            "resultType": result_type,
            "taskId": job.id,
            "status": job.state.value,
            "statusMessage": describe(job, self._pipeline),
            "createdAt": iso(job.created_at),
            "lastUpdatedAt": iso(job.updated_at),
            "ttlMs": self._ttl_ms(job),
        }
        if job.state is JobState.working:
            task["pollIntervalMs"] = self._settings.poll_interval_ms
        elif job.state is JobState.completed and result_type == "complete" and job.result is not None:
            task["result"] = job.result.model_dump(by_alias=True, mode="json", exclude_none=True)
        elif job.state is JobState.failed and job.failure is not None:
            task["error"] = {"code": job.failure.code, "message": job.failure.message}
        return task
