"""The MCP surface: the tools, their arguments, and how results and errors are shaped.

Tools validate their arguments (pydantic constraints in the signatures; argument errors
are shaped in arguments.py), call the orchestrator and shape its answers (their output
models are in outputs.py). Every error the
orchestrator raises on purpose becomes a tool error here, in `_tool`, and nowhere else:
argument problems as `Invalid arguments for TOOL: ...`, everything else with its own
message (the SDK puts `Error executing tool TOOL: ` in front).

Deliberately no `from __future__ import annotations`: the SDK evaluates the tool
signatures, whose constraints use values from the config.
"""

import functools
import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import anyio
import anyio.lowlevel
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import CallToolResult, TextContent, ToolAnnotations
from pydantic import (
    AfterValidator,
    Field,
    Strict,
)

from mcp_orchestrator import __version__
from mcp_orchestrator.errors import (
    ConfigError,
    OrchestratorError,
    PipelineNotRunning,
    Problem,
    RateLimited,
    ShuttingDown,
    WorkerError,
)
from mcp_orchestrator.models import (
    BatchItem,
    DeadLetterReason,
    GenerationParams,
    InferResult,
    MaxTokens,
    PipelineStatus,
    Priority,
    Seed,
    StopList,
    Submission,
    Temperature,
    TopP,
)
from mcp_orchestrator.pipeline.request import ChunkSink, Request
from mcp_orchestrator.server.arguments import ArgumentCheck, ExtraCheck, blank, invalid_arguments
from mcp_orchestrator.server.background import (
    CANCEL_SETTLE_S,
    CURRENT_JOB,
    MAX_STATUS_WAIT_MS,
    as_job,
    describe,
    describe_request,
    queued_result,
    status_result,
)
from mcp_orchestrator.server.batching import batch_submissions, raw_item_problems, run_batch_call
from mcp_orchestrator.server.header_schemas import check_declared_headers_only
from mcp_orchestrator.server.identity import owner_of
from mcp_orchestrator.server.outputs import (
    BatchOrQueued,
    DeadLetterList,
    InferOrQueued,
    InferOutput,
    JobOutput,
    WorkerDescription,
)
from mcp_orchestrator.server.params import ParamsDetail
from mcp_orchestrator.server.progress import Reporter, with_heartbeat, with_progress
from mcp_orchestrator.server.tasks import TasksExtension
from mcp_orchestrator.workers.options import CONFIG_ONLY, WorkerOptions
from mcp_orchestrator.workers.registry import spec_problems, summaries

if TYPE_CHECKING:
    from mcp_orchestrator.orchestrator import Orchestrator

_Tool = TypeVar("_Tool", bound=Callable[..., Any])

INSTRUCTIONS = (
    "Runs prompts through a production LLM pipeline (RAG -> assemble -> inference -> "
    "post-process -> stream) with load shedding, deadlines and priorities. Use `infer` to "
    "get an answer, `batch_infer` for many prompts at once, `pipeline_status` to see load and "
    "health, `dead_letters` and `replay_dead_letter` for requests that were shed or failed, "
    "`configure_worker` to switch the model backend. For slow local models or long answers, "
    "pass background=true and fetch the result with `request_status` (cancel with `cancel_request`)."
)
MAX_SESSION_ID = 256
BACKGROUND_HELP = (
    "Return at once with a request_id instead of waiting (for slow models or long answers, which "
    "hosts may give up on); fetch the result with request_status."
)


def _non_blank(value: str | None) -> str | None:
    if value is not None and blank(value):
        raise ValueError("must contain some non-whitespace text")
    return value


NonBlank = AfterValidator(_non_blank)


def _answer(result: InferResult) -> CallToolResult:
    return CallToolResult(
        content=[TextContent(type="text", text=result.text)], structured_content=result.model_dump(mode="json")
    )


@dataclass(frozen=True)
class Surface:
    """The MCP server, and the switch that lists configure_worker or not ([security] allow_configure)."""

    server: MCPServer
    offer_configure_worker: Callable[[bool], None]


def build_server(orchestrator: "Orchestrator") -> Surface:
    config = orchestrator.config
    max_prompt = config.pipeline.max_prompt_chars
    max_items = config.batch.max_items
    max_deadline = config.pipeline.max_deadline_ms
    server = MCPServer(
        name=config.pipeline.name,
        version=config.pipeline.version or __version__,
        description=config.pipeline.description,
        instructions=INSTRUCTIONS,
        log_level=config.observability.log_level.upper(),  # type: ignore[arg-type]
        extensions=[TasksExtension(orchestrator.jobs, orchestrator.pipeline, config.tasks)],
        auth=orchestrator.oauth.settings if orchestrator.oauth else None,  # OAuth over HTTP: server/oauth.py
        token_verifier=orchestrator.oauth.verifier if orchestrator.oauth else None,
    )
    check_declared_headers_only(server)
    arguments = ArgumentCheck()
    # Arguments infer and batch_infer share (no __future__ annotations here: the SDK reads these).
    SystemArg = Annotated[str | None, Field(max_length=max_prompt, description="System prompt."), NonBlank]
    MaxTokensArg = Annotated[MaxTokens | None, Field(description="Cap on generated tokens.")]
    TemperatureArg = Annotated[Temperature | None, Field(description="Sampling temperature, 0 to 2.")]
    TopPArg = Annotated[TopP | None, Field(description="Nucleus sampling, (0, 1].")]
    SeedArg = Annotated[Seed | None, Field(description="Sampling seed, for repeatable answers.")]
    StopArg = Annotated[StopList | None, Field(description="Stop sequences (at most 16).")]
    CacheArg = Annotated[bool, Strict(), Field(description="Answer from (and store into) the result cache.")]
    BackgroundArg = Annotated[bool, Strict(), Field(description=BACKGROUND_HELP)]

    def tool(extra: ExtraCheck | None = None, **options: Any) -> Callable[[_Tool], _Tool]:
        """Register a tool: its docstring (dedented) is the description, its signature the
        input schema, and every OrchestratorError it raises becomes a tool error here."""

        def register(function: _Tool) -> _Tool:
            name = function.__name__

            @functools.wraps(function)
            async def run(*args: Any, **kwargs: Any) -> Any:
                if orchestrator.oauth and (refused := orchestrator.oauth.refusal(name)):  # scopes.py
                    raise ToolError(refused)  # before the tool runs: a refused call changes nothing
                try:
                    return await function(*args, **kwargs)
                except ConfigError as exc:  # bad option values: an argument error like any other
                    return invalid_arguments(name, exc.problems)
                except OrchestratorError as exc:
                    raise ToolError(str(exc)) from None

            server.tool(description=inspect.cleandoc(function.__doc__ or ""), **options)(run)
            arguments.add(name, function, extra)
            return function

        return register

    @tool(
        title="Run a prompt through the LLM pipeline",
        annotations=ToolAnnotations(
            read_only_hint=False, destructive_hint=False, idempotent_hint=True, open_world_hint=True
        ),
    )
    async def infer(
        ctx: Context,
        prompt: Annotated[str, Field(min_length=1, max_length=max_prompt, description="The user prompt."), NonBlank],
        session_id: Annotated[
            str | None,
            Field(
                min_length=1,
                max_length=MAX_SESSION_ID,
                description="Groups requests for rate limits and replica affinity.",
            ),
            NonBlank,
        ] = None,
        priority: Annotated[
            Priority, Field(description="Scheduling class: critical, high, normal or low.")
        ] = Priority.normal,
        system: SystemArg = None,
        max_tokens: MaxTokensArg = None,
        temperature: TemperatureArg = None,
        top_p: TopPArg = None,
        seed: SeedArg = None,
        stop: StopArg = None,
        deadline_ms: Annotated[
            int | None,
            Strict(),
            Field(ge=1, le=max_deadline, description="Give up after this many milliseconds (default from config)."),
        ] = None,
        dedup: Annotated[
            bool, Strict(), Field(description="Share the answer of an identical request in flight.")
        ] = True,
        cache: CacheArg = True,
        background: BackgroundArg = False,
    ) -> Annotated[CallToolResult, InferOrQueued]:
        """Run a prompt through the pipeline on the configured worker and return the answer.

        The text content is the answer; the structured result adds request id, worker,
        model, token usage, latency per stage, the cached/coalesced flags and provenance
        (the backend that answered, calls made, failed hops, its breaker state). Chunks are
        sent as progress notifications while they arrive; once one has been sent, a broken
        stream fails instead of being retried (a retry would repeat the text).

        For a slow local model or a long answer, pass background=true: the call returns at once
        with a request_id, and request_status(request_id, wait_ms) fetches the answer.
        """
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
        if background and CURRENT_JOB.get() is None:
            return await start_background(ctx, "infer", lambda: answer(ctx, submission))
        return await answer(ctx, submission)

    async def answer(ctx: Context, submission: Submission) -> CallToolResult:
        """One submission's answer: for a job (its request tracked there), or for this call
        (chunks and heartbeats as progress)."""
        job = CURRENT_JOB.get()
        if job is not None:
            request = orchestrator.submit(submission, job_id=job.id)
            job.track(request)
            return _answer(await orchestrator.wait(request))
        started: list[Request] = []

        def run(on_chunk: ChunkSink | None) -> Awaitable[InferResult]:
            request = orchestrator.submit(submission, on_chunk)
            started.append(request)
            return orchestrator.wait(request)

        def where() -> str:
            return describe_request(started[0], orchestrator.pipeline) if started else "starting"

        return _answer(await with_progress(ctx, run, where))

    async def start_background(
        ctx: Context, tool: str, body: Callable[[], Awaitable[CallToolResult]]
    ) -> CallToolResult:
        owner = owner_of(ctx.request_context)
        job = orchestrator.jobs.start(owner, tool, "background", lambda job: as_job(job, body))
        await orchestrator.jobs.hand_out(job)  # kept (and findable from every process) from now on
        await anyio.lowlevel.checkpoint()  # let it submit its request: the answer says where it is
        return queued_result(job, orchestrator.pipeline, config.tasks.poll_interval_ms)

    def batch_item_problems(arguments: dict[str, Any]) -> list[Problem]:
        return raw_item_problems(arguments, orchestrator.config.pipeline.max_prompt_chars)

    @tool(
        batch_item_problems,
        title="Run many prompts through the LLM pipeline",
        annotations=ToolAnnotations(
            read_only_hint=False, destructive_hint=False, idempotent_hint=True, open_world_hint=True
        ),
    )
    async def batch_infer(
        ctx: Context,
        prompts: Annotated[
            list[Annotated[str, Field(min_length=1, max_length=max_prompt), NonBlank]] | None,
            Field(min_length=1, max_length=max_items, description="The prompts, sharing every other argument."),
        ] = None,
        items: Annotated[
            list[BatchItem] | None,
            Field(
                min_length=1,
                max_length=max_items,
                description="Instead of prompts: items that may each set system, max_tokens, temperature, "
                "top_p, seed, stop or priority of their own.",
            ),
        ] = None,
        session_id: Annotated[
            str | None,
            Field(min_length=1, max_length=MAX_SESSION_ID, description="Groups requests for rate limits."),
            NonBlank,
        ] = None,
        priority: Annotated[Priority, Field(description="Scheduling class of every item.")] = Priority.normal,
        system: SystemArg = None,
        max_tokens: MaxTokensArg = None,
        temperature: TemperatureArg = None,
        top_p: TopPArg = None,
        seed: SeedArg = None,
        stop: StopArg = None,
        deadline_ms: Annotated[
            int | None,
            Strict(),
            Field(ge=1, le=max_deadline, description="Each item gives up after this many milliseconds."),
        ] = None,
        dedup: Annotated[
            bool, Strict(), Field(description="Identical items (and identical requests in flight) share one call.")
        ] = True,
        cache: CacheArg = True,
        background: BackgroundArg = False,
    ) -> Annotated[CallToolResult, BatchOrQueued]:
        """Run many prompts at once (give `prompts`, or `items` with settings of their own) and
        return one result per item, in input order, each with its own status: the answer, or
        the error and its dead letter. One item's failure does not fail the batch; identical
        items share one backend call (marked coalesced). Rate limits, priorities and the
        pipeline's concurrency apply to every item. Progress reports items done of the total.
        A large batch on a slow model takes long: pass background=true and fetch the results
        with request_status.
        """
        shared = Submission(
            prompt="-",
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
        submissions = batch_submissions(shared, prompts, items, max_prompt)
        if background and CURRENT_JOB.get() is None:
            return await start_background(ctx, "batch_infer", lambda: run_batch_call(ctx, orchestrator, submissions))
        return await run_batch_call(ctx, orchestrator, submissions)

    @tool(
        title="Status or result of a background request",
        annotations=ToolAnnotations(read_only_hint=True, idempotent_hint=True, open_world_hint=False),
    )
    async def request_status(
        ctx: Context,
        request_id: Annotated[
            str, Field(min_length=1, max_length=64, description="The request_id a background call returned.")
        ],
        wait_ms: Annotated[
            int,
            Strict(),
            Field(
                ge=0,
                le=MAX_STATUS_WAIT_MS,
                description=f"Wait up to this long for it to finish (at most {MAX_STATUS_WAIT_MS}, "
                "below hosts' tool timeouts).",
            ),
        ] = 0,
    ) -> Annotated[CallToolResult, JobOutput]:
        """The result of a request started with background=true (infer or batch_infer) once it is
        ready, else where it is (queued, stage, queue position, tokens streamed). Pass wait_ms to
        wait for it in this call; call again while it is not finished. Results are kept for a
        while after they finish ([tasks] ttl_s), then the id expires."""
        owner = owner_of(ctx.request_context)
        job = await orchestrator.jobs.find(owner, request_id)
        poll_ms = config.tasks.poll_interval_ms
        if wait_ms and not job.ended:

            async def wait(reporter: Reporter | None) -> bool:
                return await orchestrator.jobs.wait(job, wait_ms / 1000)

            await with_heartbeat(ctx, wait, lambda: describe(job, orchestrator.pipeline), None)
        return status_result(job, orchestrator.pipeline, poll_ms)

    @tool(
        title="Cancel a background request",
        annotations=ToolAnnotations(
            read_only_hint=False, destructive_hint=True, idempotent_hint=True, open_world_hint=False
        ),
    )
    async def cancel_request(
        ctx: Context,
        request_id: Annotated[
            str, Field(min_length=1, max_length=64, description="The request_id a background call returned.")
        ],
    ) -> Annotated[CallToolResult, JobOutput]:
        """Stop a request started with background=true. An identical request another caller is
        waiting for keeps running for that caller. Cancelling one that already finished changes
        nothing (its result stays available)."""
        owner = owner_of(ctx.request_context)
        job = await orchestrator.jobs.cancel(owner, request_id)
        await orchestrator.jobs.wait(job, CANCEL_SETTLE_S)
        return status_result(job, orchestrator.pipeline, config.tasks.poll_interval_ms)

    @tool(
        title="Pipeline status",
        annotations=ToolAnnotations(read_only_hint=True, idempotent_hint=True, open_world_hint=False),
    )
    async def pipeline_status() -> PipelineStatus:
        """Live figures: queue depth and capacity per stage, totals (submitted, completed, failed,
        shed, cancelled, in flight, coalesced, cache hits), the worker, rate limits, the result
        cache, dead letters, latency percentiles, uptime, and the circuit breaker of each backend
        (state, failures, calls refused, seconds until it lets probes through)."""
        return orchestrator.status()

    @tool(
        title="List dead letters",
        annotations=ToolAnnotations(read_only_hint=True, idempotent_hint=True, open_world_hint=False),
    )
    async def dead_letters(
        limit: Annotated[
            int, Strict(), Field(ge=1, le=1000, description="At most this many entries, newest first.")
        ] = 50,
        reason: Annotated[
            DeadLetterReason | None,
            Field(description=f"Only this reason: {', '.join(DeadLetterReason)}."),
        ] = None,
        session_id: Annotated[
            str | None, Field(min_length=1, max_length=MAX_SESSION_ID, description="Only this session's.")
        ] = None,
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
        """Run a dead letter's original request again (its prompt, parameters, priority and session)
        and return its result. A replay always reaches the backend: it neither answers from the
        cache nor joins an identical request in flight."""
        entry = orchestrator.pipeline.dead_letters.get(id)
        if entry is None:
            raise ToolError(f"id: no dead letter {id!r} (it may have been dropped; list them with dead_letters)")
        # A letter is replayed once (by any process, when shared through Redis): claim it first.
        token = await orchestrator.pipeline.claim_replay(id)
        # A replay is a new attempt at the backend: an answer cached since would not be one.
        submission = entry.submission.model_copy(update={"cache": False, "dedup": False})
        try:
            result = await with_progress(ctx, lambda on_chunk: orchestrator.infer(submission, on_chunk))
        except (RateLimited, ShuttingDown, PipelineNotRunning):
            await orchestrator.pipeline.release_replay(id, token)  # refused before it ran: try again later
            raise
        return _answer(result)

    async def configure_worker(kind: str, **options: Any) -> WorkerDescription:
        if not orchestrator.configure_allowed:  # a client may call it from a tool list read before a reload
            raise ToolError("configure_worker is disabled by [security] allow_configure")
        try:
            worker, previous = await orchestrator.configure_worker(kind, options)
        except (WorkerError, TimeoutError) as exc:
            raise ToolError(f"kind: the new {kind} worker failed its health check, old worker kept: {exc}") from None
        return WorkerDescription(
            kind=worker.kind, model=worker.model, previous=previous.describe(), settings=worker.describe()
        )

    configure_worker.__signature__ = _configure_worker_signature()  # type: ignore[attr-defined]
    configure_worker.__doc__ = """Switch the inference backend atomically: requests in flight finish on the old worker,
        new ones go to the new worker. The new worker is health-checked first; on any error
        nothing changes. Parameters given here are the worker's defaults: a call's own
        max_tokens/temperature/... override them, and they override the config's.
        API keys come from the server's environment only (never from this tool)."""
    offered = False

    def worker_option_problems(arguments: dict[str, Any]) -> list[Problem]:
        """Which options the chosen worker kind (and each member's) takes, and where an HTTP
        kind may connect, checked with the other argument problems."""
        kind = arguments.get("kind")
        if not isinstance(kind, str):
            return []
        options = {name: value for name, value in arguments.items() if name != "kind"}
        return spec_problems(kind, options, orchestrator.worker_context(trusted=False))

    def offer_configure_worker(offer: bool) -> None:
        """List configure_worker or not: a disabled tool is not shown to the model at all."""
        nonlocal offered
        if offer and not offered:
            tool(
                worker_option_problems,
                title="Configure the inference worker",
                annotations=ToolAnnotations(
                    read_only_hint=False, destructive_hint=True, idempotent_hint=True, open_world_hint=True
                ),
            )(configure_worker)
        elif offered and not offer:
            server.remove_tool("configure_worker")
        setting = orchestrator.config.security.allow_configure
        why = "unset, which means off over HTTP" if setting is None else "false"
        reason = f"configure_worker is disabled by [security] allow_configure ({why}); set it to true to offer it"
        arguments.withdraw("configure_worker", None if offer else reason)
        offered = offer

    offer_configure_worker(orchestrator.configure_allowed)
    server.middleware.append(arguments)
    server.middleware.append(ParamsDetail())
    return Surface(server, offer_configure_worker)


def _configure_worker_signature() -> inspect.Signature:
    """`kind` plus every worker option a tool call may set, from their one declaration
    (workers/options.py): names, types, limits and descriptions."""
    kinds = "; ".join(f"{name}: {summary}" for name, summary in summaries().items())
    parameters = [
        inspect.Parameter(
            "kind",
            inspect.Parameter.KEYWORD_ONLY,
            annotation=Annotated[str, Field(min_length=1, max_length=64, description=f"Worker kind. {kinds}.")],
        )
    ]
    for name, field in WorkerOptions.model_fields.items():
        if name in CONFIG_ONLY:
            continue
        metadata = (Field(description=field.description), *field.metadata)
        annotation = Annotated.__class_getitem__((field.annotation, *metadata))  # type: ignore[attr-defined]
        parameters.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=None))
    return inspect.Signature(parameters, return_annotation=WorkerDescription)
