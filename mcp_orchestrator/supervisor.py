"""Several server processes on one port: `mcp-orchestrator --transport http --workers N`.

One Python process tops out at one core. The supervisor (this module, the process the user
started) binds the port once and starts N worker processes, each a full mcp-orchestrator
(`python -m mcp_orchestrator` with the same flags) serving HTTP on that one socket. It
restarts a worker that dies and, on SIGTERM or SIGINT, stops them all: each drains as one
process does (shutdown.py), and the supervisor exits 0 once every worker has.

Why one socket bound here and inherited (what uvicorn's and gunicorn's process managers do)
rather than SO_REUSEPORT sockets bound by each worker:
- a connection waiting in the accept queue belongs to the socket, not to a process: when a
  worker dies, what it had not accepted yet is taken by the others. With SO_REUSEPORT each
  worker has its own queue, and the connections in a dead worker's queue are reset;
- the port is bound once, before any worker starts: a taken port is one clear line, `--port 0`
  picks one port for all, and no other process can join the group later (SO_REUSEPORT lets
  any process of the same user bind the same port and receive a share of the connections);
- the kernel hands each new connection to a worker that is waiting in accept, so a busy
  worker takes fewer; SO_REUSEPORT hashes connections to workers whatever their load.
An HTTP/1.1 connection stays with the worker that accepted it; a new connection may go to any.

Worker processes learn their socket from WORKER_ENV, set only by the supervisor and honoured
only by its direct children (it carries the supervisor's pid, checked against getppid()).
A worker whose supervisor is gone (killed with SIGKILL) gets SIGTERM from the kernel
(Linux's parent-death signal) and drains, instead of serving on as an orphan.

State: without `[distributed] redis_url` each process would keep its own cache, flights, rate
limits, breakers and dead letters, and N processes would silently act as N servers with N
times the configured limits: `--workers N > 1` is refused without it (`refusal`).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import anyio
from anyio.abc import Process, TaskGroup, TaskStatus

from mcp_orchestrator.config import Config

log = logging.getLogger(__name__)

WORKER_ENV = "MCP_ORCHESTRATOR_WORKER"
"""`<supervisor pid>:<worker index>:<listening fd>:<metrics fd or empty>` in a worker's environment."""
EXIT_USAGE = 2
RESTART_DELAY_S = 0.0
"""A worker that died after running a while is started again at once."""
MAX_RESTART_DELAY_S = 30.0
"""A worker that keeps dying at start is restarted after 0.5, 1, 2, ... up to this many seconds."""
HEALTHY_RUN_S = 10.0
"""A worker that ran this long before dying was healthy: its next restart is immediate."""
KILL_MARGIN_S = 10.0
"""On stop, a worker still running this long after its drain's grace is killed."""
PR_SET_PDEATHSIG = 1


def refusal(workers: int, config: Config) -> str | None:
    """Why `--workers` cannot be served with this configuration, or None. Redis is
    `[distributed] redis_url`, else the REDIS_URL environment variable (config.py)."""
    if workers < 1:
        return f"--workers {workers}: at least 1 process is needed"
    if workers == 1:
        return None
    if config.server.transport != "http":
        return f"--workers {workers} needs --transport http (stdio serves the one client that started it)"
    if not config.distributed.url(os.environ):
        return (
            f"--workers {workers} needs [distributed] redis_url (or REDIS_URL): without Redis every process would keep its own "
            "cache, coalescing, rate limits, breakers and dead letters, and they would silently diverge"
        )
    metrics_port = config.observability.metrics_port
    if metrics_port is not None and metrics_port + workers - 1 > 65535:
        return f"--workers {workers} with metrics_port {metrics_port}: worker i serves metrics on metrics_port + i"
    return None


def session_warning(workers: int, config: Config) -> str | None:
    """A warning for sessions kept in one worker's memory (clients of protocol 2025-11-25 and
    earlier), which another worker cannot serve; None when there is nothing to say."""
    if workers < 2 or config.server.stateless:
        return None
    return (
        f"--workers {workers} with HTTP sessions on: a session of a client older than protocol 2026-07-28 "
        "lives in the worker that opened it, and its requests that reach another worker get 404; "
        "set [server] stateless = true (see docs/operations.md, 'Several processes on one port')"
    )


@dataclass(frozen=True)
class WorkerSlot:
    """What a worker process inherited from its supervisor."""

    index: int
    listen_fd: int
    metrics_fd: int | None

    def listener(self) -> socket.socket:
        return socket.socket(fileno=self.listen_fd)

    def metrics_listener(self) -> socket.socket | None:
        return None if self.metrics_fd is None else socket.socket(fileno=self.metrics_fd)


def inherited() -> WorkerSlot | None:
    """This process's slot when it is a worker started by a supervisor, else None.

    Read once and removed from the environment. A value left over from elsewhere (its pid
    is not our parent's) is ignored: this process then binds its own port as usual."""
    value = os.environ.pop(WORKER_ENV, None)
    if value is None:
        return None
    try:
        pid, index, listen_fd, metrics_fd = value.split(":")
        slot = WorkerSlot(int(index), int(listen_fd), int(metrics_fd) if metrics_fd else None)
        supervisor = int(pid)
    except ValueError:
        log.warning("ignoring a malformed %s", WORKER_ENV)
        return None
    if supervisor != os.getppid():
        log.warning("ignoring %s: it was not set by this process's parent", WORKER_ENV)
        return None
    _die_with_parent(supervisor)
    return slot


def _die_with_parent(supervisor: int) -> None:
    """Ask Linux for SIGTERM (a drain) when the supervisor dies; elsewhere nothing happens."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != supervisor:  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


class Supervisor:
    """Starts N workers on one bound socket, restarts the dead, stops all on SIGTERM/SIGINT."""

    def __init__(
        self,
        argv: Sequence[str],
        workers: int,
        listener: socket.socket,
        metrics_listeners: Sequence[socket.socket],
        grace_s: float,
    ) -> None:
        self.command = [sys.executable, "-m", "mcp_orchestrator", *argv]
        self.workers = workers
        self.listener = listener
        self.metrics_listeners = list(metrics_listeners)
        self.grace_s = grace_s
        self.processes: dict[int, Process] = {}
        self.stopping = anyio.Event()
        self.exit_code = 0

    def run(self) -> int:
        """Serve until stopped; the exit status for the command line."""
        return anyio.run(self._run)

    async def _run(self) -> int:
        async with anyio.create_task_group() as tg:
            await tg.start(self._on_signals, tg)  # before any worker starts: from now on SIGTERM stops all
            async with anyio.create_task_group() as slots:
                for index in range(self.workers):
                    slots.start_soon(self._keep_running, index)
            tg.cancel_scope.cancel()
        return self.exit_code

    async def _keep_running(self, index: int) -> None:
        """Run worker `index` until the supervisor stops, starting it again whenever it dies."""
        delay = RESTART_DELAY_S
        while not self.stopping.is_set():
            started = anyio.current_time()
            process = await self._start(index)
            self.processes[index] = process
            if self.stopping.is_set():  # stopped while it was starting: it gets its SIGTERM too
                process.send_signal(signal.SIGTERM)
            code = await process.wait()
            del self.processes[index]
            if self.stopping.is_set():
                if code != 0:
                    log.warning("worker %d (pid %d) stopped with %s", index, process.pid, _describe(code))
                    self.exit_code = 1
                return
            if code == EXIT_USAGE:  # the configuration is refused: starting it again cannot help
                log.error("worker %d refused the configuration (exit %d): stopping every worker", index, code)
                self.exit_code = EXIT_USAGE
                self.stop()
                return
            ran = anyio.current_time() - started
            delay = RESTART_DELAY_S if ran >= HEALTHY_RUN_S else min(MAX_RESTART_DELAY_S, max(0.5, delay * 2))
            log.warning(
                "worker %d (pid %d) exited with %s after %.1f s: starting it again%s",
                index,
                process.pid,
                _describe(code),
                ran,
                f" in {delay:g} s" if delay else "",
            )
            with anyio.move_on_after(delay):
                await self.stopping.wait()

    async def _start(self, index: int) -> Process:
        fds = [self.listener.fileno()]
        metrics_fd = ""
        if self.metrics_listeners:
            fds.append(self.metrics_listeners[index].fileno())
            metrics_fd = str(fds[-1])
        env = dict(os.environ)
        env[WORKER_ENV] = f"{os.getpid()}:{index}:{fds[0]}:{metrics_fd}"
        process = await anyio.open_process(
            self.command, stdin=subprocess.DEVNULL, stdout=None, stderr=None, env=env, pass_fds=fds
        )
        log.info("worker %d started (pid %d)", index, process.pid)
        return process

    def stop(self) -> None:
        """Ask every worker to drain (SIGTERM); no worker is started again."""
        self.stopping.set()
        self._signal_all(signal.SIGTERM)

    def _signal_all(self, signum: signal.Signals) -> None:
        for process in list(self.processes.values()):
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signum)

    async def _on_signals(self, tg: TaskGroup, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """SIGTERM/SIGINT: stop all (a second one is passed on: the workers end their grace at
        once). SIGHUP: passed on, each worker reloads its --config."""
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            task_status.started()
            async for signum in signals:
                name = signal.Signals(signum).name
                if signum == signal.SIGHUP:
                    log.warning("SIGHUP received: passed on to %d worker(s)", len(self.processes))
                    self._signal_all(signal.SIGHUP)
                elif not self.stopping.is_set():
                    log.warning("%s received: stopping %d worker(s)", name, len(self.processes))
                    self.stop()
                    tg.start_soon(self._kill_stragglers)
                else:
                    log.warning("%s received again: passed on, the workers end their grace now", name)
                    self._signal_all(signal.SIGTERM)

    async def _kill_stragglers(self) -> None:
        """Kill the workers still running well after their drain should have ended."""
        await anyio.sleep(self.grace_s + KILL_MARGIN_S)
        if self.processes:
            log.error("%d worker(s) still running after the grace: killing them", len(self.processes))
            self.exit_code = 1
            self._signal_all(signal.SIGKILL)


def _describe(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return signal.Signals(-code).name
    return f"status {code}"
