"""Small helpers for the servers the tests and benchmarks start."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path
from typing import Any

STOP_TIMEOUT_S = 10.0


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def terminate(process: subprocess.Popen[Any]) -> None:
    """Terminate `process` and reap it; kill it if it does not go in time."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT_S)


def rss_bytes(pid: int | None = None) -> int:
    """Resident set size of a process (this one by default), from Linux's /proc."""
    status = Path(f"/proc/{'self' if pid is None else pid}/status")
    for line in status.read_text(encoding="utf-8").splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS in {status}")
