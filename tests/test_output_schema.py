"""infer's output schema, read and checked through real MCP client sessions.

MCP clients validate every structured result against the tool's output schema (the
Python SDK's client does it with jsonschema on each call), so the schema is published
flat (no $ref, no anyOf: see models.flat_json_schema). It must still document every
field of InferResult, and every result infer returns must validate against it.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from mcp_orchestrator.models import Hop, InferResult, Provenance, StageTimings, Usage
from mcp_orchestrator.server.background import JobView
from mcp_orchestrator.server.schema import flat_json_schema
from mcp_orchestrator.workers.base import WorkerError
from tests.conftest import error_text, make_config, running, wait_for, with_progress
from tests.support_admission import GatedWorker, serving, start_call
from tests.support_workers import Scripted

pytestmark = pytest.mark.anyio

CALL_TIMEOUT_S = 20.0
COMBINATORS = ("$ref", "$defs", "anyOf", "allOf", "oneOf")


async def published(client: Any, tool: str = "infer") -> dict[str, Any]:
    listing = await client.list_tools()
    schema = next(t.output_schema for t in listing.tools if t.name == tool)
    assert schema is not None, f"{tool} publishes no output schema"
    return dict(schema)


def subschemas(schema: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every schema object inside `schema` (itself included)."""
    yield schema
    for name in ("properties", "patternProperties"):
        for sub in schema.get(name, {}).values():
            yield from subschemas(sub)
    for name in ("items", "additionalProperties", "not"):
        if isinstance(schema.get(name), dict):
            yield from subschemas(schema[name])
    for name in ("anyOf", "allOf", "oneOf", "prefixItems"):
        for sub in schema.get(name, []):
            yield from subschemas(sub)


def fields_of(model: type[Any]) -> set[str]:
    return set(model.model_fields)


# ---------------------------------------------------------------------------- what is published


async def test_infer_and_replay_publish_the_flat_schema_of_infer_result() -> None:
    async with running() as (_, client):
        either = await published(client, "infer")
        replay = await published(client, "replay_dead_letter")
    # Fails if the SDK stops deriving the output schema from the return annotation's model
    # (the output models' pydantic JSON-schema hooks) and publishes pydantic's nested one again.
    # infer answers, or (background=true) says where its request is: two flat branches, the
    # answer first (a validator stops at the first branch that accepts).
    assert either["type"] == "object" and set(either) == {"type", "anyOf"}
    infer, queued = either["anyOf"]
    assert infer == flat_json_schema(InferResult)
    assert queued == flat_json_schema(JobView)
    assert replay == infer
    Draft202012Validator.check_schema(either)
    for branch in (infer, queued):
        for node in subschemas(branch):
            assert not set(node) & set(COMBINATORS), f"not flat: {node}"


async def test_the_schema_documents_every_field_with_its_type() -> None:
    async with running() as (_, client):
        schema = await published(client, "replay_dead_letter")
    top = schema["properties"]
    assert set(top) == fields_of(InferResult)
    assert set(top["usage"]["properties"]) == fields_of(Usage)
    assert set(top["stage_ms"]["properties"]) == fields_of(StageTimings)
    assert set(top["provenance"]["properties"]) == fields_of(Provenance)
    assert set(top["provenance"]["properties"]["fallbacks"]["items"]["properties"]) == fields_of(Hop)
    for name, field in top.items():
        assert field.get("description"), f"{name} has no description"
    for node in subschemas(schema):
        assert "type" in node, f"no type: {node}"
    assert schema["required"] == [name for name, info in InferResult.model_fields.items() if info.is_required()]
    assert top["finish_reason"]["type"] == ["string", "null"]
    assert top["provenance"]["type"] == ["object", "null"]
    assert top["attempts"]["minimum"] == 0
    hop = top["provenance"]["properties"]["fallbacks"]["items"]
    assert hop["properties"]["status"]["type"] == ["integer", "null"]
    assert hop["properties"]["breaker"]["enum"] == ["closed", "open", "half_open"]


# ---------------------------------------------------------------------------- every result validates


def checked(schema: dict[str, Any], result: Any) -> dict[str, Any]:
    assert not result.is_error, result.content
    data: dict[str, Any] = result.structured_content
    Draft202012Validator(schema).validate(data)
    assert set(data) == fields_of(InferResult)  # every field is sent, defaults included
    return data


async def test_fresh_cached_capped_and_streamed_answers_validate() -> None:
    chunks: list[str | None] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        chunks.append(message)

    async with running() as (_, client):
        schema = await published(client)
        with anyio.fail_after(CALL_TIMEOUT_S):
            fresh = checked(schema, await client.call_tool("infer", {"prompt": "one two three"}))
            cached = checked(schema, await client.call_tool("infer", {"prompt": "one two three"}))
            capped = checked(schema, await client.call_tool("infer", {"prompt": "a b c d", "max_tokens": 2}))
            stopped = checked(schema, await client.call_tool("infer", {"prompt": "a b STOP c", "stop": ["STOP"]}))
            streamed = checked(
                schema,
                await client.call_tool("infer", {"prompt": "x y z", "cache": False}, **with_progress(on_progress)),
            )
    assert fresh["cached"] is False and fresh["provenance"] is not None
    assert cached["cached"] is True
    assert capped["finish_reason"] == "length"
    assert stopped["text"] == "a b"
    assert streamed["text"] == "x y z" and chunks


async def test_coalesced_answers_validate() -> None:
    worker = GatedWorker()
    async with serving(worker=worker) as (orchestrator, client):
        schema = await published(client)
        with anyio.fail_after(CALL_TIMEOUT_S):
            async with anyio.create_task_group() as tg:
                calls = [start_call(tg, client, {"prompt": "shared"}) for _ in range(3)]
                await wait_for(lambda: orchestrator.status().cache.waiting == 2)
                worker.open()
    results = [checked(schema, call.result) for call in calls]
    assert sorted(result["coalesced"] for result in results) == [False, True, True]


async def test_answers_after_failed_calls_and_replays_validate() -> None:
    retryable = WorkerError("scripted", "overloaded", retryable=True, status=503)
    dropped = WorkerError("scripted", "connection reset", retryable=True)
    permanent = WorkerError("scripted", "bad request", retryable=False, status=400)
    worker = Scripted(retryable, dropped, "ok", permanent, "ok")
    config = make_config(resilience={"retry_base_ms": 1, "retry_max_ms": 2, "retry_attempts": 3})
    async with serving(config, worker=worker) as (_, client):
        schema = await published(client)
        with anyio.fail_after(CALL_TIMEOUT_S):
            retried = checked(schema, await client.call_tool("infer", {"prompt": "retry me", "cache": False}))
            failed = await client.call_tool("infer", {"prompt": "fail me", "cache": False})
            assert "bad request" in error_text(failed)
            letters = (await client.call_tool("dead_letters", {})).structured_content
            assert letters is not None and letters["entries"]
            replayed = checked(
                schema, await client.call_tool("replay_dead_letter", {"id": letters["entries"][0]["id"]})
            )
    hops = retried["provenance"]["fallbacks"]
    assert [hop["status"] for hop in hops] == [503, None]
    assert replayed["text"] == "hello world"


# ---------------------------------------------------------------------------- flat means the same


def nullable(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.none() | strategy


names = st.text(max_size=8)
counts = st.integers(min_value=0, max_value=10**6)
millis = st.floats(min_value=0, max_value=1e6, allow_nan=False)
breakers = st.sampled_from(["closed", "open", "half_open"])
hops = st.fixed_dictionaries(
    {"worker": names, "error": names, "status": nullable(st.integers(100, 599)), "breaker": breakers}
)
results = st.fixed_dictionaries(
    {
        "request_id": names,
        "text": st.text(max_size=20),
        "worker": names,
        "model": names,
        "usage": st.fixed_dictionaries({"input_tokens": counts, "output_tokens": counts}),
        "finish_reason": nullable(names),
        "latency_ms": millis,
        "stage_ms": st.fixed_dictionaries({name: millis for name in StageTimings.model_fields}),
        "coalesced": st.booleans(),
        "cached": st.booleans(),
        "attempts": counts,
        "provenance": nullable(
            st.fixed_dictionaries(
                {
                    "worker": names,
                    "attempts": counts,
                    "retries": counts,
                    "fallbacks": st.lists(hops, max_size=3),
                    "breaker": breakers,
                }
            )
        ),
    }
)
odd_values = st.sampled_from([None, "x", "", -1, 0, 2.5, True, [], {}, [None], {"worker": 1}])


def paths(data: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every key path into `data` (dict keys and list indexes)."""
    children = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for key, value in children:
        yield (*prefix, key)
        yield from paths(value, (*prefix, key))


def mutated(data: dict[str, Any], path: tuple[Any, ...], value: Any, delete: bool) -> dict[str, Any]:
    copied = copy.deepcopy(data)
    parent: Any = copied
    for key in path[:-1]:
        parent = parent[key]
    if delete and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return copied


NESTED = Draft202012Validator(InferResult.model_json_schema(mode="serialization"))
FLAT = Draft202012Validator(flat_json_schema(InferResult))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=results, choice=st.data(), value=odd_values, delete=st.booleans())
def test_flat_and_nested_schemas_accept_and_reject_the_same_results(
    data: dict[str, Any], choice: st.DataObject, value: Any, delete: bool
) -> None:
    dumped = InferResult.model_validate(data).model_dump(mode="json")
    assert NESTED.is_valid(dumped) and FLAT.is_valid(dumped)
    path = choice.draw(st.sampled_from(list(paths(dumped))))
    changed = mutated(dumped, path, value, delete)
    assert FLAT.is_valid(changed) == NESTED.is_valid(changed), (path, value, delete)


def test_flat_schema_rejects_what_infer_result_forbids() -> None:
    good = InferResult(
        request_id="r",
        text="t",
        worker="echo",
        model="echo",
        usage=Usage(),
        latency_ms=1.0,
        stage_ms=StageTimings(),
        provenance=Provenance(worker="echo", attempts=1, breaker="closed"),
    ).model_dump(mode="json")
    assert FLAT.is_valid(good)
    for path, value in [
        (("request_id",), 7),
        (("usage", "input_tokens"), "2"),
        (("attempts",), -1),
        (("provenance", "breaker"), "ajar"),
        (("provenance", "fallbacks"), [{"worker": "a", "error": "b", "breaker": "closed", "status": "500"}]),
        (("finish_reason",), 3),
    ]:
        assert not FLAT.is_valid(mutated(good, path, value, delete=False)), path
    assert not FLAT.is_valid(mutated(good, ("text",), None, delete=True))
