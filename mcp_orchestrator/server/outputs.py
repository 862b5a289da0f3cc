"""The tools' output models: what each tool's structured result is checked against (the SDK
validates every result with them) and the output schema it publishes (flat, so clients can
check every result cheaply: schema.py)."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, GetJsonSchemaHandler, ValidationError, model_validator
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

from mcp_orchestrator.models import BatchResult, DeadLetter, InferResult
from mcp_orchestrator.server.background import JobView
from mcp_orchestrator.server.schema import either, flat_json_schema


class InferOutput(InferResult):
    """InferResult as `replay_dead_letter` publishes it: the same fields, with the flat
    output schema of `flat_json_schema` (cheap for clients to validate every result against)."""

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        return flat_json_schema(InferResult)


class _Either(BaseModel):
    """An output model for a tool that returns one of two shapes: the SDK checks every
    structured result against its tool's output model, and this one accepts exactly what
    `first` or `second` accepts. Its published schema is `either(first, second)`."""

    model_config = ConfigDict(extra="allow")
    shapes: ClassVar[tuple[type[BaseModel], type[BaseModel]]]

    @model_validator(mode="before")
    @classmethod
    def _one_of_the_shapes(cls, data: Any) -> Any:
        first, second = cls.shapes
        try:
            first.model_validate(data)
        except ValidationError:
            second.model_validate(data)  # neither: this one's errors are raised
        return data

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        return either(*cls.shapes)


class InferOrQueued(_Either):
    """`infer`'s output: its result, or (background=true) the queued request's status. The
    answer's flat schema is the first branch: a validator that accepts it looks no further."""

    shapes = (InferResult, JobView)


class BatchOrQueued(_Either):
    """`batch_infer`'s output: the batch's results, or (background=true) its status."""

    shapes = (BatchResult, JobView)


class JobOutput(JobView):
    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        return flat_json_schema(JobView)


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
