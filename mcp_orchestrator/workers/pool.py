"""A load-balanced pool of replicas (any worker kind, mixed if you like).

Strategies:
- round_robin: each request to the next replica in turn;
- least_loaded: to the replica with the fewest requests in flight (ties in turn);
- session_affinity: a session's requests to the same replica (consistent hashing of
  session_id, so the replica that holds the session's prompt cache keeps serving it,
  and adding a replica moves only about 1/(n+1) of the sessions); requests without a
  session_id go round robin.

Replicas whose `available` is false (see base.Availability, e.g. behind an open
circuit breaker) are skipped; a session then goes to the next replica on the ring.
The pool does not retry: a failure is reported as the replica's own WorkerError,
and the pipeline's retry picks a replica again.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import anyio

from mcp_orchestrator.workers.base import Chunk, Worker, WorkerError, WorkerRequest, is_available, label
from mcp_orchestrator.workers.hashring import HashRing


class Strategy(StrEnum):
    round_robin = "round_robin"
    least_loaded = "least_loaded"
    session_affinity = "session_affinity"


@dataclass(slots=True)
class _Replica:
    worker: Worker
    identity: str
    """Its place on the hash ring; fixed at construction so wrapping the worker moves nothing."""
    in_flight: int = 0
    requests: int = 0
    failed: int = 0


class PoolWorker:
    kind = "pool"

    def __init__(
        self, replicas: Sequence[Worker], strategy: Strategy | str = Strategy.round_robin, virtual_nodes: int = 64
    ) -> None:
        if not replicas:
            raise ValueError("a pool needs at least one replica")
        self.strategy = Strategy(strategy)
        self._replicas = [
            _Replica(worker, identity) for worker, identity in zip(replicas, _identities(replicas), strict=True)
        ]
        self.virtual_nodes = virtual_nodes
        self._ring = HashRing([r.identity for r in self._replicas], virtual_nodes)
        self._turn = itertools.count()

    @property
    def members(self) -> tuple[Worker, ...]:
        return tuple(r.worker for r in self._replicas)

    def wrap_members(self, wrap: Callable[[Worker], Worker]) -> None:
        """Replace each replica by `wrap(replica)` (e.g. a circuit breaker around it), keeping its place."""
        for replica in self._replicas:
            replica.worker = wrap(replica.worker)

    @property
    def model(self) -> str:
        models = {r.worker.model for r in self._replicas}
        return models.pop() if len(models) == 1 else "mixed"

    def choose(self, session_id: str | None) -> int:
        """The index of the replica for the next request; WorkerError when none is available."""
        usable = [is_available(r.worker) for r in self._replicas]
        index: int | None
        if self.strategy is Strategy.session_affinity and session_id is not None:
            index = self._ring.owner(session_id, lambda i: usable[i])
        elif self.strategy is Strategy.least_loaded:
            index = self._least_loaded(usable)
        else:
            index = self._next_in_turn(usable)
        if index is None:
            raise WorkerError(
                "pool", f"no replica available (all {len(self._replicas)} are unavailable)", retryable=True
            )
        return index

    def _next_in_turn(self, usable: list[bool]) -> int | None:
        start = next(self._turn)
        for step in range(len(usable)):
            index = (start + step) % len(usable)
            if usable[index]:
                return index
        return None

    def _least_loaded(self, usable: list[bool]) -> int | None:
        start = next(self._turn)
        order = [(start + step) % len(usable) for step in range(len(usable))]
        candidates = [i for i in order if usable[i]]
        return min(candidates, key=lambda i: self._replicas[i].in_flight, default=None)

    async def generate(self, request: WorkerRequest) -> AsyncGenerator[Chunk, None]:
        replica = self._replicas[self.choose(request.session_id)]
        replica.in_flight += 1
        replica.requests += 1
        try:
            async with aclosing(replica.worker.generate(request)) as chunks:
                async for chunk in chunks:
                    yield chunk
        except WorkerError:
            replica.failed += 1
            raise
        finally:
            replica.in_flight -= 1

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "model": self.model,
            "strategy": self.strategy.value,
            "virtual_nodes": self.virtual_nodes,
            "replicas": [
                {**r.worker.describe(), "in_flight": r.in_flight, "requests": r.requests, "failed": r.failed}
                for r in self._replicas
            ],
        }

    async def health(self) -> None:
        """Every replica must answer: a pool sends real traffic to each of them."""
        errors = await check_all(self.members, "replica")
        if errors:
            raise WorkerError(
                "pool",
                f"{len(errors)} of {len(self._replicas)} replicas failed the health check: {'; '.join(errors)}",
                retryable=True,
            )

    async def aclose(self) -> None:
        await close_all(self.members)


async def check_all(members: Sequence[Worker], noun: str) -> list[str]:
    """Health-check members concurrently; one line per failed member."""
    errors: dict[int, str] = {}

    async def check(index: int, member: Worker) -> None:
        try:
            await member.health()
        except WorkerError as exc:
            errors[index] = f"{noun} {index} ({label(member)}): {exc}"

    async with anyio.create_task_group() as tg:
        for index, member in enumerate(members):
            tg.start_soon(check, index, member)
    return [errors[i] for i in sorted(errors)]


async def close_all(members: Sequence[Worker]) -> None:
    async with anyio.create_task_group() as tg:
        for member in members:
            tg.start_soon(member.aclose)


def _identities(workers: Sequence[Worker]) -> list[str]:
    """Distinct, stable names for the ring: the worker's label, numbered when repeated."""
    seen: dict[str, int] = {}
    names = []
    for worker in workers:
        base = label(worker)
        count = seen.get(base, 0)
        seen[base] = count + 1
        names.append(base if count == 0 else f"{base} #{count + 1}")
    return names
