"""Test support for the resilience tests: a clock that moves only when told to, and a
fault server that plays a script of failures per label.

`FakeClock` implements `mcp_orchestrator.resilience.retry.Clock`. Its `sleep` returns
at once (after one checkpoint) and moves the clock forward by the requested time, so
backoff, Retry-After and breaker timeouts are measured exactly, with no wall time
spent and no timed assertions.

`ScriptedFaultServer` extends tests/support_fault_server.FaultServer (the workers'
fault server, unchanged) with per-label scripts, a slow first byte, and answers
recorded once from the real model server and replayed byte for byte.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass

import anyio
import anyio.lowlevel
import httpx2
import pytest

from tests.support_fault_server import (
    IO_TIMEOUT_S,
    FaultServer,
    _chunk,
    _close_after,
    _cut_after,
    _dechunk,
    _end,
    _EventSplitter,
    _forward_upstream,
    _Incoming,
    _pass_through,
    _Policy,
    _write_error,
)
from tests.support_llama import LlamaServer


class FakeClock:
    def __init__(self, start: float = 1000.0, *, follow_loop: bool = False) -> None:
        """`follow_loop` adds the event loop's own (real) elapsed time, for use inside a
        running pipeline whose cancel scopes still run on real time."""
        self._offset = start
        self._follow_loop = follow_loop
        self._loop_start: float | None = None
        self.sleeps: list[float] = []

    def now(self) -> float:
        if not self._follow_loop:
            return self._offset
        if self._loop_start is None:
            self._loop_start = anyio.current_time()
        return self._offset + (anyio.current_time() - self._loop_start)

    def advance(self, seconds: float) -> None:
        assert seconds >= 0
        self._offset += seconds

    async def sleep(self, seconds: float) -> None:
        assert seconds >= 0, seconds
        self.sleeps.append(seconds)
        self._offset += seconds
        await anyio.lowlevel.checkpoint()

    @property
    def slept(self) -> float:
        return sum(self.sleeps)


# ---------------------------------------------------------------------------- a fault server that follows a script


@dataclass(frozen=True)
class _Answer:
    """A real answer of the model server, kept to be sent again: head plus SSE events (or a body)."""

    head: bytes
    events: tuple[bytes, ...] = ()
    body: bytes | None = None


class ScriptedFaultServer(FaultServer):
    """The workers' fault server plus a scripted scenario for the resilience tests:

        /script/<label>/...   each generation request takes the next step of
                              `script(label, ...)`; the last step repeats. Steps:
            "ok"              the real model server's answer
            "500", "529" ...  that error status in the backend's format
            "429@2"           ... with `Retry-After: 2`
            "429@date:3"      ... with `Retry-After: <HTTP date 3 s from now>`
            "slow:<ms>"       wait <ms> before the response head (slow first byte), then answer
            "reset:<n>"       send n SSE events of the answer, then reset the connection
            "stall:<n>"       send n SSE events, then go silent
            "drop"            read the request, then close the connection without a byte of answer
        health checks and model lists under /script/ are relayed as they are.

    Answers are the real server's bytes, recorded the first time each API path (and
    stream or not) is asked for and sent again from memory after that: the same
    wire format, but no model time per call, so the tests do not depend on how busy
    the machine is. The steps a label has taken are kept in `taken[label]`.
    """

    def __init__(self, upstream: str | None = None) -> None:
        super().__init__(upstream)
        self._scripts: dict[str, list[str]] = {}
        self._answers: dict[tuple[str, bool], _Answer] = {}
        self.taken: dict[str, list[str]] = {}

    def script(self, label: str, *steps: str) -> None:
        """Set (or replace) what /script/<label>/ does from its next request on."""
        assert steps
        self._scripts[label] = list(steps)  # one assignment: atomic for the server's thread

    def record_streams(self) -> None:
        """Record the streamed answers of both wire formats now, so no test waits for the model."""
        messages = [{"role": "user", "content": "Say hi"}]
        with httpx2.Client(timeout=IO_TIMEOUT_S) as http:
            for path, body in (
                ("/v1/chat/completions", {"model": "m", "messages": messages, "max_tokens": 4, "stream": True}),
                ("/v1/messages", {"model": "m", "messages": messages, "max_tokens": 4, "stream": True}),
            ):
                http.post(self.url("script", "warm-up") + path, json=body).raise_for_status()
        self.taken.pop("warm-up", None)

    def generations(self, label: str) -> int:
        """Generation requests that reached /script/<label>/ (health checks not counted)."""
        return len(self.taken.get(label, []))

    async def _respond(self, incoming: _Incoming, writer: asyncio.StreamWriter) -> None:
        name, *args = incoming.scenario or ("",)
        if name == "script" and _is_generation(incoming.api_path):
            await self._play(self._next_step(args[0]), incoming, writer)
        elif name == "script":
            await self._relay(incoming, writer, _pass_through)
        else:
            await super()._respond(incoming, writer)

    def _next_step(self, label: str) -> str:
        steps = self._scripts.get(label) or ["ok"]
        step = steps.pop(0) if len(steps) > 1 else steps[0]
        self.taken.setdefault(label, []).append(step)
        return step

    async def _play(self, step: str, incoming: _Incoming, writer: asyncio.StreamWriter) -> None:
        kind, _, arg = step.partition(":")
        if step == "ok":
            await self._answer(incoming, writer, _pass_through)
        elif step == "drop":
            writer.close()
        elif kind == "slow":
            await asyncio.sleep(int(arg) / 1000)
            await self._answer(incoming, writer, _pass_through)
        elif kind in ("reset", "stall"):
            await self._answer(incoming, writer, _cut_after(kind, int(arg), incoming.api_path))
        else:
            status, _, after = step.partition("@")
            options = {}
            if after.startswith("date:"):
                options["retry-after-date"] = after.removeprefix("date:")
            elif after:
                options["retry-after"] = after
            await _write_error(writer, incoming, int(status), options)

    async def _answer(self, incoming: _Incoming, writer: asyncio.StreamWriter, policy: _Policy) -> None:
        key = (incoming.api_path, _wants_stream(incoming.body))
        answer = self._answers.get(key)
        if answer is None:
            answer = self._answers[key] = await self._record(incoming)
        writer.write(answer.head)
        if answer.body is not None:
            writer.write(answer.body)
            await writer.drain()
            return
        for index, event in enumerate(answer.events):
            action = policy(index, event)
            if action is not None:
                await action(writer)
                return
            writer.write(_chunk(event))
            await writer.drain()
        await _end(writer)

    async def _record(self, incoming: _Incoming) -> _Answer:
        assert self.upstream is not None, "recording an answer needs the real server"
        reader, writer, head = await _forward_upstream(self.upstream, incoming)
        try:
            if b"transfer-encoding: chunked" not in head.lower():
                return _Answer(_close_after(head), body=await asyncio.wait_for(reader.read(), IO_TIMEOUT_S))
            splitter = _EventSplitter()
            events = [event async for data in _dechunk(reader) for event in splitter.feed(data)]
            return _Answer(_close_after(head), tuple(events))
        finally:
            writer.close()


def _is_generation(api_path: str) -> bool:
    return api_path.endswith("/completions") or api_path == "/v1/messages"


def _wants_stream(body: bytes) -> bool:
    try:
        return bool(json.loads(body).get("stream"))
    except (ValueError, AttributeError):
        return False


@pytest.fixture(scope="session")
def scripted_faults(llama: LlamaServer) -> Iterator[ScriptedFaultServer]:
    """A scripted fault server for the session, recording its answers from the session's real model server."""
    server = ScriptedFaultServer(upstream=llama.root)
    server.start()
    try:
        server.record_streams()
        yield server
    finally:
        server.stop()
