"""Single flight: identical requests share one trip through the pipeline.

The first request for a key (the leader) travels through the stages; identical
requests that arrive while it is on its way (followers) do not enter any queue, they
wait for the leader's answer. Which requests are identical is decided by
`answer_key`: everything that can change the backend's answer is in it.

This module keeps the bookkeeping (who waits on which flight); the pipeline decides
what happens when a member leaves or the flight lands.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pydantic import TypeAdapter

from mcp_orchestrator.models import BreakerStateName, GenerationParams, Hop, Message, Provenance, Usage

if TYPE_CHECKING:
    from mcp_orchestrator.pipeline.request import ChunkSink, Request


def answer_key(worker_kind: str, model: str, messages: tuple[Message, ...], params: GenerationParams) -> str:
    """A fixed-size digest of everything that can change the backend's answer.

    Unset parameters stay unset (the worker fills them from its own settings, which
    only a worker swap can change, and the swap is in `worker_kind`). Every part is
    length-prefixed, so no prompt text can make two different requests spell the same
    payload, and every field of GenerationParams is in its JSON, so a parameter added
    later is in the key without touching this function.
    """
    parts = [worker_kind, model]
    for message in messages:
        parts.append(message.role)
        parts.append(message.content)
    # Frozen model, fields in declaration order: the same values always give the same JSON.
    parts.append(params.model_dump_json() if params.model_fields_set else _DEFAULT_PARAMS)
    payload = "".join(f"{len(part)}:{part}" for part in parts)
    return hashlib.sha256(payload.encode("utf-8", "surrogatepass")).hexdigest()


_DEFAULT_PARAMS = GenerationParams().model_dump_json()


_Packed = tuple[str, int, int, BreakerStateName, str]
"""A provenance as primitives: worker, attempts, retries, breaker state, failed hops as JSON ("" for none)."""


@dataclass(frozen=True, slots=True)
class CachedAnswer:
    """What a completed request leaves in the result cache: the answer, not the request.

    Kept as plain values (usage and provenance flattened to ints and strings): the cache holds
    thousands of answers, and live pydantic objects would cost ~1 KB each; packing and
    unpacking these costs about a microsecond, where a JSON round trip cost several.
    """

    text: str
    finish_reason: str | None
    worker: str
    model: str
    tokens: tuple[int, int] | None
    """Input and output tokens, or None when the backend reported no usage."""
    packed_provenance: _Packed | None

    @classmethod
    def pack(
        cls,
        text: str,
        usage: Usage | None,
        finish_reason: str | None,
        worker: str,
        model: str,
        provenance: Provenance | None,
    ) -> CachedAnswer:
        tokens = None if usage is None else (usage.input_tokens, usage.output_tokens)
        packed = None
        if provenance is not None:
            hops = _HOPS.dump_json(provenance.fallbacks).decode() if provenance.fallbacks else ""
            packed = (provenance.worker, provenance.attempts, provenance.retries, provenance.breaker, hops)
        return cls(text, finish_reason, worker, model, tokens, packed)

    def usage(self) -> Usage | None:
        if self.tokens is None:
            return None
        return Usage(input_tokens=self.tokens[0], output_tokens=self.tokens[1])

    def provenance(self) -> Provenance | None:
        if self.packed_provenance is None:
            return None
        worker, attempts, retries, breaker, hops = self.packed_provenance
        fallbacks = _HOPS.validate_json(hops) if hops else []
        return Provenance(worker=worker, attempts=attempts, retries=retries, fallbacks=fallbacks, breaker=breaker)


_HOPS = TypeAdapter(list[Hop])


@dataclass(eq=False, slots=True)
class Flight:
    """One trip through the pipeline and the callers waiting for its answer."""

    key: str
    leader: Request
    """The request that travels. If its own caller leaves while followers wait, it keeps
    travelling for them (the pipeline marks it `caller_left`)."""
    followers: dict[str, Request] = field(default_factory=dict)
    sinks: dict[str, ChunkSink] = field(default_factory=dict)
    """Chunk sinks of the callers still waiting, by request id (the leader's included)."""
    landed: bool = False

    def join(self, follower: Request, sink: ChunkSink | None) -> None:
        self.followers[follower.id] = follower
        if sink is not None:
            self.sinks[follower.id] = sink

    def leave(self, member: Request) -> None:
        self.followers.pop(member.id, None)
        self.sinks.pop(member.id, None)

    def broadcast(self, text: str) -> bool:
        """Forward a chunk to every caller still waiting (set as the leader's chunk sink);
        returns whether anyone received it."""
        if not self.sinks:
            return False
        for sink in tuple(self.sinks.values()):
            sink(text)
        return True

    def land(self) -> list[Request]:
        """End the flight; returns the followers still waiting, in arrival order."""
        self.landed = True
        followers = list(self.followers.values())
        self.followers.clear()
        self.sinks.clear()
        return followers


class FlightTable:
    """The flights in progress, by answer key."""

    def __init__(self) -> None:
        self._flights: dict[str, Flight] = {}

    def __len__(self) -> int:
        return len(self._flights)

    def find(self, key: str) -> Flight | None:
        return self._flights.get(key)

    def open(self, key: str, leader: Request, sink: ChunkSink | None) -> Flight:
        flight = Flight(key, leader)
        if sink is not None:
            flight.sinks[leader.id] = sink
        self._flights[key] = flight
        return flight

    def close(self, flight: Flight) -> None:
        if self._flights.get(flight.key) is flight:
            del self._flights[flight.key]
