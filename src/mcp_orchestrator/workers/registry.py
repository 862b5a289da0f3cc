"""Worker kinds by name, each with a pydantic spec that validates its options.

`configure_worker`, `--worker` and `[stages.inference]` all build workers through
`build_worker`, so every entry point gets the same validation and the same errors.
Pools and fallback chains take their members as lists of option tables, each with
its own `kind`, validated by the same rules (and errors say which member is wrong).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Annotated, Any, ClassVar
from urllib.parse import urlsplit

import httpx2
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mcp_orchestrator.models import GenerationParams
from mcp_orchestrator.security import host_allowed
from mcp_orchestrator.workers import anthropic, llama_cpp, openai, vllm
from mcp_orchestrator.workers.base import Worker, layer_params
from mcp_orchestrator.workers.echo import EchoWorker
from mcp_orchestrator.workers.fallback import FallbackWorker
from mcp_orchestrator.workers.http_worker import HttpWorker
from mcp_orchestrator.workers.keys import host_of, resolve_key
from mcp_orchestrator.workers.pool import PoolWorker, Strategy
from mcp_orchestrator.workers.transport import BackgroundReads, HttpSettings

MAX_DEPTH = 3
"""Composites may nest (a pool of fallback chains), this deep at most."""


class WorkerSpecError(ValueError):
    """Invalid worker options; the message names each bad option and what is allowed."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


@dataclass(frozen=True, slots=True)
class BuildContext:
    """What a worker gets besides its options.

    `trusted` is true when the options come from the operator (config file, command
    line, library code) and false when they come from a tool call: then options marked
    config-only are refused and API keys go only to trusted hosts (see keys.py).
    """

    http: httpx2.AsyncClient | None = None
    http_settings: HttpSettings | None = None
    background_reads: BackgroundReads | None = None
    """Where streamed responses are read to their end after the answer (see transport.py)."""
    base: GenerationParams = field(default_factory=GenerationParams)
    """The config's [stages.inference] parameters: under the worker's own, over the backend's."""
    env: Mapping[str, str] = field(default_factory=lambda: os.environ)
    trusted: bool = True
    key_hosts: frozenset[str] = frozenset()
    """Hosts the operator configured: they may receive the API key even from a tool call's worker."""
    allowed_hosts: tuple[str, ...] | None = None
    """Host names a tool call's base_url may point at (exact, or '*.example.com'); None: any."""
    depth: int = 0


class WorkerSpec(BaseModel):
    """Base of every kind's options: unknown options are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    config_only: ClassVar[frozenset[str]] = frozenset()
    """Options a tool call may not set (they choose which secret is sent where)."""


Temperature = Annotated[float, Field(ge=0, le=2)]
TopP = Annotated[float, Field(gt=0, le=1)]
StopList = Annotated[list[Annotated[str, Field(min_length=1, max_length=256)]], Field(max_length=16)]
ModelName = Annotated[str, Field(min_length=1, max_length=256)]
MaxTokens = Annotated[int, Field(ge=1, le=1_000_000)]


class EchoSpec(WorkerSpec):
    model: ModelName = "echo"
    delay_ms: Annotated[int, Field(ge=0, le=600_000)] = 0
    chunk_delay_ms: Annotated[int, Field(ge=0, le=60_000)] = 0
    max_tokens: MaxTokens | None = None


class HttpSpec(WorkerSpec):
    """Options shared by the HTTP workers."""

    config_only: ClassVar[frozenset[str]] = frozenset({"api_key_env"})

    model: ModelName | None = None
    base_url: Annotated[str, Field(min_length=1, max_length=2048)] | None = None
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    stop: StopList | None = None
    system: Annotated[str, Field(max_length=100_000)] | None = None
    stream: bool = True
    api_key_env: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=128)] | None = None
    """Config only: the environment variable holding the key (default per kind)."""

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host, e.g. http://localhost:8080")
        if parts.query or parts.fragment:
            raise ValueError("must not have a query string or fragment")
        return value

    def params(self) -> GenerationParams:
        return GenerationParams(
            max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p, stop=tuple(self.stop or ())
        )


class ChatCompletionsSpec(HttpSpec):
    """OpenAI-compatible servers also take a sampling seed (the Anthropic Messages API has none)."""

    seed: Annotated[int, Field(ge=0)] | None = None

    def params(self) -> GenerationParams:
        return super().params().model_copy(update={"seed": self.seed})


class PoolSpec(WorkerSpec):
    strategy: Strategy = Strategy.round_robin
    replicas: Annotated[list[dict[str, Any]], Field(min_length=1, max_length=32)]
    virtual_nodes: Annotated[int, Field(ge=1, le=1024)] = 64


class FallbackSpec(WorkerSpec):
    members: Annotated[list[dict[str, Any]], Field(min_length=1, max_length=8)]


@dataclass(frozen=True, slots=True)
class WorkerKind:
    name: str
    spec: type[WorkerSpec]
    build: Callable[[Any, BuildContext], Worker]
    summary: str


_KINDS: dict[str, WorkerKind] = {}


def register(kind: WorkerKind) -> None:
    _KINDS[kind.name] = kind


def kinds() -> list[str]:
    return sorted(_KINDS)


def summaries() -> dict[str, str]:
    return {name: _KINDS[name].summary for name in kinds()}


def options_of(kind: str) -> list[str]:
    entry = _KINDS.get(kind)
    return list(entry.spec.model_fields) if entry else []


def parse_spec(
    kind: str, options: Mapping[str, Any], context: BuildContext | None = None
) -> tuple[WorkerKind, WorkerSpec]:
    """Validate `options` for `kind`; raise WorkerSpecError naming every problem."""
    context = context or BuildContext()
    entry = _KINDS.get(kind)
    if entry is None:
        raise WorkerSpecError([f"kind: unknown worker kind {kind!r}; allowed: {', '.join(kinds())}"])
    given = {k: v for k, v in options.items() if v is not None}
    if not context.trusted:
        refused = sorted(set(given) & entry.spec.config_only)
        if refused:
            raise WorkerSpecError(
                [f"{name}: can only be set in the config file, not by a tool call" for name in refused]
            )
    try:
        return entry, entry.spec.model_validate(given)
    except ValidationError as exc:
        raise WorkerSpecError(_problems(kind, entry.spec, exc)) from None


def _problems(kind: str, spec: type[WorkerSpec], exc: ValidationError) -> list[str]:
    problems = []
    for item in exc.errors():
        name = ".".join(str(p) for p in item["loc"])
        if item["type"] == "extra_forbidden":
            allowed = ", ".join(n for n in spec.model_fields)
            problems.append(f"{name}: not an option of worker kind {kind!r} (its options: {allowed})")
        else:
            message = item["msg"].removeprefix("Value error, ")
            problems.append(f"{name}: {message} (got {item.get('input')!r})")
    return problems


def build_worker(kind: str, options: Mapping[str, Any], context: BuildContext | None = None) -> Worker:
    context = context or BuildContext()
    entry, spec = parse_spec(kind, options, context)
    return entry.build(spec, context)


def build_member(position: str, options: Mapping[str, Any], context: BuildContext) -> Worker:
    """One pool replica or fallback member; errors are prefixed with its position."""
    options = dict(options)
    kind = options.pop("kind", None)
    if not isinstance(kind, str):
        raise WorkerSpecError([f"{position}.kind: required, one of {', '.join(kinds())}"])
    if context.depth >= MAX_DEPTH:
        raise WorkerSpecError([f"{position}: composites nest at most {MAX_DEPTH} deep"])
    inner = replace(context, depth=context.depth + 1)
    try:
        return build_worker(kind, options, inner)
    except WorkerSpecError as exc:
        raise WorkerSpecError([f"{position}.{p}" for p in exc.problems]) from None


# ------------------------------------------------------------------ the kinds


def _build_echo(spec: EchoSpec, context: BuildContext) -> Worker:
    defaults = layer_params(GenerationParams(max_tokens=spec.max_tokens), context.base)
    return EchoWorker(spec.model, spec.delay_ms, spec.chunk_delay_ms, defaults=defaults)


@dataclass(frozen=True, slots=True)
class _Provider:
    """Where an HTTP kind lives by default and where its key comes from."""

    worker: type[HttpWorker]
    url_env: str
    default_url: str
    key_env: str
    key_required_on: frozenset[str]
    """Hosts that refuse requests without a key (the provider's own API)."""
    normalize: Callable[[str], str] = lambda url: url.rstrip("/")


def _http_builder(provider: _Provider) -> Callable[[Any, BuildContext], Worker]:
    def build(spec: HttpSpec, context: BuildContext) -> Worker:
        if spec.base_url is not None and context.allowed_hosts is not None:
            _check_host_allowed(spec.base_url, context.allowed_hosts)
        env_url = context.env.get(provider.url_env) or None
        base_url = provider.normalize(spec.base_url or env_url or provider.default_url)
        trusted_hosts = {host_of(provider.default_url), *context.key_hosts}
        if env_url:
            trusted_hosts.add(host_of(env_url))
        key_env = spec.api_key_env or provider.key_env
        key = resolve_key(
            key_env,
            context.env,
            base_url,
            trusted_hosts=trusted_hosts,
            operator_configured=context.trusted,
            required=host_of(base_url) in provider.key_required_on,
        )
        return provider.worker(
            base_url,
            model=spec.model,
            api_key=key,
            defaults=layer_params(spec.params(), context.base),
            system=spec.system,
            stream=spec.stream,
            client=context.http,
            http_settings=context.http_settings,
            background_reads=context.background_reads,
        )

    return build


def _check_host_allowed(url: str, allowed: tuple[str, ...]) -> None:
    """Refuse a tool call's base_url outside [security] allowed_hosts (no requests to arbitrary hosts)."""
    host = urlsplit(url).hostname or ""
    if host_allowed(host, allowed):
        return
    raise WorkerSpecError(
        [
            f"base_url: host {host!r} is not allowed for configure_worker (allowed: {', '.join(allowed) or 'none'}; "
            "the operator can extend [security] allowed_hosts)"
        ]
    )


def build_members(name: str, tables: list[dict[str, Any]], context: BuildContext) -> list[Worker]:
    """Every member of a composite, or one error naming the problems of all of them."""
    members: list[Worker] = []
    problems: list[str] = []
    for index, options in enumerate(tables):
        try:
            members.append(build_member(f"{name}.{index}", options, context))
        except WorkerSpecError as exc:
            problems.extend(exc.problems)
    if problems:
        raise WorkerSpecError(problems)
    return members


def _build_pool(spec: PoolSpec, context: BuildContext) -> Worker:
    return PoolWorker(build_members("replicas", spec.replicas, context), spec.strategy, spec.virtual_nodes)


def _build_fallback(spec: FallbackSpec, context: BuildContext) -> Worker:
    return FallbackWorker(build_members("members", spec.members, context))


register(WorkerKind("echo", EchoSpec, _build_echo, "returns the prompt word by word; delay_ms simulates latency"))
register(
    WorkerKind(
        "open_ai",
        ChatCompletionsSpec,
        _http_builder(
            _Provider(
                openai.OpenAIWorker,
                "OPENAI_BASE_URL",
                openai.DEFAULT_BASE_URL,
                "OPENAI_API_KEY",
                frozenset({"api.openai.com"}),
            )
        ),
        "OpenAI chat completions (OPENAI_API_KEY; OPENAI_BASE_URL or base_url, default https://api.openai.com/v1)",
    )
)
register(
    WorkerKind(
        "anthropic",
        HttpSpec,
        _http_builder(
            _Provider(
                anthropic.AnthropicWorker,
                "ANTHROPIC_BASE_URL",
                anthropic.DEFAULT_BASE_URL,
                "ANTHROPIC_API_KEY",
                frozenset({"api.anthropic.com"}),
            )
        ),
        "Anthropic Messages API (ANTHROPIC_API_KEY; base_url default https://api.anthropic.com)",
    )
)
register(
    WorkerKind(
        "llama_cpp",
        ChatCompletionsSpec,
        _http_builder(
            _Provider(
                llama_cpp.LlamaCppWorker,
                "LLAMA_CPP_URL",
                llama_cpp.DEFAULT_URL,
                "LLAMA_API_KEY",
                frozenset(),
                openai.server_root,
            )
        ),
        "llama.cpp llama-server (LLAMA_CPP_URL, default http://localhost:8080)",
    )
)
register(
    WorkerKind(
        "vllm",
        ChatCompletionsSpec,
        _http_builder(
            _Provider(vllm.VllmWorker, "VLLM_URL", vllm.DEFAULT_URL, "VLLM_API_KEY", frozenset(), openai.server_root)
        ),
        "vLLM OpenAI-compatible server (VLLM_URL, default http://localhost:8000)",
    )
)
register(
    WorkerKind(
        "pool",
        PoolSpec,
        _build_pool,
        "load-balanced replicas (strategy round_robin, least_loaded or session_affinity)",
    )
)
register(WorkerKind("fallback", FallbackSpec, _build_fallback, "ordered chain, next member after a retryable failure"))
