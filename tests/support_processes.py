"""Start the installed console script as a real process: stdio server, HTTP server, one-shot CLI run.

Every helper has a deadline and always stops what it started (terminate, then kill).
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import httpx2
from mcp import StdioServerParameters

from testbeds.processes import free_port as free_port
from testbeds.processes import terminate as terminate

SCRIPT = Path(sys.executable).parent / "mcp-orchestrator"
DEFAULT_LOOP = "uvloop" if sys.platform != "win32" and platform.python_implementation() == "CPython" else "asyncio"
"""The loop a served process picks by default: uvloop is a dependency exactly there (pyproject.toml)."""
STARTUP_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
CLI_TIMEOUT_S = 30.0
LINE_TIMEOUT_S = 20.0


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The test's environment plus `extra`, without any bearer token leaking in from outside."""
    env = {k: v for k, v in os.environ.items() if k != "MCP_ORCHESTRATOR_TOKEN"}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def run_cli(*args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the console script to completion and capture its output."""
    return subprocess.run(
        [str(SCRIPT), *args], capture_output=True, text=True, timeout=CLI_TIMEOUT_S, env=child_env(env), check=False
    )


def stdio_params(*args: str, env: Mapping[str, str] | None = None) -> StdioServerParameters:
    """Parameters for `mcp.Client` / `stdio_client` to launch the console script over stdio."""
    return StdioServerParameters(command=str(SCRIPT), args=list(args), env=child_env(env))


def close_pipes(process: subprocess.Popen[Any]) -> None:
    for stream in (process.stdin, process.stdout, process.stderr):
        if stream is not None and not stream.closed:
            stream.close()


@dataclass
class HttpServer:
    process: subprocess.Popen[str]
    port: int
    token: str | None
    stderr_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def mcp_url(self) -> str:
        return f"{self.base_url}/mcp"

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def stderr(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")


def _wait_until_healthy(server: HttpServer) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    with httpx2.Client(timeout=2.0) as http:
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                raise RuntimeError(f"server exited with {server.process.returncode}:\n{server.stderr()}")
            try:
                if http.get(f"{server.base_url}/healthz", headers=server.auth_headers()).status_code == 200:
                    return
            except httpx2.TransportError:
                pass
            time.sleep(0.05)
    raise TimeoutError(f"server not healthy within {STARTUP_TIMEOUT_S} s:\n{server.stderr()}")


@contextmanager
def http_server(
    *args: str, token: str | None = None, workdir: Path, env: Mapping[str, str] | None = None
) -> Iterator[HttpServer]:
    """Run `mcp-orchestrator --transport http --port 0` until the block ends; the port it
    picked is read from its start-up banner (no free-port race)."""
    extra = dict(env or {})
    if token is not None:
        extra["MCP_ORCHESTRATOR_TOKEN"] = token
    stderr_path = workdir / f"http-{next(_SERVER_NUMBERS)}.stderr"
    with stderr_path.open("w", encoding="utf-8") as stderr:
        process = subprocess.Popen(
            [str(SCRIPT), "--transport", "http", "--host", "127.0.0.1", "--port", "0", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            text=True,
            env=child_env(extra),
        )
    server = HttpServer(process, 0, token, stderr_path)
    try:
        server.port = _banner_port(server)
        _wait_until_healthy(server)
        yield server
    finally:
        terminate(process)


_SERVER_NUMBERS = itertools.count(1)
BANNER = re.compile(r"MCP at http://127\.0\.0\.1:(\d+)/mcp")


def _banner_port(server: HttpServer) -> int:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        match = BANNER.search(server.stderr())
        if match is not None:
            return int(match.group(1))
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited with {server.process.returncode}:\n{server.stderr()}")
        time.sleep(0.02)
    raise RuntimeError(f"no start-up banner within {STARTUP_TIMEOUT_S} s:\n{server.stderr()}")


@dataclass
class RawStdio:
    """A stdio server driven by hand: JSON lines in, every stdout line kept for inspection.

    A thread reads stdout line by line into a queue, so every read can have a timeout.
    """

    process: subprocess.Popen[str]
    lines: queue.Queue[str | None]
    stdout_lines: list[str]

    def send(self, message: Mapping[str, Any]) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(message) + "\n")
        self.process.stdin.flush()

    def next_line(self) -> str | None:
        """The next stdout line, None at end of output; fails after LINE_TIMEOUT_S."""
        try:
            line = self.lines.get(timeout=LINE_TIMEOUT_S)
        except queue.Empty:
            raise TimeoutError(f"no stdout line within {LINE_TIMEOUT_S} s") from None
        if line is not None:
            self.stdout_lines.append(line)
        return line

    def read_until_response(self, request_id: int) -> list[dict[str, Any]]:
        """Read stdout lines (each must be JSON) up to and including the response to `request_id`."""
        messages: list[dict[str, Any]] = []
        while True:
            line = self.next_line()
            if line is None:
                raise AssertionError(f"stdout closed before the response to {request_id}; got {messages}")
            message = json.loads(line)
            messages.append(message)
            if message.get("id") == request_id and ("result" in message or "error" in message):
                return messages

    def hang_up(self) -> tuple[int, list[str]]:
        """Close stdin as a client leaving would; return the exit code and the stdout lines that followed."""
        assert self.process.stdin is not None
        self.process.stdin.close()
        rest: list[str] = []
        while (line := self.next_line()) is not None:
            rest.append(line)
        return self.process.wait(timeout=STOP_TIMEOUT_S), rest


def _pump_lines(stream: TextIO, into: queue.Queue[str | None]) -> None:
    for line in stream:
        into.put(line.rstrip("\n"))
    into.put(None)


@contextmanager
def raw_stdio(*args: str, stderr_path: Path) -> Iterator[RawStdio]:
    """The console script on stdio with pipes we drive ourselves."""
    with stderr_path.open("w", encoding="utf-8") as stderr:
        process = subprocess.Popen(
            [str(SCRIPT), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=child_env(),
        )
    assert process.stdout is not None
    lines: queue.Queue[str | None] = queue.Queue()
    reader = threading.Thread(target=_pump_lines, args=(process.stdout, lines), daemon=True)
    reader.start()
    try:
        yield RawStdio(process, lines, [])
    finally:
        terminate(process)
        reader.join(timeout=STOP_TIMEOUT_S)
        close_pipes(process)


def python_module(*args: str, module: str = "mcp_orchestrator") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        env=child_env(),
        check=False,
    )


def write_lines(path: Path, lines: Sequence[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def wait_for_text(path: Path, text: str) -> str:
    """A log file's content once it contains `text` (bounded: a server that never logs it
    fails the test instead of hanging it)."""
    deadline = time.monotonic() + LINE_TIMEOUT_S
    while time.monotonic() < deadline:
        content = path.read_text(encoding="utf-8", errors="replace")
        if text in content:
            return content
        time.sleep(0.02)
    raise AssertionError(f"{text!r} not in the log within {LINE_TIMEOUT_S} s:\n{path.read_text(encoding='utf-8')}")
