"""A fallback chain: try members in order, moving on only after a retryable failure.

A permanent failure (bad request, bad key) is reported at once: the next member
would most likely refuse the same request too. Once a member has yielded its first
chunk the chain is committed to it: a failure after that is reported, never papered
over by a second member's answer, which would splice two different answers together
in the caller's stream.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import aclosing
from typing import Any

from mcp_orchestrator.workers.base import Chunk, Worker, WorkerError, WorkerRequest, is_available, label
from mcp_orchestrator.workers.pool import check_all, close_all


class FallbackWorker:
    kind = "fallback"

    def __init__(self, members: Sequence[Worker]) -> None:
        if not members:
            raise ValueError("a fallback chain needs at least one member")
        self._members = list(members)
        self._served = [0] * len(members)
        self._failed = [0] * len(members)

    @property
    def members(self) -> tuple[Worker, ...]:
        return tuple(self._members)

    def wrap_members(self, wrap: Callable[[Worker], Worker]) -> None:
        self._members = [wrap(member) for member in self._members]

    @property
    def model(self) -> str:
        return self._members[0].model

    async def generate(self, request: WorkerRequest) -> AsyncGenerator[Chunk, None]:
        skipped: list[str] = []
        failures: list[WorkerError] = []
        for index, member in enumerate(self._members):
            name = f"member {index} ({label(member)})"
            if not is_available(member):
                skipped.append(f"{name}: unavailable")
                continue
            started = False
            try:
                async with aclosing(member.generate(request)) as chunks:
                    async for chunk in chunks:
                        started = True
                        yield chunk
            except WorkerError as exc:
                self._failed[index] += 1
                if started:
                    raise self._mid_stream(name, exc) from exc
                if not exc.retryable:
                    raise
                skipped.append(f"{name}: {exc}")
                failures.append(exc)
                continue
            self._served[index] += 1
            return
        raise self._exhausted(skipped, failures)

    @staticmethod
    def _mid_stream(name: str, exc: WorkerError) -> WorkerError:
        return WorkerError(
            "fallback",
            f"{name} failed after its answer had started streaming; not switching members mid-answer: {exc}",
            retryable=exc.retryable,
            status=exc.status,
            retry_after_s=exc.retry_after_s,
        )

    def _exhausted(self, skipped: list[str], failures: list[WorkerError]) -> WorkerError:
        waits = [f.retry_after_s for f in failures if f.retry_after_s is not None]
        return WorkerError(
            "fallback",
            f"all {len(self._members)} members failed: {'; '.join(skipped)}",
            retryable=True,
            retry_after_s=min(waits) if waits else None,
        )

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "model": self.model,
            "members": [
                {**m.describe(), "served": served, "failed": failed}
                for m, served, failed in zip(self._members, self._served, self._failed, strict=True)
            ],
        }

    async def health(self) -> None:
        """At least one member must answer: the chain exists to ride out dead members."""
        errors = await check_all(self.members, "member")
        if len(errors) == len(self._members):
            raise WorkerError("fallback", f"no member passed the health check: {'; '.join(errors)}", retryable=True)

    async def aclose(self) -> None:
        await close_all(self.members)
