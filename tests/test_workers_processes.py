"""`mcp-orchestrator --transport http --workers N`: real processes on one port, a real Redis.

Which worker answered a call is read from the kernel, not from the product: the test opens
its own TCP connection, sends the call on it, and looks up which worker process holds the
server end of that connection (/proc/net/tcp and each worker's /proc/<pid>/fd). No timed
assertions: every wait has a deadline and only fails the test when it runs out.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from testbeds.redis import RedisServer, redis_server
from tests.support_processes import SCRIPT, child_env, run_cli, terminate

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc (Linux)")

DEADLINE_S = 30.0
SUPERVISOR_LINE = re.compile(r"supervisor \(pid (\d+)\) serving http://127\.0\.0\.1:(\d+) with (\d+) worker")
BANNER = "MCP at http://127.0.0.1:"
PROTOCOL = "2026-07-28"


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


@dataclass
class Supervised:
    process: subprocess.Popen[str]
    port: int
    log: Path

    def text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def workers(self) -> set[int]:
        return children_of(self.process.pid)


def children_of(pid: int) -> set[int]:
    """Live (not zombie) child processes of `pid`."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        state, parent = stat[stat.rindex(")") + 2 :].split()[:2]
        if int(parent) == pid and state != "Z":
            found.add(int(entry.name))
    return found


def wait_for(what: str, check: object) -> None:
    assert callable(check)
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"not within {DEADLINE_S:g} s: {what}")


@contextmanager
def supervised(tmp_path: Path, redis_url: str, workers: int = 2) -> Iterator[Supervised]:
    log = tmp_path / "supervisor.log"
    with log.open("w", encoding="utf-8") as sink:
        process = subprocess.Popen(
            [str(SCRIPT), "--transport", "http", "--port", "0", "--workers", str(workers), "--log-level", "info"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=sink,
            text=True,
            env=child_env({"REDIS_URL": redis_url}),
        )
    try:
        server = Supervised(process, 0, log)
        wait_for("the supervisor's start line", lambda: SUPERVISOR_LINE.search(server.text()) or process.poll())
        match = SUPERVISOR_LINE.search(server.text())
        assert match is not None, server.text()
        server.port = int(match.group(2))
        wait_for(f"{workers} workers serving", lambda: server.text().count(BANNER) >= workers)
        wait_for(f"{workers} worker processes", lambda: len(server.workers()) == workers)
        yield server
    finally:
        terminate(process)


# ---------------------------------------------------------------------------- one call on our own connection


def answered_by(port: int, prompt: str) -> int | None:
    """A 2026-07-28 `infer` POST on a fresh connection (checked to succeed); returns the pid of
    the process that held the server end of the connection while it was open."""
    body = json.dumps(
        {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "tools/call",
            "params": {
                "name": "infer",
                "arguments": {"prompt": prompt},
                "_meta": {
                    "io.modelcontextprotocol/protocolVersion": PROTOCOL,
                    "io.modelcontextprotocol/clientCapabilities": {},
                },
            },
        }
    ).encode()
    head = (
        f"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Accept: application/json, text/event-stream\r\nMCP-Protocol-Version: {PROTOCOL}\r\n"
        f"Mcp-Method: tools/call\r\nMcp-Name: infer\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S) as sock:
        sock.sendall(head.encode() + body)
        status, payload = read_response(sock)
        owner = owner_of((sock.getsockname()[1], port))  # looked up while the connection is open
    assert status == 200, payload
    result = json.loads(payload)["result"]
    assert not result.get("isError"), result
    return owner


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed early: {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers["content-length"])  # a quick answer comes as JSON, not as an SSE stream
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed mid-body"
        rest += chunk
    return int(lines[0].split()[1]), rest[:length]


def owner_of(ends: tuple[int, int]) -> int | None:
    """The pid holding the server end of the loopback connection (client port, server port)."""
    client_port, server_port = ends
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = fields[1], fields[2]
        if int(local.split(":")[1], 16) == server_port and int(remote.split(":")[1], 16) == client_port:
            inode = fields[9]
    if inode is None:
        return None
    target = f"socket:[{inode}]"
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            for fd in (entry / "fd").iterdir():
                if os.readlink(fd) == target:
                    return int(entry.name)
        except OSError:  # not ours to read, or gone
            continue
    return None


def serve_until_all_answered(server: Supervised, expected: set[int], attempts: int = 300) -> set[int]:
    """Calls on fresh connections until every process in `expected` answered one (bounded)."""
    seen: set[int] = set()
    for number in range(attempts):
        owner = answered_by(server.port, f"call number {number}")
        if owner is not None:
            seen.add(owner)
        if expected <= seen:
            break
    return seen


# ---------------------------------------------------------------------------- the tests


def test_two_workers_serve_one_port_and_both_answer(tmp_path: Path, redis: RedisServer) -> None:
    with supervised(tmp_path, redis.url) as server:
        workers = server.workers()
        seen = serve_until_all_answered(server, workers)
        assert seen == workers, f"answered by {seen}, workers {workers}:\n{server.text()}"
        assert server.process.pid not in seen  # the supervisor serves nothing itself


def test_a_killed_worker_is_restarted_and_calls_keep_working(tmp_path: Path, redis: RedisServer) -> None:
    with supervised(tmp_path, redis.url) as server:
        before = server.workers()
        victim = min(before)
        os.kill(victim, signal.SIGKILL)
        for number in range(10):  # the survivor answers meanwhile
            answered_by(server.port, f"while restarting {number}")
        wait_for("a replacement worker", lambda: len(server.workers()) == 2 and victim not in server.workers())
        assert f"(pid {victim}) exited with SIGKILL" in server.text()
        after = server.workers()
        assert after - before, "no new worker process"
        wait_for("the replacement serving", lambda: server.text().count(BANNER) >= 3)
        seen = serve_until_all_answered(server, after)
        assert seen == after, f"answered by {seen}, workers {after}"


def test_sigterm_stops_every_worker_and_exits_0(tmp_path: Path, redis: RedisServer) -> None:
    with supervised(tmp_path, redis.url) as server:
        workers = server.workers()
        answered_by(server.port, "one call before stopping")
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=DEADLINE_S) == 0, server.text()
        assert not any(Path(f"/proc/{pid}").exists() for pid in workers), "a worker outlived the supervisor"
        text = server.text()
        assert "SIGTERM received: stopping 2 worker(s)" in text
        assert len(re.findall(r"shutdown: .*; exiting", text)) == 2, text  # each worker drained (shutdown.py)
        assert "Traceback" not in text


def test_more_than_one_worker_without_redis_is_refused() -> None:
    env = {k: v for k, v in child_env().items() if k != "REDIS_URL"}
    completed = subprocess.run(
        [str(SCRIPT), "--transport", "http", "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=DEADLINE_S,
        env=env,
        check=False,
    )
    assert completed.returncode == 2
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1, completed.stderr
    assert "--workers 2 needs [distributed] redis_url" in lines[0]
    assert "diverge" in lines[0]


def test_other_refusals_are_one_line(redis: RedisServer) -> None:
    stdio = run_cli("--workers", "2", env={"REDIS_URL": redis.url})
    assert stdio.returncode == 2 and "needs --transport http" in stdio.stderr
    zero = run_cli("--transport", "http", "--workers", "0")
    assert zero.returncode == 2 and "--workers 0: at least 1" in zero.stderr
    for completed in (stdio, zero):
        assert len(completed.stderr.strip().splitlines()) == 1, completed.stderr
    one = run_cli("--transport", "http", "--workers", "1", "--check-config")  # one process needs no Redis
    assert one.returncode == 0, one.stderr
