"""An answer, as a trip hands it to every request it answers, and as the cache keeps it."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from pydantic import TypeAdapter

from mcp_orchestrator.models import BreakerStateName, Hop, Provenance, Usage


@dataclass(frozen=True, slots=True)
class Answer:
    """What a completed trip (or the cache) hands to every request it answers."""

    text: str
    usage: Usage | None
    finish_reason: str | None
    worker: str
    model: str
    provenance: Provenance | None


CACHE_ENTRY_OVERHEAD = 512
"""Bytes an entry costs besides its text: the packed answer, its key and the cache's own
node (measured with tracemalloc: ~460)."""

_Packed = tuple[str, int, int, BreakerStateName, str]
"""A provenance as primitives: worker, attempts, retries, breaker state, failed hops as JSON ("" for none)."""
_HOPS = TypeAdapter(list[Hop])


@dataclass(frozen=True, slots=True)
class CachedAnswer:
    """An answer as the result cache keeps it: plain values (usage and provenance flattened to
    ints and strings). The cache holds thousands of answers, and live pydantic objects cost
    ~1 KB more each; packing and unpacking costs about a microsecond."""

    text: str
    finish_reason: str | None
    worker: str
    model: str
    tokens: tuple[int, int] | None
    """Input and output tokens, or None when the backend reported no usage."""
    provenance: _Packed | None

    @classmethod
    def pack(cls, answer: Answer) -> CachedAnswer:
        usage, provenance = answer.usage, answer.provenance
        tokens = None if usage is None else (usage.input_tokens, usage.output_tokens)
        packed = None
        if provenance is not None:
            hops = _HOPS.dump_json(provenance.fallbacks).decode() if provenance.fallbacks else ""
            packed = (provenance.worker, provenance.attempts, provenance.retries, provenance.breaker, hops)
        return cls(answer.text, answer.finish_reason, answer.worker, answer.model, tokens, packed)

    def size(self) -> int:
        """Bytes this entry costs the cache, for its byte budget (the text dominates)."""
        hops = sys.getsizeof(self.provenance[4]) if self.provenance is not None else 0
        return sys.getsizeof(self.text) + hops + CACHE_ENTRY_OVERHEAD

    def unpack(self) -> Answer:
        usage = None if self.tokens is None else Usage(input_tokens=self.tokens[0], output_tokens=self.tokens[1])
        provenance = None
        if self.provenance is not None:
            worker, attempts, retries, breaker, hops = self.provenance
            fallbacks = _HOPS.validate_json(hops) if hops else []
            provenance = Provenance(
                worker=worker, attempts=attempts, retries=retries, fallbacks=fallbacks, breaker=breaker
            )
        return Answer(self.text, usage, self.finish_reason, self.worker, self.model, provenance)
