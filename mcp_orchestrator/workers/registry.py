"""Worker kinds by name, and the one way to build a worker from options.

`configure_worker`, `--worker` and `[stages.inference]` all build workers through
`build_worker`, so every entry point gets the same validation and the same errors. The
options themselves are declared once in options.py; a kind takes the subset listed in
`KIND_OPTIONS`. Pools and fallback chains take their members as lists of option tables,
each with its own `kind`, validated by the same rules (errors say which member is wrong).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import httpx2
from pydantic import ValidationError

from mcp_orchestrator.addresses import check_url
from mcp_orchestrator.errors import Problem, WorkerSpecError, validation_problems
from mcp_orchestrator.models import GenerationParams
from mcp_orchestrator.security import Origin, OriginRule, origin_allowed
from mcp_orchestrator.workers import anthropic, llama_cpp, openai, vllm
from mcp_orchestrator.workers.base import Worker, layer_params
from mcp_orchestrator.workers.echo import EchoWorker
from mcp_orchestrator.workers.fallback import FallbackWorker
from mcp_orchestrator.workers.http_worker import HttpWorker
from mcp_orchestrator.workers.keys import host_of, resolve_key
from mcp_orchestrator.workers.options import CONFIG_ONLY, KIND_OPTIONS, PARAMETER_OPTIONS, HttpSettings, WorkerOptions
from mcp_orchestrator.workers.pool import PoolWorker
from mcp_orchestrator.workers.transport import BackgroundReads

MEMBER_LISTS = frozenset({"replicas", "members"})
"""The options that hold a composite's member tables."""
MAX_DEPTH = 3
"""Composites may nest (a pool of fallback chains), this deep at most."""


@dataclass(frozen=True, slots=True)
class BuildContext:
    """What a worker gets besides its options.

    `trusted` is true when the options come from the operator (config file, command
    line, library code) and false when they come from a tool call: then config-only
    options are refused and API keys go only to trusted hosts (see keys.py).
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
    origins: tuple[OriginRule, ...] | None = None
    """Where a tool call's worker may connect (with the providers' base-URL environment
    variables, see `reachable`); None: anywhere (the operator's own config)."""
    depth: int = 0


Builder = Callable[[WorkerOptions, BuildContext], Worker]
Check = Callable[[WorkerOptions, BuildContext], list[Problem]]
"""What building would refuse beyond the options themselves (where an HTTP kind may connect),
found without building."""


@dataclass(frozen=True, slots=True)
class WorkerKind:
    name: str
    build: Builder
    summary: str
    check: Check | None = None

    @property
    def options(self) -> frozenset[str]:
        return KIND_OPTIONS[self.name]


_KINDS: dict[str, WorkerKind] = {}


def register(kind: WorkerKind) -> None:
    _KINDS[kind.name] = kind


def kinds() -> list[str]:
    return sorted(_KINDS)


def summaries() -> dict[str, str]:
    """Each kind and what it is, for descriptions and --help."""
    return {name: _KINDS[name].summary for name in kinds()}


def parse_options(kind: str, options: Mapping[str, Any], context: BuildContext | None = None) -> WorkerOptions:
    """Validate `options` for `kind` (None values count as unset); WorkerSpecError names every problem."""
    context = context or BuildContext()
    entry = _KINDS.get(kind)
    if entry is None:
        raise WorkerSpecError([Problem("kind", f"unknown worker kind {kind!r}; allowed: {', '.join(kinds())}")])
    given = {name: value for name, value in options.items() if value is not None}
    problems = [
        Problem(name, f"not an option of worker kind {kind!r} (its options: {', '.join(sorted(entry.options))})")
        for name in given
        if name not in entry.options
    ]
    if not context.trusted:
        problems += [
            Problem(name, "can only be set in the config file, not by a tool call")
            for name in sorted(set(given) & CONFIG_ONLY)
        ]
    try:
        parsed = WorkerOptions.model_validate({name: value for name, value in given.items() if name in entry.options})
    except ValidationError as exc:
        problems += validation_problems(exc, "option")
    if problems:
        raise WorkerSpecError(problems)
    return parsed


def build_worker(kind: str, options: Mapping[str, Any], context: BuildContext | None = None) -> Worker:
    context = context or BuildContext()
    parsed = parse_options(kind, options, context)
    return _KINDS[kind].build(parsed, context)


def build_members(name: str, tables: list[dict[str, Any]], context: BuildContext) -> list[Worker]:
    """Every member of a composite, or one error naming the problems of all of them."""
    if context.depth >= MAX_DEPTH:
        raise WorkerSpecError([Problem(name, f"composites nest at most {MAX_DEPTH} deep")])
    inner = replace(context, depth=context.depth + 1)
    members: list[Worker] = []
    problems: list[Problem] = []
    for position, kind, options in _members(name, tables):
        if kind is None:
            problems.append(_no_kind(position))
            continue
        try:
            members.append(build_worker(kind, options, inner))
        except WorkerSpecError as exc:
            problems += [problem.under(position) for problem in exc.problems]
    if problems:
        raise WorkerSpecError(problems)
    return members


def spec_problems(kind: str, options: Mapping[str, Any], context: BuildContext) -> list[Problem]:
    """Every problem of `kind`'s options and, for a pool or a fallback chain, of each member's,
    found without building anything (so that one answer to a tool call names them all)."""
    problems: list[Problem] = []
    try:
        parsed: WorkerOptions | None = parse_options(kind, options, context)
    except WorkerSpecError as exc:
        problems = list(exc.problems)
        named = {problem.key.split(".")[0] for problem in problems}
        # The kind's own check still runs on the options that are sound (a bad temperature
        # does not hide a base_url the operator did not allow), unless it is the URL that is bad.
        sound = {name: value for name, value in options.items() if name not in named}
        parsed = None if "kind" in named or "base_url" in named else _parsed_or_none(kind, sound, context)
    check = _KINDS[kind].check if kind in _KINDS else None
    if parsed is not None and check is not None:
        problems += check(parsed, context)
    if context.depth >= MAX_DEPTH:
        return problems
    inner = replace(context, depth=context.depth + 1)
    for position, member_kind, member_options in _members_of(kind, options):
        if member_kind is None:
            problems.append(_no_kind(position))
        else:
            problems += [problem.under(position) for problem in spec_problems(member_kind, member_options, inner)]
    return problems


def leaf_kinds(kind: str, options: Mapping[str, Any]) -> set[str]:
    """The kinds that call a backend in the worker `kind` with `options` describes (a pool's
    replicas, a fallback chain's members, however nested). Tables without a kind are skipped:
    building the worker reports them."""
    if not MEMBER_LISTS & KIND_OPTIONS.get(kind, frozenset()):
        return {kind}
    return {
        leaf
        for _, member_kind, member_options in _members_of(kind, options)
        if member_kind is not None
        for leaf in leaf_kinds(member_kind, member_options)
    }


def unused_parameters(kind: str, options: Mapping[str, Any], given: set[str]) -> dict[str, set[str]]:
    """Which of the parameter defaults `given` no backend of this worker uses (echo uses only
    max_tokens; anthropic has no seed), each with the kinds it reaches."""
    kinds = leaf_kinds(kind, options)
    return {
        name: kinds
        for name in sorted(given & PARAMETER_OPTIONS)
        if kinds and not any(name in KIND_OPTIONS.get(leaf, frozenset()) for leaf in kinds)
    }


def _parsed_or_none(kind: str, options: Mapping[str, Any], context: BuildContext) -> WorkerOptions | None:
    try:
        return parse_options(kind, options, context)
    except WorkerSpecError:
        return None


def _members_of(kind: str, options: Mapping[str, Any]) -> Iterator[tuple[str, str | None, dict[str, Any]]]:
    """_members of each member list `kind` takes (a pool's replicas, a fallback chain's members)."""
    for name in sorted(MEMBER_LISTS & KIND_OPTIONS.get(kind, frozenset())):
        tables = options.get(name)
        if isinstance(tables, list):
            yield from _members(name, tables)


def _members(name: str, tables: list[Any]) -> Iterator[tuple[str, str | None, dict[str, Any]]]:
    """Each member table's position ("replicas.0."), kind (None: missing) and other options;
    tables that are not tables are skipped (their type error is reported with the others)."""
    for index, table in enumerate(tables):
        if not isinstance(table, dict):
            continue
        options = dict(table)
        kind = options.pop("kind", None)
        yield f"{name}.{index}.", kind if isinstance(kind, str) else None, options


def _no_kind(position: str) -> Problem:
    return Problem(f"{position}kind", f"required, one of {', '.join(kinds())}")


# ------------------------------------------------------------------ the kinds


def _build_echo(options: WorkerOptions, context: BuildContext) -> Worker:
    defaults = layer_params(GenerationParams(max_tokens=options.max_tokens), context.base)
    return EchoWorker(options.model or "echo", options.delay_ms or 0, options.chunk_delay_ms or 0, defaults=defaults)


def _params(options: WorkerOptions) -> GenerationParams:
    return GenerationParams(
        max_tokens=options.max_tokens,
        temperature=options.temperature,
        top_p=options.top_p,
        stop=tuple(options.stop or ()),
        seed=options.seed,
    )


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


def _http_kind(name: str, provider: _Provider, summary: str) -> WorkerKind:
    def check(options: WorkerOptions, context: BuildContext) -> list[Problem]:
        try:
            _base_url(provider, options, context)
        except WorkerSpecError as exc:
            return list(exc.problems)
        return []

    return WorkerKind(name, _http_builder(provider), summary, check)


def _base_url(provider: _Provider, options: WorkerOptions, context: BuildContext) -> tuple[str, str | None]:
    """Where the worker connects, and the provider's URL variable when it is usable.
    WorkerSpecError when that variable is in use and unusable, or when a tool call's worker
    would reach an origin the operator did not name."""
    env_url = _env_url(provider, context, used=options.base_url is None)
    base_url = provider.normalize(options.base_url or env_url or provider.default_url)
    if context.origins is not None:
        _check_reachable(base_url, context)
    return base_url, env_url


def _http_builder(provider: _Provider) -> Builder:
    def build(options: WorkerOptions, context: BuildContext) -> Worker:
        base_url, env_url = _base_url(provider, options, context)
        trusted_hosts = {host_of(provider.default_url), *context.key_hosts}
        if env_url:
            trusted_hosts.add(host_of(env_url))
        key = resolve_key(
            options.api_key_env or provider.key_env,
            context.env,
            base_url,
            trusted_hosts=trusted_hosts,
            operator_configured=context.trusted,
            required=host_of(base_url) in provider.key_required_on,
        )
        return provider.worker(
            base_url,
            model=options.model,
            api_key=key,
            defaults=layer_params(_params(options), context.base),
            system=options.system,
            stream=options.stream is not False,
            client=context.http,
            http_settings=context.http_settings,
            background_reads=context.background_reads,
        )

    return build


def _env_url(provider: _Provider, context: BuildContext, *, used: bool) -> str | None:
    """The provider's base-URL variable when it is set and usable. Unusable: refused when the
    worker would connect there (base_url unset), else ignored (its host then gets no key)."""
    value = context.env.get(provider.url_env) or None
    if value is None:
        return None
    try:
        check_url(value, schemes=("http", "https"), example=provider.default_url)
    except ValueError as exc:
        if used:
            raise WorkerSpecError(
                [Problem("base_url", f"unset, and the environment variable {provider.url_env} {exc}")]
            ) from None
        return None
    return value


URL_VARIABLES = ("OPENAI_BASE_URL", "ANTHROPIC_BASE_URL", "LLAMA_CPP_URL", "VLLM_URL")
"""The providers' base-URL environment variables: the operator names an origin by setting one."""


def reachable(context: BuildContext) -> tuple[OriginRule, ...]:
    """The origins a tool call's worker may reach: the context's rules plus the origin of every
    provider base-URL environment variable that is set."""
    rules = list(context.origins or ())
    for name in URL_VARIABLES:
        value = context.env.get(name)
        if value:
            try:
                rules.append(OriginRule.parse(str(Origin.of(value))))
            except ValueError:
                pass  # not a URL: the worker that reads it refuses it anyway
    return tuple(rules)


def _check_reachable(url: str, context: BuildContext) -> None:
    """Refuse a tool call's worker an origin the operator did not name: no request is sent."""
    rules = reachable(context)
    if origin_allowed(url, rules):
        return
    try:
        where = str(Origin.of(url))
    except ValueError:
        where = url
    allowed = ", ".join(rule.text for rule in rules) or "none"
    raise WorkerSpecError(
        [
            Problem(
                "base_url",
                f"{where} is not an origin configure_worker may reach (allowed: {allowed}; the operator adds one "
                "to [security] worker_origins, or names it in the config file or a *_BASE_URL / *_URL variable)",
            )
        ]
    )


def _build_pool(options: WorkerOptions, context: BuildContext) -> Worker:
    replicas = build_members("replicas", options.replicas or [], context)
    return PoolWorker(replicas, options.strategy or "round_robin", options.virtual_nodes or 64)


def _build_fallback(options: WorkerOptions, context: BuildContext) -> Worker:
    return FallbackWorker(build_members("members", options.members or [], context))


def _require(name: str, option: str, builder: Builder) -> Builder:
    """A composite's member list is required: say so under the option's own name."""

    def build(options: WorkerOptions, context: BuildContext) -> Worker:
        if not getattr(options, option):
            raise WorkerSpecError([Problem(option, f"required for worker kind {name!r} (a list of tables)")])
        return builder(options, context)

    return build


register(WorkerKind("echo", _build_echo, "returns the prompt word by word; delay_ms simulates latency"))
register(
    _http_kind(
        "open_ai",
        _Provider(
            openai.OpenAIWorker,
            "OPENAI_BASE_URL",
            openai.DEFAULT_BASE_URL,
            "OPENAI_API_KEY",
            frozenset({"api.openai.com"}),
        ),
        "OpenAI chat completions (OPENAI_API_KEY; OPENAI_BASE_URL or base_url, default https://api.openai.com/v1)",
    )
)
register(
    _http_kind(
        "anthropic",
        _Provider(
            anthropic.AnthropicWorker,
            "ANTHROPIC_BASE_URL",
            anthropic.DEFAULT_BASE_URL,
            "ANTHROPIC_API_KEY",
            frozenset({"api.anthropic.com"}),
        ),
        "Anthropic Messages API (ANTHROPIC_API_KEY; ANTHROPIC_BASE_URL or base_url, default https://api.anthropic.com)",
    )
)
register(
    _http_kind(
        "llama_cpp",
        _Provider(
            llama_cpp.LlamaCppWorker,
            "LLAMA_CPP_URL",
            llama_cpp.DEFAULT_URL,
            "LLAMA_API_KEY",
            frozenset(),
            openai.server_root,
        ),
        "llama.cpp llama-server (LLAMA_CPP_URL, default http://localhost:8080)",
    )
)
register(
    _http_kind(
        "vllm",
        (_Provider(vllm.VllmWorker, "VLLM_URL", vllm.DEFAULT_URL, "VLLM_API_KEY", frozenset(), openai.server_root)),
        "vLLM OpenAI-compatible server (VLLM_URL, default http://localhost:8000)",
    )
)
register(
    WorkerKind(
        "pool",
        _require("pool", "replicas", _build_pool),
        "load-balanced replicas (strategy round_robin, least_loaded or session_affinity)",
    )
)
register(
    WorkerKind(
        "fallback",
        _require("fallback", "members", _build_fallback),
        "ordered chain, the next member after a retryable failure",
    )
)
