"""Tasks and background requests findable from any process.

A job runs in the process that started it (its pipeline requests, its cancel scope), but a
client behind a load balancer may poll another process. Each job's record (state, status
line, and once it ended its result) is kept under its id for `[tasks] ttl_s` after it ends,
so any process answers `tasks/get` and `request_status`; `tasks/cancel` and
`cancel_request` on another process are passed to the owner over the events channel. The
owner is stored as a digest: only a caller presenting the same identity may read it.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any, TypeVar

from redis.asyncio import Redis

from mcp_orchestrator.distributed.keys import Keys, digest
from mcp_orchestrator.distributed.link import Link, RedisUnavailable
from mcp_orchestrator.jobs.job import JobRecord, MirrorUnavailable

T = TypeVar("T")

Canceller = Callable[[str, str], None]
"""Cancels a local job by (id, owner digest) when another process asks."""


class SharedJobs:
    def __init__(self, link: Link, keys: Keys, node: str) -> None:
        self._link = link
        self._keys = keys
        self.node = node
        self.cancel_local: Canceller = lambda job_id, owner: None
        """Set by the job registry: how a cancel asked on another process reaches the job."""

    def owner_digest(self, owner: str) -> str:
        return digest(owner)

    async def _call(self, command: Callable[[Redis], Awaitable[T]]) -> T:
        try:
            return await self._link.call(command)
        except RedisUnavailable as exc:
            raise MirrorUnavailable(str(exc)) from None

    async def put(self, record: JobRecord, ttl_s: float) -> None:
        """Store `record` for `ttl_s`. A "working" record never replaces one already there (the
        job's end may be written first: two writes race). MirrorUnavailable."""
        key, data = self._keys.job(record.id), json.dumps(asdict(record), separators=(",", ":"))
        only_new = record.state == "working"
        await self._call(lambda client: client.set(key, data, px=max(1, int(ttl_s * 1000)), nx=only_new))

    async def get(self, job_id: str) -> JobRecord | None:
        """The record of `job_id`, None when no process has it. MirrorUnavailable."""
        key = self._keys.job(job_id)
        raw = await self._call(lambda client: client.get(key))
        if raw is None:
            return None
        try:
            record = JobRecord(**json.loads(raw))
        except (TypeError, ValueError):
            return None  # not ours (another version's shape): as good as absent
        return record

    async def ask_cancel(self, job_id: str, owner: str) -> None:
        """Ask whichever process runs `job_id` to cancel it. MirrorUnavailable."""
        message = json.dumps({"t": "job-cancel", "id": job_id, "o": owner})
        channel = self._keys.events

        async def run(client: Redis) -> Any:
            return await client.publish(channel, message)

        await self._call(run)

    def delivered(self, message: dict[str, Any]) -> None:
        """A cancel from the events channel (for a job this process may be running)."""
        job_id, owner = message.get("id"), message.get("o")
        if isinstance(job_id, str) and isinstance(owner, str):
            self.cancel_local(job_id, owner)
