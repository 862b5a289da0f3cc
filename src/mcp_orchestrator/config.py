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


class HttpSection(_Section):
    """The HTTP client all HTTP workers share: timeouts in seconds, connection limits."""

    connect_timeout_s: PositiveFloat = 5
    read_timeout_s: PositiveFloat = 60
    """Longest silence between two pieces of an answer (so also the longest wait for the first token)."""
    write_timeout_s: PositiveFloat = 10
    pool_timeout_s: PositiveFloat = 5
    """Longest wait for a free connection when all max_connections are busy."""
    max_connections: PositiveInt = 100
    max_keepalive_connections: Annotated[int, Field(ge=0)] = 20
    keepalive_expiry_s: PositiveFloat = 30


class InferenceSection(StageSection):
    channel_capacity: PositiveInt = 1024
    timeout_ms: PositiveInt = 30_000
    worker: str = "echo"
    """echo, open_ai, anthropic, llama_cpp, vllm, pool or fallback."""
    model: str | None = None
    max_tokens: PositiveInt = 1024
    temperature: Annotated[float, Field(ge=0, le=2)] = 0.7
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    seed: Annotated[int, Field(ge=0)] | None = None
    stop: list[Annotated[str, Field(min_length=1)]] | None = None
    """max_tokens ... stop are the defaults under every worker's own settings; a call overrides both."""
    system: str | None = None
    """System prompt the worker adds when the call has none (HTTP workers)."""
    concurrency: PositiveInt = 64
    delay_ms: Annotated[int, Field(ge=0)] = 0
    """Echo worker only: simulated latency before the first chunk."""
    base_url: str | None = None
    """HTTP workers: where the backend is (default from OPENAI_BASE_URL, LLAMA_CPP_URL, VLLM_URL or the provider)."""
    stream: bool | None = None
    """HTTP workers: stream the answer over SSE (default true)."""
    api_key_env: str | None = None
    """HTTP workers: the environment variable holding the API key (default OPENAI_API_KEY, ANTHROPIC_API_KEY, ...)."""
    strategy: Literal["round_robin", "least_loaded", "session_affinity"] | None = None
    """pool only: how replicas are chosen (default round_robin)."""
    virtual_nodes: PositiveInt | None = None
    """pool only: points per replica on the session-affinity hash ring (default 64)."""
    replicas: list[dict[str, Any]] | None = None
    """pool only: [[stages.inference.replicas]] tables, each with a kind and that kind's options."""
    members: list[dict[str, Any]] | None = None
    """fallback only: [[stages.inference.members]] tables, tried in order."""
    http: HttpSection = Field(default_factory=HttpSection)

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
    """Retries after the first call, for retryable failures only."""
    retry_base_ms: PositiveInt = 100
    retry_max_ms: PositiveInt = 5000
    """Retry n waits a random time in [0, min(retry_max_ms, retry_base_ms * 2**n)], at least Retry-After."""
    attempt_timeout_ms: PositiveInt | None = None
    """Cap on one backend call (to its last chunk); a call over it is a retryable failure. None: only the
    inference stage's timeout_ms and the request's deadline bound it."""
    circuit_breaker_threshold: PositiveInt = 5
    circuit_breaker_timeout_s: PositiveFloat = 60
    circuit_breaker_success_rate: Annotated[float, Field(gt=0, le=1)] = 0.8
    circuit_breaker_probes: Annotated[int, Field(ge=1, le=100)] = 5
    """Calls a half-open breaker lets through to judge the backend (it closes when
    circuit_breaker_success_rate of them succeed)."""

    @model_validator(mode="after")
    def _base_not_above_max(self) -> ResilienceSection:
        if self.retry_base_ms > self.retry_max_ms:
            raise ValueError(
                f"retry_base_ms ({self.retry_base_ms}) must not be greater than retry_max_ms ({self.retry_max_ms})"
            )
        return self


Rate = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class RateLimitsSection(_Section):
    """Token buckets in front of the pipeline; tokens are spent only on requests that will
    call the backend (cache hits and coalesced followers are free)."""

    enabled: bool = False
    requests_per_second: Rate = 100
    burst_capacity: PositiveInt = 20
    """Tokens a full bucket holds: at most requests_per_second * T + burst_capacity pass in any T seconds."""
    per_session_rps: Rate | None = None
    """Each session_id gets its own bucket at this rate (None: sessions share the global one only)."""
    per_session_burst: PositiveInt | None = None
    """Burst of each session's bucket; defaults to burst_capacity."""
    min_remaining_ms: Annotated[int, Field(ge=0)] = 100
    """A waiting request is admitted only while this much of its deadline is left, so no token
    is spent on a request that can no longer be answered (it is refused with retry_after_ms)."""

    @model_validator(mode="after")
    def _session_burst_needs_rate(self) -> RateLimitsSection:
        if self.per_session_burst is not None and self.per_session_rps is None:
            raise ValueError("per_session_burst needs per_session_rps (set both, or neither)")
        return self


class DeduplicationSection(_Section):
    """Coalescing of identical requests in flight and the result cache (both off when enabled = false)."""

    enabled: bool = True
    window_s: PositiveFloat = 300
    """How long a completed answer stays in the result cache."""
    max_entries: PositiveInt = 10_000
    """Cache size; storing one more evicts the least recently used."""


class ObservabilitySection(_Section):
    log_level: Literal["debug", "info", "warning", "error"] = "warning"
    log_format: Literal["pretty", "json"] = "pretty"
    metrics_port: Annotated[int, Field(ge=1, le=65535)] | None = None
    """Serve Prometheus metrics on this port too (stdio mode has no other way to expose them)."""


class DistributedSection(_Section):
    """Reserved for sharing cache, coalescing and rate limits across processes through Redis.

    Not implemented yet: setting redis_url is refused rather than silently ignored."""

    redis_url: str | None = None
    node_id: str | None = None

    @model_validator(mode="after")
    def _not_implemented(self) -> DistributedSection:
        if self.redis_url is not None:
            raise ValueError(
                "redis_url: distributed mode (cache and coalescing shared through Redis) is not implemented "
                "in this version; remove the key to run a single process"
            )
        return self


class ServerSection(_Section):
    transport: Literal["stdio", "http"] = "stdio"
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8000
    allowed_hosts: list[str] = Field(default_factory=list)
    """Extra Host header values (host or host:port) accepted when binding a non-loopback interface."""
    allowed_origins: list[str] = Field(default_factory=list)
    auth_token_env: str = "MCP_ORCHESTRATOR_TOKEN"
    """Name of the environment variable holding the optional bearer token for HTTP mode."""


DEFAULT_ALLOWED_HOSTS = ("localhost", "127.0.0.1", "::1", "api.openai.com", "api.anthropic.com")


class SecuritySection(_Section):
    allow_configure: bool = True
    allowed_hosts: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=lambda: list(DEFAULT_ALLOWED_HOSTS)
    )
    """Hosts configure_worker may point a worker's base_url at (exact names, or '*.example.com' for
    subdomains). Replaces the default: loopback plus each provider's official API host."""


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
