"""Configuration: TOML file -> pydantic models, with errors that name the key.

Every section and key is optional; the defaults are the seeds' production values.
Unknown keys are errors (with a did-you-mean), so a typo never silently falls back
to a default.
"""

from __future__ import annotations

import difflib
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PipelineSection(_Section):
    name: str = "mcp-orchestrator"
    version: str = "1.0"
    description: str = ""
    default_deadline_ms: PositiveInt = 120_000
    max_deadline_ms: PositiveInt = 600_000
    dead_letter_capacity: PositiveInt = 1000
    max_prompt_chars: PositiveInt = 200_000
    priority_aging_ms: PositiveInt = 10_000
    """A waiting request gains one priority level per this many milliseconds, so Low never starves."""


class StageSection(_Section):
    enabled: bool = True
    channel_capacity: PositiveInt = 512
    timeout_ms: PositiveInt = 5000


class RagSection(StageSection):
    max_context_tokens: PositiveInt = 2048


class AssembleSection(StageSection):
    timeout_ms: PositiveInt = 1000


class PostProcessSection(StageSection):
    timeout_ms: PositiveInt = 1000
    max_output_chars: PositiveInt | None = None
    """Cap on the final text length (after stop sequences); None means no cap."""
    strip_whitespace: bool = True


class StreamSection(StageSection):
    channel_capacity: PositiveInt = 256
    timeout_ms: PositiveInt = 1000


class InferenceSection(StageSection):
    channel_capacity: PositiveInt = 1024
    timeout_ms: PositiveInt = 30_000
    worker: str = "echo"
    model: str | None = None
    max_tokens: PositiveInt = 1024
    temperature: Annotated[float, Field(ge=0, le=2)] = 0.7
    concurrency: PositiveInt = 64
    delay_ms: Annotated[int, Field(ge=0)] = 0
    """Echo worker only: simulated latency before the first chunk."""

    @model_validator(mode="after")
    def _inference_cannot_be_disabled(self) -> InferenceSection:
        if not self.enabled:
            raise ValueError("the inference stage cannot be disabled (enabled must be true)")
        return self


class StagesSection(_Section):
    rag: RagSection = Field(default_factory=RagSection)
    assemble: AssembleSection = Field(default_factory=AssembleSection)
    inference: InferenceSection = Field(default_factory=InferenceSection)
    post_process: PostProcessSection = Field(default_factory=PostProcessSection)
    stream: StreamSection = Field(default_factory=StreamSection)


class ResilienceSection(_Section):
    retry_attempts: Annotated[int, Field(ge=0, le=20)] = 3
    retry_base_ms: PositiveInt = 100
    retry_max_ms: PositiveInt = 5000
    circuit_breaker_threshold: PositiveInt = 5
    circuit_breaker_timeout_s: PositiveFloat = 60
    circuit_breaker_success_rate: Annotated[float, Field(gt=0, le=1)] = 0.8


class RateLimitsSection(_Section):
    enabled: bool = False
    requests_per_second: PositiveFloat = 100
    burst_capacity: PositiveInt = 20
    per_session_rps: PositiveFloat | None = None
    per_session_burst: PositiveInt | None = None


class DeduplicationSection(_Section):
    enabled: bool = True
    window_s: PositiveFloat = 300
    max_entries: PositiveInt = 10_000


class ObservabilitySection(_Section):
    log_level: Literal["debug", "info", "warning", "error"] = "warning"
    log_format: Literal["pretty", "json"] = "pretty"
    metrics_port: Annotated[int, Field(ge=1, le=65535)] | None = None
    """Serve Prometheus metrics on this port too (stdio mode has no other way to expose them)."""


class DistributedSection(_Section):
    redis_url: str | None = None
    node_id: str | None = None


class ServerSection(_Section):
    transport: Literal["stdio", "http"] = "stdio"
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8000
    allowed_hosts: list[str] = Field(default_factory=list)
    """Extra Host header values (host or host:port) accepted when binding a non-loopback interface."""
    allowed_origins: list[str] = Field(default_factory=list)
    auth_token_env: str = "MCP_ORCHESTRATOR_TOKEN"
    """Name of the environment variable holding the optional bearer token for HTTP mode."""


class SecuritySection(_Section):
    allow_configure: bool = True


class Config(_Section):
    pipeline: PipelineSection = Field(default_factory=PipelineSection)
    stages: StagesSection = Field(default_factory=StagesSection)
    resilience: ResilienceSection = Field(default_factory=ResilienceSection)
    rate_limits: RateLimitsSection = Field(default_factory=RateLimitsSection)
    deduplication: DeduplicationSection = Field(default_factory=DeduplicationSection)
    observability: ObservabilitySection = Field(default_factory=ObservabilitySection)
    distributed: DistributedSection = Field(default_factory=DistributedSection)
    server: ServerSection = Field(default_factory=ServerSection)
    security: SecuritySection = Field(default_factory=SecuritySection)


class ConfigError(Exception):
    """A configuration problem; `problems` holds one line per bad key."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__("\n".join(f"{source}: {p}" for p in problems))


def _allowed_keys(model: type[BaseModel], loc: tuple[str | int, ...]) -> list[str]:
    """The field names valid at `loc` (the parent of an unknown key)."""
    current: Any = model
    for part in loc:
        field = current.model_fields.get(part) if isinstance(part, str) else None
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return []
        current = field.annotation
    return list(current.model_fields)


def describe_validation_error(error: ValidationError, model: type[BaseModel] = Config) -> list[str]:
    """One human line per problem: the dotted key, what is wrong, what is allowed."""
    lines = []
    for item in error.errors():
        loc = tuple(item["loc"])
        key = ".".join(str(p) for p in loc) or "(root)"
        if item["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, loc[:-1])
            hint = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            suggestion = f"; did you mean '{hint[0]}'?" if hint else ""
            lines.append(f"{key}: unknown key{suggestion} (allowed: {', '.join(allowed)})")
            continue
        message = item["msg"].removeprefix("Value error, ")
        bad = item.get("input")
        shown = "" if isinstance(bad, dict) else f" (got {bad!r})"
        lines.append(f"{key}: {message}{shown}")
    return lines


def load_config(path: str | Path | None) -> Config:
    """Read and validate a TOML config file; None gives the defaults."""
    if path is None:
        return Config()
    source = str(path)
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(source, ["file not found"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(source, [f"cannot read file: {exc}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, [f"invalid TOML: {exc}"]) from None
    return config_from_mapping(raw, source)


def config_from_mapping(raw: dict[str, Any], source: str = "config") -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(source, describe_validation_error(exc)) from None


def apply_overrides(config: Config, overrides: dict[str, Any]) -> Config:
    """Return a copy of `config` with dotted keys (e.g. 'stages.inference.worker') replaced.

    Validated like the file, so a bad flag value is reported with its key.
    """
    data = config.model_dump()
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return config_from_mapping(data, "command line")
