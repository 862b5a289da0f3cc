"""Helpers for the tests of sharing through Redis: a real Redis, a counting OpenAI-style backend,
and orchestrator processes (`mcp-orchestrator --transport http`) configured to share one Redis.

The backend speaks the OpenAI chat completions wire format (non-streaming answers: the
workers are configured with `stream = false`) and behaves by the prompt's first word:

    slow ...     answers after SLOW_S (so identical calls from several processes overlap)
    hold ...     the first call answers once `release()` is called (it stays in flight), later ones at once
    sleep ...    answers only when the backend stops (a call that runs until it is cancelled)
    fail ...     500 every time
    flaky ...    500 the first time for that prompt, then answers
    anything else answers at once

and counts the calls per prompt, so a test can say "exactly one backend call".
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx2

from testbeds.redis import RedisServer, redis_server
from tests.support_processes import HttpServer, http_server

SLOW_S = 0.6
HOLD_LIMIT_S = 60.0
"""A held call answers after this long at most (a test bug cannot hang the backend)."""
WAIT_LIMIT_S = 30.0
"""Upper bound on any condition a test waits for (a bug fails the test instead of hanging it)."""
REDIS_TIMEOUT_MS = 2000
"""Redis commands' timeout in tests that share through Redis (not the default 100 ms): several
processes, the tests and Redis share two cores here, and opening a connection has taken over
100 ms on a busy CI machine. A command that misses its timeout rightly falls back to local
state, which the tests of sharing must not see by accident."""


class CountingBackend:
    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._released = threading.Event()
        self._closing = threading.Event()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def count(self, prompt: str) -> int:
        with self._lock:
            return self.calls[prompt]

    def release(self) -> None:
        self._released.set()

    def _call(self, prompt: str) -> tuple[int, dict[str, Any]]:
        with self._lock:
            self.calls[prompt] += 1
            seen = self.calls[prompt]
        word = prompt.split(" ", 1)[0]
        if word == "slow":
            time.sleep(SLOW_S)
        elif word == "hold" and seen == 1:
            self._released.wait(HOLD_LIMIT_S)
        elif word == "sleep":
            self._closing.wait(HOLD_LIMIT_S)
        if word == "fail" or (word == "flaky" and seen == 1):
            return 500, {"error": {"message": "the backend said no", "type": "server_error"}}
        return 200, {
            "id": f"chatcmpl-{seen}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": "counting",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": f"answer to {prompt}"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": 3, "total_tokens": 3},
        }

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        backend = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                return

            def _send(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._send(200, {"object": "list", "data": [{"id": "counting", "object": "model"}]})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length) or b"{}")
                messages = body.get("messages") or [{"content": ""}]
                self._send(*backend._call(str(messages[-1].get("content", ""))))

        return Handler

    def __enter__(self) -> CountingBackend:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._released.set()
        self._closing.set()
        self.server.shutdown()
        self.server.server_close()


def config_text(redis_url: str, backend: CountingBackend, **sections: dict[str, Any]) -> str:
    """A TOML config: the open_ai worker on `backend`, sharing through `redis_url`, plus `sections`.
    Redis commands get REDIS_TIMEOUT_MS."""
    tables: dict[str, dict[str, Any]] = {
        "distributed": {"redis_url": redis_url, "lock_ttl_ms": 1000, "timeout_ms": REDIS_TIMEOUT_MS},
        "stages.inference": {"worker": "open_ai", "base_url": backend.base_url, "model": "counting", "stream": False},
        "resilience": {"retry_attempts": 0, "circuit_breaker_threshold": 100},
    }
    for name, values in sections.items():
        tables.setdefault(name.replace("__", "."), {}).update(values)
    lines = []
    for name, values in tables.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


@contextmanager
def processes(count: int, config: str, workdir: Path) -> Iterator[list[HttpServer]]:
    """`count` orchestrator processes with the same config, each on its own port."""
    path = workdir / f"shared-{time.monotonic_ns()}.toml"
    path.write_text(config, encoding="utf-8")
    with ExitStack() as stack:
        yield [
            stack.enter_context(http_server("--config", str(path), workdir=workdir, env={"OPENAI_API_KEY": "sk-test"}))
            for _ in range(count)
        ]


def metric(server: HttpServer, name: str) -> float:
    """One unlabelled sample from the server's /metrics."""
    text = httpx2.get(f"{server.base_url}/metrics", timeout=10.0).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def wait_until(condition: Any, what: str) -> None:
    """Poll `condition()` until true (bounded: a bug fails the test instead of hanging it)."""
    deadline = time.monotonic() + WAIT_LIMIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {WAIT_LIMIT_S:g} s: {what}")
        time.sleep(0.02)


@dataclass
class Shared:
    redis: RedisServer
    backend: CountingBackend


@contextmanager
def shared_parts() -> Iterator[Shared]:
    with redis_server() as redis, CountingBackend() as backend:
        yield Shared(redis, backend)
