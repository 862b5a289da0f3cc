"""Every tool through a real in-memory MCP client session: schemas, annotations, happy paths, bad input."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mcp import Client

from mcp_orchestrator.models import InferResult
from tests.conftest import error_text, make_config, running, status_of, totals_of, wait_for, with_progress

pytestmark = pytest.mark.anyio

CALL_TIMEOUT_S = 20.0
INFER_FIELDS = {
    "request_id",
    "text",
    "worker",
    "model",
    "usage",
    "latency_ms",
    "stage_ms",
    "coalesced",
    "cached",
    "attempts",
}
STAGES = ["rag", "assemble", "inference", "post_process", "stream"]


async def tools_by_name(client: Client) -> dict[str, Any]:
    listing = await client.list_tools()
    return {tool.name: tool for tool in listing.tools}


def resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    """Follow a local $ref (and a one-branch anyOf/allOf) inside a JSON schema."""
    for key in ("allOf", "anyOf"):
        if key in node:
            branches = [b for b in node[key] if b.get("type") != "null"]
            if len(branches) == 1:
                node = branches[0]
    ref = node.get("$ref")
    if ref is None:
        return node
    name = ref.removeprefix("#/$defs/")
    resolved: dict[str, Any] = schema["$defs"][name]
    return resolved


# ---------------------------------------------------------------------------- tools/list


async def test_tools_list_documents_every_argument() -> None:
    async with running() as (_, client):
        tools = await tools_by_name(client)
    assert {"infer", "pipeline_status", "dead_letters", "replay_dead_letter", "configure_worker"} <= set(tools)

    infer = tools["infer"].input_schema
    expected = {
        "prompt",
        "session_id",
        "priority",
        "system",
        "max_tokens",
        "temperature",
        "stop",
        "deadline_ms",
        "dedup",
        "cache",
    }
    assert expected <= set(infer["properties"])
    assert infer["required"] == ["prompt"]
    assert resolve(infer, infer["properties"]["priority"])["enum"] == ["critical", "high", "normal", "low"]
    for name in expected:
        assert resolve(infer, infer["properties"][name]).get("description") or infer["properties"][name].get(
            "description"
        ), f"infer.{name} has no description"

    letters = tools["dead_letters"].input_schema
    assert {"limit", "reason", "session_id"} <= set(letters["properties"])
    assert letters["properties"]["limit"]["default"] == 50
    assert set(resolve(letters, letters["properties"]["reason"])["enum"]) >= {"queue_full", "deadline_exceeded"}
    assert tools["replay_dead_letter"].input_schema["required"] == ["id"]
    configure = tools["configure_worker"].input_schema
    assert {"kind", "model", "delay_ms"} <= set(configure["properties"])
    assert "echo" in configure["properties"]["kind"]["description"]
    assert tools["pipeline_status"].input_schema.get("properties", {}) == {}


async def test_output_schemas_describe_structured_results() -> None:
    async with running() as (_, client):
        tools = await tools_by_name(client)

    published = tools["infer"].output_schema
    assert published is not None
    infer, queued = published["anyOf"]  # the answer, or (background=true) the queued request's status
    assert {"request_id", "status", "message"} <= set(queued["properties"])
    assert set(infer["properties"]) >= INFER_FIELDS
    assert {"input_tokens", "output_tokens"} <= set(resolve(infer, infer["properties"]["usage"])["properties"])
    assert set(STAGES) <= set(resolve(infer, infer["properties"]["stage_ms"])["properties"])

    status = tools["pipeline_status"].output_schema
    assert status is not None
    assert {"stages", "totals", "worker", "rate_limit", "latency_ms", "uptime_s"} <= set(status["properties"])
    totals = resolve(status, status["properties"]["totals"])["properties"]
    assert {"submitted", "completed", "failed", "shed", "cancelled", "in_flight", "coalesced", "cache_hits"} <= set(
        totals
    )
    stage = resolve(status, status["properties"]["stages"]["items"])["properties"]
    assert {"name", "depth", "capacity", "processed", "shed"} <= set(stage)

    letters = tools["dead_letters"].output_schema
    assert letters is not None
    entry = resolve(letters, letters["properties"]["entries"]["items"])["properties"]
    assert {"id", "request_id", "session_id", "stage", "reason", "error", "prompt_preview", "created_at"} <= set(entry)

    configure = tools["configure_worker"].output_schema
    assert configure is not None
    assert {"kind", "model"} <= set(configure["properties"])
    replay = tools["replay_dead_letter"].output_schema
    assert replay is not None
    assert set(replay["properties"]) >= INFER_FIELDS


async def test_annotations_say_what_each_tool_may_change() -> None:
    async with running() as (_, client):
        tools = await tools_by_name(client)
    assert tools["pipeline_status"].annotations.read_only_hint is True
    assert tools["dead_letters"].annotations.read_only_hint is True
    assert tools["configure_worker"].annotations.destructive_hint is True
    assert tools["configure_worker"].annotations.read_only_hint is False
    assert tools["infer"].annotations.read_only_hint is False
    assert tools["replay_dead_letter"].annotations.read_only_hint is False


# ---------------------------------------------------------------------------- happy paths


async def test_infer_returns_text_and_every_structured_field() -> None:
    prompt = "the quick brown fox"
    async with running() as (_, client):
        with anyio.fail_after(CALL_TIMEOUT_S):
            result = await client.call_tool("infer", {"prompt": prompt, "session_id": "s-1", "priority": "high"})
            totals = await totals_of(client)
    assert not result.is_error, result.content
    assert result.content[0].text == prompt
    data = result.structured_content
    assert data is not None
    assert set(data) >= INFER_FIELDS
    parsed = InferResult.model_validate(data)
    assert parsed.text == prompt
    assert parsed.worker == "echo"
    assert parsed.model == "echo"
    assert parsed.usage.input_tokens == 4
    assert parsed.usage.output_tokens == 4
    assert set(STAGES) <= set(data["stage_ms"])
    assert all(value >= 0 for value in data["stage_ms"].values())
    assert parsed.latency_ms >= 0
    assert parsed.coalesced is False
    assert parsed.cached is False
    assert parsed.attempts == 1
    assert len(parsed.request_id) >= 16
    assert totals["submitted"] == 1
    assert totals["completed"] == 1
    assert totals["in_flight"] == 0


async def test_infer_applies_system_stop_and_max_tokens() -> None:
    async with running() as (_, client):
        with anyio.fail_after(CALL_TIMEOUT_S):
            stopped = await client.call_tool(
                "infer", {"prompt": "alpha beta END gamma", "stop": ["END"], "system": "be brief", "temperature": 0}
            )
            capped = await client.call_tool("infer", {"prompt": "one two three four five", "max_tokens": 2})
    assert not stopped.is_error, stopped.content
    assert stopped.structured_content is not None
    assert stopped.structured_content["text"] == "alpha beta"
    assert stopped.structured_content["finish_reason"] == "stop"
    # The system prompt is part of what the worker received (echo counts its words as input).
    assert stopped.structured_content["usage"]["input_tokens"] == 4 + 2
    assert capped.structured_content is not None
    assert capped.structured_content["text"] == "one two"
    assert capped.structured_content["finish_reason"] == "length"
    assert capped.structured_content["usage"]["output_tokens"] == 2


async def test_infer_streams_chunks_as_progress_in_order_before_the_result() -> None:
    words = ["one", "two", "three", "four", "five", "six"]
    seen: list[tuple[float, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, message))

    async with running() as (_, client):
        with anyio.fail_after(CALL_TIMEOUT_S):
            result = await client.call_tool("infer", {"prompt": " ".join(words)}, **with_progress(on_progress))
            # Everything below was recorded before call_tool returned.
            received_before_result = list(seen)
    assert not result.is_error, result.content
    assert [message for _, message in received_before_result] == ["one", " two", " three", " four", " five", " six"]
    assert [progress for progress, _ in received_before_result] == [1, 2, 3, 4, 5, 6]
    assert "".join(m or "" for _, m in received_before_result) == result.content[0].text


async def test_pipeline_status_reads_the_live_pipeline() -> None:
    config = make_config(stages={"rag": {"channel_capacity": 7}, "inference": {"concurrency": 3}})
    async with running(config) as (orchestrator, client):
        before = await status_of(client)
        with anyio.fail_after(CALL_TIMEOUT_S):
            for index in range(3):
                assert not (await client.call_tool("infer", {"prompt": f"count me {index}"})).is_error
        after = await status_of(client)
        live = orchestrator.status().model_dump(mode="json")
    assert after["totals"] == live["totals"]
    assert after["stages"] == live["stages"]
    assert [stage["name"] for stage in before["stages"]] == STAGES
    assert before["stages"][0]["capacity"] == 7
    assert before["totals"]["submitted"] == 0
    assert after["totals"]["submitted"] == 3
    assert after["totals"]["completed"] == 3
    assert all(stage["processed"] == 3 for stage in after["stages"])
    assert after["worker"]["kind"] == "echo"
    assert after["latency_ms"]["p50"] > 0
    assert after["latency_ms"]["p50"] <= after["latency_ms"]["p99"]
    assert after["uptime_s"] >= before["uptime_s"]
    assert after["reconciles"] is True


async def test_dead_letters_is_empty_on_a_fresh_server() -> None:
    async with running(make_config(pipeline={"dead_letter_capacity": 12})) as (_, client):
        result = await client.call_tool("dead_letters", {})
    assert not result.is_error, result.content
    assert result.structured_content == {"entries": [], "total": 0, "capacity": 12}


async def test_configure_worker_swaps_the_worker_for_new_requests() -> None:
    async with running() as (_, client):
        with anyio.fail_after(CALL_TIMEOUT_S):
            configured = await client.call_tool("configure_worker", {"kind": "echo", "model": "parrot-2"})
            status = await status_of(client)
            answer = await client.call_tool("infer", {"prompt": "polly"})
    assert not configured.is_error, configured.content
    assert configured.structured_content is not None
    assert configured.structured_content["kind"] == "echo"
    assert configured.structured_content["model"] == "parrot-2"
    assert configured.structured_content["previous"]["model"] == "echo"
    assert status["worker"]["model"] == "parrot-2"
    assert answer.structured_content is not None
    assert answer.structured_content["model"] == "parrot-2"


async def test_configure_worker_can_be_disabled() -> None:
    async with running(make_config(security={"allow_configure": False})) as (_, client):
        before = await status_of(client)
        result = await client.call_tool("configure_worker", {"kind": "echo", "model": "other"})
        after = await status_of(client)
    assert "disabled by [security] allow_configure (false); set it to true to offer it" in error_text(result)
    assert after["worker"] == before["worker"]


# ---------------------------------------------------------------------------- bad input

LONG_PROMPT_LIMIT = 64

BAD_CALLS: list[tuple[str, dict[str, Any], list[str]]] = [
    ("infer", {}, ["prompt", "required"]),
    ("infer", {"prompt": ""}, ["prompt", "at least 1 character"]),
    ("infer", {"prompt": " \n\t "}, ["prompt", "non-whitespace"]),
    ("infer", {"prompt": "x" * (LONG_PROMPT_LIMIT + 1)}, ["prompt", f"at most {LONG_PROMPT_LIMIT} characters"]),
    ("infer", {"prompt": "hi", "priority": "urgent"}, ["priority", "'critical', 'high', 'normal' or 'low'"]),
    ("infer", {"prompt": "hi", "max_tokens": 0}, ["max_tokens", "greater than or equal to 1"]),
    ("infer", {"prompt": "hi", "max_tokens": -7}, ["max_tokens", "greater than or equal to 1"]),
    ("infer", {"prompt": "hi", "deadline_ms": 0}, ["deadline_ms", "greater than or equal to 1"]),
    ("infer", {"prompt": "hi", "deadline_ms": -50}, ["deadline_ms", "greater than or equal to 1"]),
    ("infer", {"prompt": "hi", "deadline_ms": 10**9}, ["deadline_ms", "less than or equal to 600000"]),
    ("infer", {"prompt": "hi", "temperature": 2.5}, ["temperature", "less than or equal to 2"]),
    ("infer", {"prompt": "hi", "temperature": -0.1}, ["temperature", "greater than or equal to 0"]),
    ("infer", {"prompt": "hi", "top_p": 0}, ["top_p", "greater than 0"]),
    ("infer", {"prompt": "hi", "stop": ["s"] * 17}, ["stop", "at most 16 items"]),
    ("infer", {"prompt": "hi", "stop": [""]}, ["stop", "at least 1 character"]),
    ("infer", {"prompt": "hi", "session_id": ""}, ["session_id", "at least 1 character"]),
    ("infer", {"prompt": "hi", "system": "y" * (LONG_PROMPT_LIMIT + 1)}, ["system", "at most"]),
    ("dead_letters", {"limit": 0}, ["limit", "greater than or equal to 1"]),
    ("dead_letters", {"limit": -1}, ["limit", "greater than or equal to 1"]),
    ("dead_letters", {"limit": 5000}, ["limit", "less than or equal to 1000"]),
    ("dead_letters", {"reason": "lost"}, ["reason", "'queue_full'"]),
    ("replay_dead_letter", {"id": "dl-99"}, ["id", "dl-99", "no dead letter"]),
    ("replay_dead_letter", {"id": ""}, ["id", "at least 1 character"]),
    ("configure_worker", {"kind": "gpt-9000"}, ["kind", "gpt-9000", "echo"]),
    ("configure_worker", {"kind": ""}, ["kind", "at least 1 character"]),
    ("configure_worker", {"kind": "echo", "delay_ms": -1}, ["delay_ms", "greater than or equal to 0"]),
    ("configure_worker", {"kind": "echo", "delay_ms": 10**9}, ["delay_ms", "less than or equal to 600000"]),
    ("configure_worker", {"kind": "echo", "chunk_delay_ms": -5}, ["chunk_delay_ms", "greater than or equal to 0"]),
]


@pytest.mark.parametrize(
    ("tool", "arguments", "fragments"), BAD_CALLS, ids=[f"{t}-{'-'.join(a) or 'none'}" for t, a, _ in BAD_CALLS]
)
async def test_bad_input_is_a_clear_tool_error_and_changes_nothing(
    tool: str, arguments: dict[str, Any], fragments: list[str]
) -> None:
    config = make_config(pipeline={"max_prompt_chars": LONG_PROMPT_LIMIT})
    async with running(config) as (orchestrator, client):
        with anyio.fail_after(CALL_TIMEOUT_S):
            assert not (await client.call_tool("infer", {"prompt": "warm up"})).is_error
            before = await status_of(client)
            letters_before = len(orchestrator.pipeline.dead_letters)
            result = await client.call_tool(tool, arguments)
            after = await status_of(client)
    message = error_text(result)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} missing from {message!r}"
    assert after["totals"] == before["totals"]
    assert after["stages"] == before["stages"]
    assert after["worker"] == before["worker"]
    assert len(orchestrator.pipeline.dead_letters) == letters_before


async def test_bad_input_mixed_with_good_calls_keeps_counters_exact() -> None:
    async with running() as (orchestrator, client):
        with anyio.fail_after(CALL_TIMEOUT_S):
            async with anyio.create_task_group() as tg:
                for index in range(10):
                    arguments = {"prompt": f"good {index}"} if index % 2 else {"prompt": "", "max_tokens": -1}
                    tg.start_soon(client.call_tool, "infer", arguments)
            await wait_for(
                lambda: (lambda t: t.completed + t.failed + t.shed + t.cancelled)(orchestrator.status().totals) == 5
            )
            totals = await totals_of(client)
    assert totals["submitted"] == 5
    assert totals["completed"] == 5
    assert totals["failed"] == 0


# ---------------------------------------------------------------------------- property: any arguments

ARGUMENT_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**12), max_value=10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=80),
    st.lists(st.text(max_size=5), max_size=20),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
)
INFER_ARGUMENTS = st.dictionaries(
    st.sampled_from(
        ["prompt", "session_id", "priority", "system", "max_tokens", "temperature", "top_p", "seed", "stop", "dedup"]
    ),
    ARGUMENT_VALUES,
).map(lambda arguments: {"prompt": "a prompt"} | arguments if "prompt" not in arguments else arguments)


# Argument problems (tool_guard) and pipeline refusals (ToolError) are the only errors expected.
ERROR_PREFIXES = ("Invalid arguments for infer: ", "Error executing tool infer: ")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arguments=INFER_ARGUMENTS)
def test_any_infer_arguments_give_a_result_or_a_clear_error_and_nothing_else(arguments: dict[str, Any]) -> None:
    """Whatever a model sends, infer answers or names what is wrong; a rejected call changes nothing."""

    async def check() -> None:
        async with running(make_config(pipeline={"max_prompt_chars": 50})) as (_, client):
            with anyio.fail_after(CALL_TIMEOUT_S):
                result = await client.call_tool("infer", arguments)
                totals = await totals_of(client)
        if result.is_error:
            message = error_text(result)
            prefix = next(p for p in ERROR_PREFIXES if message.startswith(p))
            assert len(message) > len(prefix), "a crash without a message"
            assert totals["submitted"] == 0, (arguments, message)
        else:
            assert result.structured_content is not None
            InferResult.model_validate(result.structured_content)
            assert totals["completed"] == 1

    anyio.run(check)


async def test_configure_worker_is_off_over_http_unless_allowed_and_says_so() -> None:
    async with running(make_config(server={"transport": "http"})) as (_, client):
        listed = {tool.name for tool in (await client.list_tools()).tools}
        result = await client.call_tool("configure_worker", {"kind": "echo", "model": "other"})
    assert "configure_worker" not in listed
    assert "allow_configure (unset, which means off over HTTP); set it to true" in error_text(result)


async def test_every_problem_of_a_call_is_named_in_one_answer() -> None:
    """Item problems, member problems and a base_url the operator did not allow were held back
    until the arguments model's own were fixed."""
    config = make_config(pipeline={"max_prompt_chars": 10}, security={"allow_configure": True})
    async with running(config) as (_, client):
        batch = await client.call_tool(
            "batch_infer", {"items": [{"prompt": "  "}, {"prompt": "x" * 20}], "temperature": 5}
        )
        pool = await client.call_tool(
            "configure_worker",
            {
                "kind": "pool",
                "strategy": "bad",
                "replicas": [{"kind": "echo", "base_url": "http://x"}, {"nokind": 1}, "x"],
            },
        )
        far = await client.call_tool(
            "configure_worker", {"kind": "open_ai", "base_url": "http://far.example", "temperature": 9}
        )
    assert [problem.split(":")[0] for problem in error_text(batch).split(": ", 1)[1].split("; ")] == [
        "temperature",
        "items.0.prompt",
        "items.1.prompt",
    ]
    text = error_text(pool)
    for key in (
        "strategy:",
        "replicas.2:",
        "replicas.0.base_url: not an option of worker kind 'echo'",
        "replicas.1.kind:",
    ):
        assert key in text, text
    assert "temperature:" in error_text(far) and "base_url: http://far.example is not an origin" in error_text(far)
