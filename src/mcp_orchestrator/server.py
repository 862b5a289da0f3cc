"""The MCP surface: tool definitions, argument validation, result shaping.

Tools validate their arguments (pydantic constraints in the signatures plus the
checks below), call the pipeline and shape its answers. Any failure the user can act
on is raised as ToolError with a message that names the argument or the cause;
other exceptions would reach the client only as a bare "Error executing tool".

Deliberately no `from __future__ import annotations`: the SDK evaluates the tool
signatures, whose constraints use values from the config.
"""

import inspect
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import CallToolResult, TextContent, ToolAnnotations
from pydantic import BaseModel, Field, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

from mcp_orchestrator import __version__
from mcp_orchestrator.errors import OrchestratorError
from mcp_orchestrator.models import (
    DeadLetter,
    DeadLetterReason,
    GenerationParams,
    InferResult,
    PipelineStatus,
    Priority,
    Submission,
    flat_json_schema,
)
from mcp_orchestrator.tool_guard import ToolArgumentGuard
from mcp_orchestrator.workers.base import WorkerError
from mcp_orchestrator.workers.registry import WorkerSpecError, build_worker, kinds

if TYPE_CHECKING:
    from mcp_orchestrator.app import Orchestrator

log = logging.getLogger(__name__)
_Tool = TypeVar("_Tool", bound=Callable[..., Any])

INSTRUCTIONS = (
    "Runs prompts through a production LLM pipeline (RAG -> assemble -> inference -> "
    "post-process -> stream) with load shedding, deadlines and priorities. Use `infer` to "
    "get an answer, `pipeline_status` to see load and health, `dead_letters` and "
    "`replay_dead_letter` for requests that were shed or failed, `configure_worker` to "
    "switch the model backend."
)

PROGRESS_BUFFER = 256
PROGRESS_DRAIN_S = 5.0
MAX_STOP_SEQUENCES = 16
MAX_SESSION_ID = 256


class InferOutput(InferResult):
    """InferResult as `infer` and `replay_dead_letter` publish it: the same fields, with the flat
    output schema of `flat_json_schema` (cheap for clients to validate every result against)."""

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        return flat_json_schema(InferResult)


class DeadLetterList(BaseModel):
    entries: list[DeadLetter]
    total: int
    """How many dead letters the queue holds now (before filtering)."""
    capacity: int


class WorkerDescription(BaseModel):
    kind: str
    model: str
    previous: dict[str, Any]
    settings: dict[str, Any]


def _tool_error(exc: BaseException) -> ToolError:
    return ToolError(str(exc))


def _require_text(name: str, value: str | None) -> None:
    if value is not None and not value.strip():
        raise ToolError(f"{name}: must contain some non-whitespace text")


def build_server(orchestrator: "Orchestrator") -> MCPServer:
    config = orchestrator.config
    max_prompt = config.pipeline.max_prompt_chars
    max_deadline = config.pipeline.max_deadline_ms
    server = MCPServer(
        name="mcp-orchestrator",
        version=__version__,
        instructions=INSTRUCTIONS,
        log_level=config.observability.log_level.upper(),  # type: ignore[arg-type]
    )

    def tool(**options: Any) -> Callable[[_Tool], _Tool]:
        """server.tool with the docstring dedented: clients show the description as it is."""

        def register(function: _Tool) -> _Tool:
            return server.tool(description=inspect.cleandoc(function.__doc__ or ""), **options)(function)

        return register

    @tool(
        title="Run a prompt through the LLM pipeline",
        annotations=ToolAnnotations(
            read_only_hint=False, destructive_hint=False, idempotent_hint=True, open_world_hint=True
        ),
    )
    async def infer(
        ctx: Context,
        prompt: Annotated[str, Field(min_length=1, max_length=max_prompt, description="The user prompt.")],
        session_id: Annotated[
            str | None,
            Field(
                min_length=1,
                max_length=MAX_SESSION_ID,
                description="Groups requests for rate limits and replica affinity.",
            ),
        ] = None,
        priority: Annotated[
            Priority, Field(description="Scheduling class: critical, high, normal or low.")
        ] = Priority.normal,
        system: Annotated[str | None, Field(max_length=max_prompt, description="System prompt.")] = None,
        max_tokens: Annotated[int | None, Field(ge=1, le=1_000_000, description="Cap on generated tokens.")] = None,
        temperature: Annotated[float | None, Field(ge=0, le=2, description="Sampling temperature, 0 to 2.")] = None,
        top_p: Annotated[float | None, Field(gt=0, le=1, description="Nucleus sampling, (0, 1].")] = None,
        seed: Annotated[int | None, Field(ge=0, description="Sampling seed, for repeatable answers.")] = None,
        stop: Annotated[
            list[Annotated[str, Field(min_length=1, max_length=256)]] | None,
            Field(max_length=MAX_STOP_SEQUENCES, description="Stop sequences (at most 16)."),
        ] = None,
        deadline_ms: Annotated[
            int | None,
            Field(ge=1, le=max_deadline, description="Give up after this many milliseconds (default from config)."),
        ] = None,
        dedup: Annotated[bool, Field(description="Share the answer of an identical request in flight.")] = True,
        cache: Annotated[bool, Field(description="Answer from (and store into) the result cache.")] = True,
    ) -> Annotated[CallToolResult, InferOutput]:
        """Run a prompt through the pipeline on the configured worker and return the answer.

        The text content is the answer; the structured result adds request id, worker,
        model, token usage, latency per stage, the cached/coalesced flags and provenance
        (the backend that answered, calls made, failed hops, its breaker state). Chunks are
        sent as progress notifications while they arrive; once one has been sent, a broken
        stream fails instead of being retried (a retry would repeat the text).
        """
        _require_text("prompt", prompt)
        _require_text("system", system)
        _require_text("session_id", session_id)
        submission = Submission(
            prompt=prompt,
            session_id=session_id,
            priority=priority,
            system=system,
            params=GenerationParams(
                max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=tuple(stop or ()), seed=seed
            ),
            deadline_ms=deadline_ms,
            dedup=dedup,
            cache=cache,
        )
        result = await _run_with_progress(orchestrator, submission, ctx)
        return CallToolResult(
            content=[TextContent(type="text", text=result.text)],
            structured_content=result.model_dump(mode="json"),
        )

    @tool(
        title="Pipeline status",
        annotations=ToolAnnotations(read_only_hint=True, idempotent_hint=True, open_world_hint=False),
    )
    async def pipeline_status() -> PipelineStatus:
        """Live figures: queue depth and capacity per stage, totals (submitted, completed, failed,
        shed, cancelled, in flight, coalesced, cache hits), the worker, rate limits, latency
        percentiles, uptime, and the circuit breaker of each backend (state, failures, calls
        refused, seconds until it lets probes through)."""
        return orchestrator.status()

    @tool(
        title="List dead letters",
        annotations=ToolAnnotations(read_only_hint=True, idempotent_hint=True, open_world_hint=False),
    )
    async def dead_letters(
        limit: Annotated[int, Field(ge=1, le=1000, description="At most this many entries, newest first.")] = 50,
        reason: Annotated[
            DeadLetterReason | None,
            Field(
                description="Only this reason: queue_full, deadline_exceeded, stage_timeout, worker_error, internal_error."
            ),
        ] = None,
        session_id: Annotated[str | None, Field(min_length=1, max_length=MAX_SESSION_ID)] = None,
    ) -> DeadLetterList:
        """Requests that were shed by a full stage or failed, newest first."""
        queue = orchestrator.pipeline.dead_letters
        return DeadLetterList(
            entries=queue.list(limit, reason=reason, session_id=session_id), total=len(queue), capacity=queue.capacity
        )

    @tool(
        title="Replay a dead letter",
        annotations=ToolAnnotations(
            read_only_hint=False, destructive_hint=False, idempotent_hint=False, open_world_hint=True
        ),
    )
    async def replay_dead_letter(
        ctx: Context,
        id: Annotated[str, Field(min_length=1, max_length=64, description="A dead letter id such as dl-12.")],
    ) -> Annotated[CallToolResult, InferOutput]:
        """Submit a dead letter's original request again and return its result."""
        entry = orchestrator.pipeline.dead_letters.get(id)
        if entry is None:
            raise ToolError(f"id: no dead letter {id!r} (it may have been dropped; list them with dead_letters)")
        result = await _run_with_progress(orchestrator, entry.submission, ctx)
        return CallToolResult(
            content=[TextContent(type="text", text=result.text)],
            structured_content=result.model_dump(mode="json"),
        )

    @tool(
        title="Configure the inference worker",
        annotations=ToolAnnotations(
            read_only_hint=False, destructive_hint=True, idempotent_hint=True, open_world_hint=True
        ),
    )
    async def configure_worker(
        kind: Annotated[str, Field(min_length=1, max_length=64, description=f"Worker kind: {', '.join(kinds())}.")],
        model: Annotated[str | None, Field(min_length=1, max_length=256, description="Model name.")] = None,
        base_url: Annotated[
            str | None,
            Field(
                min_length=1,
                max_length=2048,
                description="HTTP workers: where the backend is, e.g. http://localhost:8080 (llama_cpp) or "
                "https://api.openai.com/v1 (open_ai). Its host must be in [security] allowed_hosts.",
            ),
        ] = None,
        max_tokens: Annotated[
            int | None, Field(ge=1, le=1_000_000, description="Default cap on generated tokens (a call's own wins).")
        ] = None,
        temperature: Annotated[float | None, Field(ge=0, le=2, description="Default sampling temperature.")] = None,
        top_p: Annotated[float | None, Field(gt=0, le=1, description="Default nucleus sampling, (0, 1].")] = None,
        seed: Annotated[int | None, Field(ge=0, description="open_ai, llama_cpp, vllm: default seed.")] = None,
        stop: Annotated[
            list[Annotated[str, Field(min_length=1, max_length=256)]] | None,
            Field(max_length=MAX_STOP_SEQUENCES, description="Default stop sequences."),
        ] = None,
        system: Annotated[
            str | None, Field(max_length=100_000, description="HTTP workers: system prompt when a call has none.")
        ] = None,
        stream: Annotated[bool | None, Field(description="HTTP workers: stream over SSE (default true).")] = None,
        strategy: Annotated[
            Literal["round_robin", "least_loaded", "session_affinity"] | None,
            Field(description="pool: how replicas are chosen (default round_robin)."),
        ] = None,
        replicas: Annotated[
            list[dict[str, Any]] | None,
            Field(
                min_length=1,
                max_length=32,
                description='pool: the replicas, each an object with "kind" and that kind\'s options, '
                'e.g. {"kind": "llama_cpp", "base_url": "http://127.0.0.1:8081"}.',
            ),
        ] = None,
        members: Annotated[
            list[dict[str, Any]] | None,
            Field(
                min_length=1,
                max_length=8,
                description='fallback: the chain in order, each an object with "kind" and its options.',
            ),
        ] = None,
        delay_ms: Annotated[int | None, Field(ge=0, le=600_000, description="echo: simulated latency in ms.")] = None,
        chunk_delay_ms: Annotated[
            int | None, Field(ge=0, le=60_000, description="echo: delay between words in ms.")
        ] = None,
    ) -> WorkerDescription:
        """Switch the inference backend atomically: requests in flight finish on the old worker,
        new ones go to the new worker. The new worker is health-checked first; on any error
        nothing changes. Parameters given here are the worker's defaults: a call's own
        max_tokens/temperature/... override them, and they override the config's.
        API keys come from the server's environment only (never from this tool)."""
        if not orchestrator.config.security.allow_configure:  # read per call: a config reload may change it
            raise ToolError("configure_worker is disabled by [security] allow_configure = false")
        options = {
            "model": model,
            "base_url": base_url,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "seed": seed,
            "stop": stop,
            "system": system,
            "stream": stream,
            "strategy": strategy,
            "replicas": replicas,
            "members": members,
            "delay_ms": delay_ms,
            "chunk_delay_ms": chunk_delay_ms,
        }
        try:
            worker = build_worker(kind, options, orchestrator.worker_context(trusted=False))
        except WorkerSpecError as exc:
            raise _tool_error(exc) from None
        try:
            previous = await orchestrator.pipeline.swap_worker(worker)
        except (WorkerError, TimeoutError) as exc:
            await worker.aclose()
            raise ToolError(f"kind: the new {kind} worker failed its health check, old worker kept: {exc}") from None
        log.info("worker swapped: %s -> %s", previous.describe(), worker.describe())
        return WorkerDescription(
            kind=worker.kind, model=worker.model, previous=previous.describe(), settings=worker.describe()
        )

    server.middleware.append(ToolArgumentGuard(server))
    return server


def _progress_requested(ctx: Context) -> bool:
    """Whether the caller passed a progress token (or, in process, a progress callback)."""
    request = ctx.request_context
    if request.meta and request.meta.get("progress_token") is not None:
        return True
    params_meta = (request.params or {}).get("_meta")
    if isinstance(params_meta, dict) and params_meta.get("progressToken") is not None:
        return True
    # The SDK's in-process dispatcher (mcp.Client(server)) carries the callback itself, not a
    # token, behind wrapper contexts; the in-memory progress test catches it if this private
    # detail of SDK 2.3 ever changes.
    outbound = getattr(request.session, "_request_outbound", None)
    for _ in range(4):
        if outbound is None:
            return False
        if getattr(outbound, "_on_progress", None) is not None:
            return True
        outbound = getattr(outbound, "_inner", None)
    return False


async def _run_with_progress(orchestrator: "Orchestrator", submission: Submission, ctx: Context) -> InferResult:
    """Run `submission`, forwarding chunks as progress notifications when the caller asked for them."""
    if not _progress_requested(ctx):
        # The common case for plain tool calls: no forwarding task, no extra stream.
        try:
            return await orchestrator.infer(submission)
        except OrchestratorError as exc:
            raise _tool_error(exc) from None
    send, receive = anyio.create_memory_object_stream[str](PROGRESS_BUFFER)

    def on_chunk(text: str) -> None:
        # Progress is best effort: a slow client loses chunks, never the answer.
        try:
            send.send_nowait(text)
        except (anyio.WouldBlock, anyio.ClosedResourceError, anyio.BrokenResourceError):
            pass

    outcome: InferResult | OrchestratorError
    forwarded = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(_forward_progress, receive, ctx, forwarded)
        try:
            outcome = await orchestrator.infer(submission, on_chunk)
        except OrchestratorError as exc:
            outcome = exc
        finally:
            send.close()
        # Let the queued chunks reach the client before the result, but never wait forever.
        with anyio.move_on_after(PROGRESS_DRAIN_S):
            await forwarded.wait()
        tg.cancel_scope.cancel()
    if isinstance(outcome, OrchestratorError):
        raise _tool_error(outcome)
    return outcome


async def _forward_progress(receive: MemoryObjectReceiveStream[str], ctx: Context, done: anyio.Event) -> None:
    count = 0
    try:
        async with receive:
            async for text in receive:
                count += 1
                await ctx.report_progress(count, None, text)
    finally:
        done.set()
