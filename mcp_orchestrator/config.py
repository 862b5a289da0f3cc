"""Configuration: TOML file -> pydantic models, with errors that name the file and the key.

Every section and key is optional; the defaults are the seeds' production values. Every
key does what docs/configuration.md says or is refused: unknown keys are errors (with a
did-you-mean), values are strict (`enabled = "yes"` or `1` is not a boolean), and keys
that exist in the seeds but cannot do anything here are refused with the reason.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from mcp_orchestrator.addresses import bind_host, check_oauth_url, check_url, host_entry, origin_entry
from mcp_orchestrator.errors import PAIR_ERROR, ConfigError, Problem, validation_problems
from mcp_orchestrator.event_loop import EventLoop, uvloop_missing
from mcp_orchestrator.models import MaxTokens, Temperature
from mcp_orchestrator.resilience.breaker import BreakerSettings
from mcp_orchestrator.resilience.retry import RetryPolicy
from mcp_orchestrator.security import OriginRule, redact_text
from mcp_orchestrator.workers.options import HttpSettings, WorkerOptions

PositiveInt = Annotated[int, Field(gt=0)]
MAX_CONCURRENCY = 10_000
"""Most inference tasks: each is a task of its own, started with the pipeline."""
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Port = Annotated[int, Field(ge=0, le=65535)]
ScopeName = Annotated[str, Field(pattern=r"^[\x21\x23-\x5B\x5D-\x7E]{1,128}$")]

"""An OAuth scope (RFC 6749 section 3.3: printable ASCII without space, quote or backslash)."""
HostEntry = Annotated[str, AfterValidator(host_entry)]
OriginEntry = Annotated[str, AfterValidator(origin_entry)]

_BREAKER = BreakerSettings()
_RETRY = RetryPolicy()


class _Section(BaseModel):
    # validate_default: a pair's check (AT_MOST) runs on its later key even when that key is
    # left at its default.
    model_config = ConfigDict(
        extra="forbid", strict=True, validate_assignment=True, validate_default=True, use_attribute_docstrings=True
    )

    AT_MOST: ClassVar[tuple[tuple[str, str], ...]] = ()
    """(lower, upper) key pairs: lower must not be greater than upper."""

    @field_validator("*")
    @classmethod
    def _within_its_pair(cls, value: Any, info: ValidationInfo) -> Any:
        """Check a pair once its second key is validated (the later one as declared; a single key
        when it is assigned), as a field check: so the pair's error comes with every other error
        of the file instead of only once they are fixed, as a model check's would."""
        for lower, upper in cls.AT_MOST:
            pair = {lower, upper}
            if info.field_name not in pair:
                continue
            (other,) = pair - {info.field_name}
            if other not in info.data:  # declared later (its own check sees this one), or invalid
                continue
            low, high = (value, info.data[upper]) if info.field_name == lower else (info.data[lower], value)
            if low > high:  # its own type: the message shows both values, no "(got ...)" needed
                raise PydanticCustomError(PAIR_ERROR, f"{lower} ({low}) must not be greater than {upper} ({high})")
        return value


class PipelineSection(_Section):
    AT_MOST = (("default_deadline_ms", "max_deadline_ms"),)

    name: Annotated[str, Field(min_length=1, max_length=128)] = "mcp-orchestrator"
    """The MCP server's name (serverInfo.name, what clients show)."""
    version: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    """The MCP server's version (serverInfo.version); default: the package version."""
    description: Annotated[str, Field(max_length=2000)] | None = None
    """The MCP server's description (serverInfo.description)."""
    default_deadline_ms: PositiveInt = 120_000
    """Deadline of a request that does not set deadline_ms."""
    max_deadline_ms: PositiveInt = 600_000
    """Largest deadline_ms a call may ask for."""
    dead_letter_capacity: PositiveInt = 1000
    """Dead letters kept; the oldest is dropped first."""
    dead_letter_max_bytes: Annotated[int, Field(ge=1024 * 1024)] = 64 * 1024 * 1024
    """Memory the dead letters may hold (each keeps its whole request for replay); the oldest
    are dropped first. At least 1 MiB."""
    max_prompt_chars: PositiveInt = 200_000
    """Longest prompt or system prompt accepted."""
    priority_aging_ms: PositiveInt = 10_000
    """A waiting request gains one priority level per this many milliseconds, so Low never starves."""


class _AlwaysOnStage(_Section):
    """A stage the pipeline cannot do without: `enabled` exists (the seeds' files set it) but
    only `true` is accepted, with the reason."""

    stage: ClassVar[str]
    why: ClassVar[str]

    enabled: bool = True
    """Always true (only rag and post_process can be disabled)."""

    @field_validator("enabled")
    @classmethod
    def _cannot_be_disabled(cls, value: bool) -> bool:
        if not value:
            raise ValueError(f"the {cls.stage} stage cannot be disabled: {cls.why} (only rag and post_process can be)")
        return value


class RagSection(_Section):
    enabled: bool = True
    """false: requests skip the stage (no context source is called, no context added)."""
    channel_capacity: PositiveInt = 512
    """Queue in front of the stage; a request arriving at a full queue is shed."""
    timeout_ms: PositiveInt = 5000
    """Longest wait for the context source (capped by the request's deadline)."""
    max_context_tokens: PositiveInt = 2048
    """Context kept from the source: whole passages, in order, while their word count fits."""
    source: Annotated[str, Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")] | None = None
    """The context source, "package.module:name": an object with an async retrieve(query, session_id,
    max_tokens), or a no-argument callable returning one. None: no retrieval (the stage passes requests on)."""


class AssembleSection(_AlwaysOnStage):
    stage = "assemble"
    why = "it builds the messages the worker receives"

    channel_capacity: PositiveInt = 512


class InferenceSection(WorkerOptions, _AlwaysOnStage):
    """The inference stage and its worker: `worker` is the kind, the worker options (declared in
    workers/options.py) configure it, and max_tokens ... stop are the defaults under every
    worker's own settings (a call's own win over both)."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True, use_attribute_docstrings=True)
    stage = "inference"
    why = "it calls the worker"

    channel_capacity: PositiveInt = 1024
    """The priority queue in front of the inference tasks; full -> shed."""
    timeout_ms: PositiveInt = 30_000
    """Longest time for the backend call, retries included (capped by the request's deadline)."""
    concurrency: Annotated[int, Field(ge=1, le=MAX_CONCURRENCY)] = 64
    """Requests running on the backend at once."""
    worker: Annotated[str, Field(min_length=1)] = "echo"
    """The worker kind: echo, open_ai, anthropic, llama_cpp, vllm, pool or fallback."""
    max_tokens: MaxTokens = 1024
    temperature: Temperature = 0.7
    http: HttpSettings = Field(default_factory=HttpSettings)
    """The HTTP client all HTTP workers share."""


class PostProcessSection(_Section):
    enabled: bool = True
    """false: requests skip the stage (no stop sequences, length cap or stripping applied here)."""
    channel_capacity: PositiveInt = 512
    max_output_chars: PositiveInt | None = None
    """Cap on the final text length (after stop sequences); None means no cap."""
    strip_whitespace: bool = True


class StreamSection(_AlwaysOnStage):
    stage = "stream"
    why = "it hands the answer to the caller"

    channel_capacity: PositiveInt = 256


class StagesSection(_Section):
    rag: RagSection = Field(default_factory=RagSection)
    assemble: AssembleSection = Field(default_factory=AssembleSection)
    inference: InferenceSection = Field(default_factory=InferenceSection)
    post_process: PostProcessSection = Field(default_factory=PostProcessSection)
    stream: StreamSection = Field(default_factory=StreamSection)


class ResilienceSection(_Section):
    AT_MOST = (("retry_base_ms", "retry_max_ms"),)

    retry_attempts: Annotated[int, Field(ge=0, le=20)] = _RETRY.retries
    """Retries after the first call, for retryable failures only."""
    retry_base_ms: PositiveInt = round(_RETRY.base_s * 1000)
    retry_max_ms: PositiveInt = round(_RETRY.max_s * 1000)
    """Retry n waits a random time in [0, min(retry_max_ms, retry_base_ms * 2**n)], at least Retry-After."""
    attempt_timeout_ms: PositiveInt | None = None
    """Cap on one backend call (to its last chunk); a call over it is a retryable failure. None: only the
    inference stage's timeout_ms and the request's deadline bound it."""
    circuit_breaker_threshold: PositiveInt = _BREAKER.threshold
    """Consecutive retryable failures that open a backend's breaker."""
    circuit_breaker_timeout_s: PositiveFloat = _BREAKER.timeout_s
    """How long an open breaker fails fast before letting probes through."""
    circuit_breaker_success_rate: Annotated[float, Field(gt=0, le=1)] = _BREAKER.success_rate
    circuit_breaker_probes: Annotated[int, Field(ge=1, le=100)] = _BREAKER.probes
    """Calls a half-open breaker lets through to judge the backend (it closes when
    circuit_breaker_success_rate of them succeed)."""

    def breaker_settings(self) -> BreakerSettings:
        return BreakerSettings(
            self.circuit_breaker_threshold,
            self.circuit_breaker_timeout_s,
            self.circuit_breaker_success_rate,
            self.circuit_breaker_probes,
        )

    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(self.retry_attempts, self.retry_base_ms / 1000, self.retry_max_ms / 1000)


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
    max_bytes: Annotated[int, Field(ge=1024 * 1024)] = 128 * 1024 * 1024
    """Memory the cached answers may hold; storing one more evicts the least recently used
    until it fits. At least 1 MiB."""


class ObservabilitySection(_Section):
    log_level: Literal["debug", "info", "warning", "error"] = "warning"
    log_format: Literal["pretty", "json"] = "pretty"
    metrics_port: Annotated[int, Field(ge=1, le=65535)] | None = None
    """Serve Prometheus metrics on this port too (stdio mode has no other way to expose them)."""


class DistributedSection(_Section):
    """Sharing cache, coalescing, rate limits, breaker state and dead letters with other
    orchestrator processes through Redis (see docs/operations.md, "Scaling out")."""

    redis_url: Annotated[str, Field(max_length=2048)] | None = None
    """redis://[user:password@]host:port[/db] (rediss:// for TLS). Unset: the REDIS_URL
    environment variable when it is set, else no sharing. An empty string turns sharing off
    even when REDIS_URL is set."""
    db: Annotated[int, Field(ge=0, le=1_000_000)] | None = None
    """Logical database; overrides the URL's /db. Unset: the URL's (0 when it names none)."""
    key_prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")] = "mcp-orchestrator"
    """Every key and channel this orchestrator uses starts with it (several deployments can share one Redis)."""
    node_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")] | None = None
    """This process's name in Redis (lock owners, dead letters' origin, status). Unset: host-pid."""
    timeout_ms: Annotated[int, Field(ge=1, le=10_000)] = 100
    """Longest wait for any one Redis command; past it the command counts as failed and the
    request carries on with local state."""
    lock_ttl_ms: Annotated[int, Field(ge=100, le=600_000)] = 10_000
    """Expiry of a flight's lock: renewed every third of it while the backend call runs, so a
    leader that dies is replaced by a waiting process within about this long."""

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        if value:
            _check_redis_url(value)
        return value

    def url(self, environ: Mapping[str, str]) -> str | None:
        """The Redis URL in effect: the file's, else REDIS_URL from `environ`; None: no sharing.
        ConfigError (source "environment") when REDIS_URL is in effect and unusable."""
        if self.redis_url is not None:
            return self.redis_url or None
        value = environ.get("REDIS_URL") or None
        if value is not None:
            try:
                _check_redis_url(value)
            except ValueError as exc:  # the value is not shown: it may hold a password
                raise ConfigError("environment", [Problem("REDIS_URL", str(exc))]) from None
        return value


def _check_redis_url(value: str) -> None:
    if not value.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("must start with redis://, rediss:// or unix://")
    if not value.startswith("unix://"):
        check_url(value, schemes=("redis", "rediss"), example="redis://127.0.0.1:6379/0", credentials=True)
    # Its query options too, as redis-py reads them (imported only when sharing is configured):
    # a bad one (?socket_timeout=abc) would otherwise stop the start with a traceback.
    from redis.asyncio import BlockingConnectionPool
    from redis.exceptions import RedisError

    try:
        pool = BlockingConnectionPool.from_url(value)
        pool.connection_class(**pool.connection_kwargs)  # builds a connection, does not connect
    except (ValueError, TypeError, RedisError) as exc:
        raise ValueError(f"redis-py cannot use it: {redact_text(str(exc))}") from None


class TasksSection(_Section):
    """Long calls: the MCP tasks extension and background requests (docs/tools.md, "Long calls")."""

    AT_MOST = (("max_open_per_caller", "max_open"),)

    inline_ms: Annotated[int, Field(ge=0, le=50_000)] = 5_000
    """A task-capable call waits this long for its answer before it becomes a task (0: at once)."""
    ttl_s: Annotated[float, Field(ge=1, le=86_400, allow_inf_nan=False)] = 900
    """How long a task or background request is kept after it ends; then its id is expired."""
    poll_interval_ms: Annotated[int, Field(ge=100, le=60_000)] = 2_000
    """The polling interval suggested to clients (pollIntervalMs)."""
    max_open: PositiveInt = 1_000
    """Tasks and background requests running at once, all callers together."""
    max_open_per_caller: PositiveInt = 100
    """Running at once for one caller (a stdio connection, a token's subject, an HTTP session)."""
    max_kept_bytes: Annotated[int, Field(ge=1024 * 1024)] = 64 * 1024 * 1024
    """Memory the results of ended tasks may hold; the oldest ended are dropped first. At least 1 MiB."""


class BatchSection(_Section):
    max_items: Annotated[int, Field(ge=1, le=10_000)] = 100
    """Most items one batch_infer call may hold."""
    concurrency: Annotated[int, Field(ge=1, le=1_000)] = 16
    """Items of one batch in the pipeline at once (identical items count once: they share a call)."""


class ServerSection(_Section):
    AT_MOST = (("max_sessions_per_client", "max_sessions"),)

    transport: Literal["stdio", "http"] = "stdio"
    host: Annotated[str, AfterValidator(bind_host)] = "127.0.0.1"
    port: Port = 8000
    allowed_hosts: list[HostEntry] = Field(default_factory=list)
    """Extra Host header values (host or host:port) accepted when binding a non-loopback interface."""
    allowed_origins: list[OriginEntry] = Field(default_factory=list)
    auth_token_env: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")] = "MCP_ORCHESTRATOR_TOKEN"
    """Name of the environment variable holding the optional bearer token for HTTP mode."""
    max_message_bytes: Annotated[int, Field(ge=1024)] = 4 * 1024 * 1024
    """Largest JSON-RPC message accepted: one stdio line, or one HTTP request body (413 above it).
    The default is the MCP SDK's HTTP body cap (4 MiB)."""
    shutdown_grace_s: Annotated[float, Field(ge=0, le=3600, allow_inf_nan=False)] = 10.0
    """On SIGTERM or SIGINT: how long requests in flight may take to finish before they are
    cancelled (each caller then gets an error saying so); 0 cancels them at once."""
    max_sessions: PositiveInt = 1000
    """HTTP: MCP sessions open at once, all clients together; one more is refused (503)."""
    max_sessions_per_client: PositiveInt = 50
    """HTTP: MCP sessions one client address (IPv6: its /64) may hold open at once; one more is
    refused (429) while other addresses still get sessions."""
    session_idle_s: PositiveFloat = 300
    """HTTP: a session with no request in flight (and no open GET stream) for this long is closed."""
    stateless: bool = False
    """HTTP: no sessions at all; every POST is served on its own (max_sessions,
    max_sessions_per_client and session_idle_s do not apply)."""
    oauth_issuer: str | None = None
    """HTTP: accept OAuth access tokens (JWTs) from this authorization server, exactly as its
    tokens' `iss` says; setting it turns OAuth on (with oauth_audience)."""
    oauth_audience: str | None = None
    """HTTP with OAuth: this server's public MCP URL (the resource, e.g. https://mcp.example.com/mcp);
    a token's `aud` must name it. Also where clients find the protected-resource metadata."""
    oauth_jwks_url: str | None = None
    """HTTP with OAuth: the issuer's key set; unset: read from the issuer's metadata
    (/.well-known/oauth-authorization-server, else /.well-known/openid-configuration)."""
    oauth_required_scopes: list[ScopeName] = Field(default_factory=list)
    """HTTP with OAuth: scopes every request needs (403 insufficient_scope without one)."""
    oauth_scope_read: ScopeName = "orchestrator:read"
    """HTTP with OAuth: the scope for pipeline_status, dead_letters, request_status (and /metrics)."""
    oauth_scope_use: ScopeName = "orchestrator:use"
    """HTTP with OAuth: the scope for infer, batch_infer, cancel_request (and what read allows)."""
    oauth_scope_admin: ScopeName = "orchestrator:admin"
    """HTTP with OAuth: the scope for configure_worker, replay_dead_letter and any tool not mapped
    (and what use allows)."""
    event_loop: EventLoop = "auto"
    """The event loop: uvloop when installed (auto), or asyncio's own (event_loop.py)."""

    @field_validator("event_loop")
    @classmethod
    def _loop_installed(cls, value: EventLoop) -> EventLoop:
        if value == "uvloop" and (missing := uvloop_missing()) is not None:
            raise ValueError(missing)
        return value

    @field_validator("oauth_issuer", "oauth_jwks_url", "oauth_audience")
    @classmethod
    def _oauth_url(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None:
            check_oauth_url(value, https_only=info.field_name != "oauth_audience")
        return value

    @model_validator(mode="after")
    def _oauth_complete(self) -> ServerSection:
        if self.oauth_issuer is not None and self.oauth_audience is None:
            raise ValueError(
                "oauth_issuer needs oauth_audience: this server's public MCP URL, which tokens must be issued for"
            )
        for name in ("oauth_audience", "oauth_jwks_url"):
            if getattr(self, name) is not None and self.oauth_issuer is None:
                raise ValueError(f"{name} needs oauth_issuer (the authorization server whose tokens are accepted)")
        return self


DEFAULT_WORKER_ORIGINS = (
    "https://api.openai.com",
    "https://api.anthropic.com",
    "http://localhost:8080",
    "http://127.0.0.1:8080",
    "http://localhost:8000",
    "http://127.0.0.1:8000",
)
"""The providers' official APIs and the local llama.cpp (8080) and vLLM (8000) defaults."""


class SecuritySection(_Section):
    allow_configure: bool | None = None
    """Whether the configure_worker tool exists. Default (unset): on over stdio, where the one
    client is the operator's own, off over HTTP, where every client would change the worker of
    all the others."""
    worker_origins: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=lambda: list(DEFAULT_WORKER_ORIGINS)
    )
    """Origins configure_worker may point a worker at, besides the base URLs the operator wrote
    (config file, flags, *_BASE_URL / *_URL environment variables): https://host[:port],
    host:port, host (its default port only) or *.domain[:port]. Replaces the default."""

    @field_validator("worker_origins")
    @classmethod
    def _origins(cls, entries: list[str]) -> list[str]:
        for entry in entries:
            OriginRule.parse(entry)  # ValueError says which forms are allowed
        return entries

    def rules(self) -> tuple[OriginRule, ...]:
        return tuple(OriginRule.parse(entry) for entry in self.worker_origins)

    def configure_allowed(self, transport: str) -> bool:
        return self.allow_configure if self.allow_configure is not None else transport == "stdio"


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
    tasks: TasksSection = Field(default_factory=TasksSection)
    batch: BatchSection = Field(default_factory=BatchSection)


NO_SUCH_KEY = {
    "security.allowed_hosts": "renamed to worker_origins, whose entries are origins (https://host[:port], "
    "host:port, host or *.domain[:port]); a host without a port now allows its default port only, never any port",
    **{
        f"stages.{stage}.timeout_ms": f"the {stage} stage does its work at once, so it has no timeout "
        "(only stages.rag and stages.inference have timeout_ms; the request's deadline bounds everything)"
        for stage in ("assemble", "post_process", "stream")
    },
}
"""Keys the seeds' configs have that cannot do anything here, and why."""


def _allowed_keys(model: type[BaseModel], loc: tuple[str | int, ...]) -> list[str] | None:
    """The field names valid at `loc` (the parent of an unknown key); None when `loc` is not a table of ours."""
    current: Any = model
    for part in loc:
        field = current.model_fields.get(part) if isinstance(part, str) else None
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return None
        current = field.annotation
    return list(current.model_fields)


def config_problems(error: ValidationError) -> list[Problem]:
    """One problem per bad key: the dotted key as written, what is wrong, what is allowed."""
    problems = []
    for problem in validation_problems(error, "key", lambda loc: _allowed_keys(Config, loc)):
        if problem.key in NO_SUCH_KEY:
            problem = Problem(problem.key, f"not a key: {NO_SUCH_KEY[problem.key]}")
        elif problem.key.startswith("distributed."):
            problem = Problem(problem.key, problem.message.partition(" (got ")[0])  # never echo a URL
        problems.append(problem)
    return problems


def load_config(path: str | Path | None) -> Config:
    """Read and validate a TOML config file; None gives the defaults."""
    if path is None:
        return Config()
    source = str(path)
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(source, [Problem("", "file not found")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(source, [Problem("", f"cannot read file: {exc}")]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, [Problem("", f"invalid TOML: {exc}")]) from None
    return config_from_mapping(raw, source)


def config_from_mapping(raw: dict[str, Any], source: str = "config") -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(source, config_problems(exc)) from None


def with_values(config: Config, values: dict[str, Any], source: str = "command line") -> Config:
    """A copy of `config` with dotted keys (e.g. 'stages.inference.worker') set to new values.
    Validated like a file, so a bad value is reported with its key."""
    data = config.model_dump()
    for dotted, value in values.items():
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return config_from_mapping(data, source)


def leaf_values(config: Config) -> dict[str, Any]:
    """Every setting as dotted key -> value (lists, such as replicas, are one value)."""

    def walk(data: dict[str, Any], prefix: str) -> dict[str, Any]:
        flat: dict[str, Any] = {}
        for key, value in data.items():
            if isinstance(value, dict):
                flat.update(walk(value, f"{prefix}{key}."))
            else:
                flat[f"{prefix}{key}"] = value
        return flat

    return walk(config.model_dump(mode="json"), "")


def changed_keys(old: Config, new: Config) -> list[str]:
    before, after = leaf_values(old), leaf_values(new)
    return sorted(key for key in before.keys() | after.keys() if before.get(key) != after.get(key))
