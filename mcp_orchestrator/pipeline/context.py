"""Where the RAG stage finds context: a pluggable `ContextSource`.

A context source is any object with an async `retrieve(query, session_id, max_tokens)`
that returns passages (strings), most relevant first. The RAG stage calls it under
`[stages.rag] timeout_ms` (and the request's deadline) and keeps whole passages while
their word count fits `max_context_tokens`. Give one in code,
`Orchestrator(config, context_source=MySource())`, or in the config file,
`[stages.rag] source = "package.module:name"`, where `name` is such an object or a
callable that takes no arguments and returns one (a class, for instance).
"""

from __future__ import annotations

import importlib
import inspect
from typing import Protocol, runtime_checkable

from mcp_orchestrator.errors import ConfigError, Problem


@runtime_checkable
class ContextSource(Protocol):
    """Finds context for a prompt. Must honour cancellation: the stage has a timeout."""

    async def retrieve(self, query: str, session_id: str | None, max_tokens: int) -> list[str]: ...


def trim_context(passages: list[str], max_tokens: int) -> list[str]:
    """Keep whole passages, in order, while their word count fits `max_tokens`."""
    kept, used = [], 0
    for passage in passages:
        words = len(passage.split())
        if used + words > max_tokens:
            break
        kept.append(passage)
        used += words
    return kept


def load_context_source(reference: str, key: str = "stages.rag.source") -> ContextSource:
    """The context source named "package.module:name" (an object with `retrieve`, or a
    no-argument callable returning one). ConfigError naming `key` when it is not one."""
    module_name, colon, attribute = reference.partition(":")
    if not colon or not module_name or not attribute:
        raise _refused(key, f"expected 'package.module:name' (got {reference!r})")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # an import can fail in any way: report it, do not crash
        raise _refused(key, f"cannot import {module_name!r}: {exc}") from None
    target: object = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise _refused(key, f"{module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    if inspect.isclass(target) or (not _retrieves(target) and callable(target)):
        try:
            target = target()
        except Exception as exc:
            raise _refused(key, f"calling {reference} raised {type(exc).__name__}: {exc}") from None
    if not _retrieves(target):
        raise _refused(
            key, f"{reference} is not a context source (needs an async retrieve(query, session_id, max_tokens))"
        )
    assert isinstance(target, ContextSource)
    return target


def _retrieves(candidate: object) -> bool:
    return inspect.iscoroutinefunction(getattr(candidate, "retrieve", None))


def _refused(key: str, message: str) -> ConfigError:
    return ConfigError("config", [Problem(key, message)])
