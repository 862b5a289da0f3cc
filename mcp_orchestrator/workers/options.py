"""Every option a worker can take, declared once.

`configure_worker`'s arguments, the `[stages.inference]` worker keys (and each replica's or
member's table) and each kind's spec in the registry are all made from `WorkerOptions`:
a name, a type, its limits and its description live here and nowhere else. Which kind
takes which option is `KIND_OPTIONS`; `CONFIG_ONLY` are the options a tool call may not
set (they choose which secret is sent where).

Depends on pydantic, models and addresses only, so the config can import it cheaply.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, field_validator

from mcp_orchestrator.addresses import check_url
from mcp_orchestrator.models import MaxTokens, Seed, StopList, Temperature, TopP

Strategy = Literal["round_robin", "least_loaded", "session_affinity"]
MemberTables = Annotated[list[dict[str, Any]], Field(min_length=1)]
Millis = Annotated[int, Strict(), Field(ge=0, le=600_000)]
Seconds = Annotated[float, Field(gt=0, le=3600, allow_inf_nan=False)]
"""An HTTP client timeout: finite (inf would mean none at all), an hour at most."""


class WorkerOptions(BaseModel):
    """A worker's own settings. Unset options take the kind's default; parameters (max_tokens
    ... system) sit under an `infer` call's own and over the config's `[stages.inference]` ones."""

    model_config = ConfigDict(extra="forbid", strict=True, use_attribute_docstrings=True)

    model: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    """Model name (default: the kind's own; llama_cpp serves the model it was started with, vllm asks the server)."""
    base_url: Annotated[str, Field(min_length=1, max_length=2048)] | None = None
    """HTTP kinds: where the backend is, e.g. http://localhost:8080 (llama_cpp) or https://api.openai.com/v1
    (open_ai). Default: the kind's environment variable (OPENAI_BASE_URL, ANTHROPIC_BASE_URL, LLAMA_CPP_URL,
    VLLM_URL), else the provider's own address. A tool call may only name an origin the operator allowed
    ([security] worker_origins, or a base URL of the config file or those variables)."""
    max_tokens: MaxTokens | None = None
    """Cap on generated tokens."""
    temperature: Temperature | None = None
    """Sampling temperature, 0 to 2."""
    top_p: TopP | None = None
    """Nucleus sampling, in (0, 1]."""
    seed: Seed | None = None
    """Sampling seed, for repeatable answers (open_ai, llama_cpp, vllm; the Anthropic API has none)."""
    stop: StopList | None = None
    """Stop sequences (at most 16)."""
    system: Annotated[str, Field(max_length=100_000)] | None = None
    """HTTP kinds: system prompt sent when a call has none."""
    stream: Annotated[bool, Strict()] | None = None
    """HTTP kinds: stream the answer over SSE (default true)."""
    api_key_env: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=128)] | None = None
    """HTTP kinds, config file only: the environment variable holding the API key (default OPENAI_API_KEY,
    ANTHROPIC_API_KEY, LLAMA_API_KEY or VLLM_API_KEY)."""
    strategy: Strategy | None = None
    """pool: how replicas are chosen: round_robin (default), least_loaded or session_affinity."""
    virtual_nodes: Annotated[int, Strict(), Field(ge=1, le=1024)] | None = None
    """pool: points per replica on the session-affinity hash ring (default 64)."""
    replicas: Annotated[MemberTables, Field(max_length=32)] | None = None
    """pool: the replicas, each a table with "kind" and that kind's options,
    e.g. {"kind": "llama_cpp", "base_url": "http://127.0.0.1:8081"}."""
    members: Annotated[MemberTables, Field(max_length=8)] | None = None
    """fallback: the chain in order, each a table with "kind" and its options."""
    delay_ms: Millis | None = None
    """echo: simulated time to the first word, in ms."""
    chunk_delay_ms: Annotated[int, Strict(), Field(ge=0, le=60_000)] | None = None
    """echo: delay between words, in ms."""

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = check_url(value, schemes=("http", "https"), example="http://localhost:8080")
        if parts.query or parts.fragment:
            raise ValueError("must not have a query string or fragment")
        return value


OPTION_NAMES: tuple[str, ...] = tuple(WorkerOptions.model_fields)
PARAMETER_OPTIONS = frozenset({"max_tokens", "temperature", "top_p", "seed", "stop"})
"""Generation parameters: also the config's defaults under every worker's own settings."""
CONFIG_ONLY = frozenset({"api_key_env"})

_HTTP = frozenset(
    {"model", "base_url", "max_tokens", "temperature", "top_p", "stop", "system", "stream", "api_key_env"}
)
KIND_OPTIONS: dict[str, frozenset[str]] = {
    "echo": frozenset({"model", "max_tokens", "delay_ms", "chunk_delay_ms"}),
    "open_ai": _HTTP | {"seed"},
    "anthropic": _HTTP,
    "llama_cpp": _HTTP | {"seed"},
    "vllm": _HTTP | {"seed"},
    "pool": frozenset({"strategy", "virtual_nodes", "replicas"}),
    "fallback": frozenset({"members"}),
}
"""The options each kind takes (a kind's spec is WorkerOptions cut down to these)."""


class HttpSettings(BaseModel):
    """The HTTP client all HTTP workers share ([stages.inference.http]): timeouts in seconds, connection limits."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, use_attribute_docstrings=True)

    connect_timeout_s: Seconds = 5.0
    read_timeout_s: Seconds = 60.0
    """Longest silence between two pieces of an answer (so also the longest wait for the first token)."""
    write_timeout_s: Seconds = 10.0
    pool_timeout_s: Seconds = 5.0
    """Longest wait for a free connection when all max_connections are busy."""
    max_connections: Annotated[int, Field(gt=0)] = 100
    max_keepalive_connections: Annotated[int, Field(ge=0)] = 20
    keepalive_expiry_s: Seconds = 30.0
