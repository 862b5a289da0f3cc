"""Stopping on SIGTERM or SIGINT without leaving a caller unanswered.

Why: a process that simply dies on the signal cuts every call in flight: over HTTP each
client sees its response stream end without an answer, over stdio the process is gone in
milliseconds. Here the signal starts a drain instead:

1. no new work: the pipeline admits nothing more (`ShuttingDown`, a tool error) and the HTTP
   edge answers new requests with 503;
2. the calls in flight, and the tasks and background requests running, get up to
   `[server] shutdown_grace_s` to finish normally;
3. the requests still running then are cancelled through the ledger (counted as cancelled,
   so the counters still reconcile), each caller answered with `CancelledByShutdown`;
4. once every call is answered (and no new one came for SETTLE_S, for what a client sends
   right after an answer), `drained` tells the transport to stop, and the server returns
   normally: exit status 0.

A second signal during the drain ends the grace at once. Which calls are in flight is told
by the transport edges (server/draining.py), where an answer is known to be on its way to
the client: a call leaves `InFlight` only once its answer has been handed to the wire.
Logs go to stderr: one line when the drain starts, one with its outcome.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import AsyncIterator, Hashable
from dataclasses import dataclass

import anyio
from anyio.abc import TaskStatus

from mcp_orchestrator.errors import CancelledByShutdown
from mcp_orchestrator.jobs import Jobs
from mcp_orchestrator.pipeline import Pipeline

log = logging.getLogger(__name__)

ANSWER_TIMEOUT_S = 5.0
"""How long the calls cancelled at the end of the grace may take to send their error answers."""
SETTLE_S = 0.5
"""Once the last call in flight is answered, how long no new one must come before the server
stops (within the grace): a client may need one more request to finish with an answer (the
SDK's client asks for the tool list right after a result, to check it against the tool's
output schema, when it has not listed the tools yet)."""
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class InFlight:
    """Calls a transport has taken and not yet answered, by a key of the transport's choosing."""

    def __init__(self) -> None:
        self._keys: set[Hashable] = set()
        self._idle = anyio.Event()
        self._idle.set()
        self.entered = 0
        """Calls taken since start."""

    @property
    def count(self) -> int:
        return len(self._keys)

    def enter(self, key: Hashable) -> None:
        if not self._keys:
            self._idle = anyio.Event()
        self._keys.add(key)
        self.entered += 1

    def leave(self, key: Hashable) -> None:
        self._keys.discard(key)
        if not self._keys:
            self._idle.set()

    async def idle(self) -> None:
        """Return once no call is in flight."""
        while self._keys:
            await self._idle.wait()

    async def settled(self, quiet_s: float) -> None:
        """Return once no call has been in flight, nor come, for `quiet_s`."""
        while True:
            await self.idle()
            seen = self.entered
            await anyio.sleep(quiet_s)
            if self.entered == seen and not self._keys:
                return


@dataclass(frozen=True)
class DrainReport:
    """What a drain did, for its closing log line."""

    in_flight: int
    """Calls in flight when the drain began."""
    cancelled: int
    """Requests still running in the pipeline when the grace ran out."""
    unanswered: int
    """Calls still without an answer when the transport was told to stop."""
    elapsed_s: float

    def summary(self) -> str:
        if self.cancelled:
            outcome = (
                f"grace over: cancelled {self.cancelled} request(s) still running, each caller answered with an error"
            )
        elif self.unanswered:
            outcome = "grace over"
        elif self.in_flight:
            outcome = f"all {self.in_flight} in-flight request(s) finished"
        else:
            outcome = "no request was in flight"
        lost = f"; {self.unanswered} call(s) still unanswered are dropped" if self.unanswered else ""
        return f"shutdown: {outcome} after {self.elapsed_s:.2f} s{lost}; exiting"


class Shutdown:
    """One server's stop: started by a signal (or `drain`), read by the transport edges."""

    def __init__(self, pipeline: Pipeline, grace_s: float, jobs: Jobs | None = None) -> None:
        self.pipeline = pipeline
        self.grace_s = grace_s
        self.jobs = jobs
        """Tasks and background requests: they get the grace too (no transport call waits on them)."""
        self.in_flight = InFlight()
        self.drained = anyio.Event()
        """Set when every call is answered (or given up on): the transport stops."""

    @property
    def stopping(self) -> bool:
        """True once the drain began (the pipeline admits nothing more): the edges take no new work."""
        return not self.pipeline.admission.admitting

    async def on_signals(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Drain on the first SIGTERM or SIGINT; run until cancelled (later signals are only logged,
        so the process never dies of one between the drain and its exit)."""
        with anyio.open_signal_receiver(*STOP_SIGNALS) as signals:
            task_status.started()
            async for signum in signals:
                await self.drain(f"{signal.Signals(signum).name} received", signals)
                break
            async for signum in signals:
                log.warning("%s received: already stopping", signal.Signals(signum).name)

    async def drain(self, cause: str = "stopping", more_signals: AsyncIterator[int] | None = None) -> DrainReport:
        """Stop taking work, give the calls in flight the grace, cancel the rest, set `drained`.
        `more_signals`: a signal from there ends the grace at once."""
        self.pipeline.stop_admitting()
        began = anyio.current_time()
        in_flight = self.in_flight.count
        jobs = self.jobs.running if self.jobs is not None else 0
        also = f" and {jobs} task(s) or background request(s)" if jobs else ""
        log.warning("%s: draining %d in-flight request(s)%s, up to %g s", cause, in_flight, also, self.grace_s)
        await self._wait_for_answers(more_signals, settle=in_flight > 0)
        cancelled = self.pipeline.cancel_in_flight(lambda: CancelledByShutdown(self.grace_s))
        if self.in_flight.count:
            with anyio.move_on_after(ANSWER_TIMEOUT_S):
                await self.in_flight.idle()
        report = DrainReport(in_flight, cancelled, self.in_flight.count, anyio.current_time() - began)
        log.warning("%s", report.summary())
        self.drained.set()
        return report

    async def _wait_for_answers(self, more_signals: AsyncIterator[int] | None, *, settle: bool) -> None:
        """Until every call in flight is answered (and, with `settle`, no other came for
        SETTLE_S), the grace runs out or another signal comes."""
        with anyio.move_on_after(self.grace_s) as grace:
            async with anyio.create_task_group() as tg:
                if more_signals is not None:
                    tg.start_soon(_end_on_next_signal, more_signals, grace)
                await self.in_flight.idle()
                if self.jobs is not None:
                    await self.jobs.idle()
                if settle:
                    await self.in_flight.settled(SETTLE_S)
                tg.cancel_scope.cancel()


async def _end_on_next_signal(signals: AsyncIterator[int], grace: anyio.CancelScope) -> None:
    async for signum in signals:
        log.warning("%s received again: not waiting for the grace", signal.Signals(signum).name)
        grace.cancel()
        return
