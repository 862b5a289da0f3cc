"""Command line: parse flags, load config, run the server on stdio or streamable HTTP."""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import anyio

from mcp_orchestrator import __version__
from mcp_orchestrator.config import Config, load_config, with_values
from mcp_orchestrator.errors import BindError, ConfigError, Problem
from mcp_orchestrator.event_loop import backend_options, running_loop
from mcp_orchestrator.logs import configure_logging
from mcp_orchestrator.security import redact
from mcp_orchestrator.workers.registry import kinds

if TYPE_CHECKING:  # imported when serving only, so that --help and config errors stay fast
    import uvicorn

    from mcp_orchestrator.shutdown import Shutdown

log = logging.getLogger("mcp_orchestrator")

EXIT_USAGE = 2
EXIT_FAILURE = 1
STOP_TIMEOUT_S = 5.0


EPILOG = """examples:
  mcp-orchestrator                                   echo worker over stdio (what Claude Desktop starts)
  mcp-orchestrator --worker llama_cpp --base-url http://127.0.0.1:8080
  mcp-orchestrator --config examples/openai.toml --transport http --port 8000
  mcp-orchestrator --check-config --config my.toml    validate, print the resolved settings, exit
  mcp-orchestrator --config team.toml --transport http --workers 4   4 processes on one port (needs redis_url)

environment:
  OPENAI_API_KEY, ANTHROPIC_API_KEY     API keys (never accepted from a tool call)
  OPENAI_BASE_URL, ANTHROPIC_BASE_URL, LLAMA_CPP_URL, VLLM_URL   where the backends are
  MCP_ORCHESTRATOR_TOKEN                HTTP mode: require "Authorization: Bearer <token>" (at least
                                        16 characters; required for a non-loopback --host)

signals:
  SIGHUP reloads the --config file (flags still apply on top); a bad file keeps the running config.
  SIGTERM or SIGINT drains: no new work, calls in flight get [server] shutdown_grace_s (default 10 s)
  to finish, the rest are answered with an error, then exit 0. A second signal ends the grace at once.

every key, tool and argument: docs/ in the repository (configuration.md, tools.md)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mcp-orchestrator",
        description="An MCP server that runs prompts through a production LLM pipeline "
        "(RAG -> assemble -> inference -> post-process -> stream). Flags override the config file.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"mcp-orchestrator {__version__}")
    parser.add_argument("--config", metavar="FILE", help="TOML config file (every key: docs/configuration.md)")
    parser.add_argument(
        "--check-config",
        action="store_true",
        help="validate the configuration (file plus flags), print the resolved settings as JSON and exit",
    )
    parser.add_argument(
        "--worker",
        metavar="KIND",
        help=f"inference worker: {', '.join(kinds())} (default echo). open_ai reads OPENAI_API_KEY "
        "(OPENAI_BASE_URL), anthropic ANTHROPIC_API_KEY, llama_cpp LLAMA_CPP_URL (default http://localhost:8080), "
        "vllm VLLM_URL (default http://localhost:8000); pool and fallback need a config file",
    )
    parser.add_argument("--model", help="model name for the worker")
    parser.add_argument(
        "--base-url", metavar="URL", help="HTTP workers: backend URL (overrides the environment variable)"
    )
    parser.add_argument("--delay-ms", type=int, metavar="MS", help="echo worker: simulated latency in ms")
    parser.add_argument(
        "--concurrency", type=int, metavar="N", help="requests the inference stage runs at once (default 64)"
    )
    parser.add_argument(
        "--transport", choices=["stdio", "http"], help="stdio (default, for Claude Desktop/Code) or streamable HTTP"
    )
    parser.add_argument(
        "--loop", choices=["auto", "asyncio", "uvloop"], help="event loop (default auto: uvloop when installed)"
    )
    parser.add_argument("--host", help="HTTP bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="HTTP port (default 8000; 0 picks a free one, shown on stderr)")
    parser.add_argument(
        "--allowed-host",
        action="append",
        metavar="NAME",
        help="extra Host header value accepted over HTTP (repeatable); required when --host is not loopback",
    )
    parser.add_argument(
        "--allowed-origin", action="append", metavar="ORIGIN", help="extra Origin accepted over HTTP (repeatable)"
    )
    parser.add_argument("--metrics-port", type=int, metavar="PORT", help="also serve Prometheus /metrics on this port")
    parser.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="HTTP: serve with N processes on one port, each restarted if it dies (default 1; "
        "N > 1 needs [distributed] redis_url; worker i serves --metrics-port + i)",
    )
    parser.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="serve a non-loopback --host without a bearer token (closed networks only; warned at every start)",
    )
    parser.add_argument(
        "--oauth-issuer",
        metavar="URL",
        help="HTTP: accept OAuth access tokens (JWT) from this authorization server (needs --oauth-audience)",
    )
    parser.add_argument(
        "--oauth-audience", metavar="URL", help="HTTP with OAuth: this server's public MCP URL, tokens' aud"
    )
    parser.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], help="stderr log level (default warning)"
    )
    parser.add_argument("--log-format", choices=["pretty", "json"], help="stderr log format (default pretty)")
    return parser


def resolve_config(args: argparse.Namespace) -> Config:
    """The file's settings with the flags on top, validated as one."""
    config = load_config(args.config)
    overrides: dict[str, Any] = {}
    for key, flag in FLAG_FOR_KEY.items():
        value = getattr(args, _dest(flag))
        if value is None:
            continue
        if key in APPENDED_KEYS:
            section, name = key.split(".")
            value = getattr(getattr(config, section), name) + value  # repeated flags add to the file's list
        overrides[key] = value
    return with_values(config, overrides, "command line")


def _where(source: str, problem: Problem, args: argparse.Namespace) -> str:
    """A problem with where it comes from: the file, or the flag that set the key."""
    flag = _flag_for(problem.key)
    # A flag replaces the file's value, so a problem with that key is the flag's; except for the
    # keys whose flags add to the file's list: the file's entries are checked (and named) first.
    replaced = flag is not None and getattr(args, _dest(flag)) is not None and flag not in APPENDING_FLAGS
    if source == "command line" or replaced:
        return f"command line: {_name_flag(problem)}"
    if source in ("worker", "config"):  # checked after loading: the key came from the file
        source = args.config or "command line"
    return f"{source}: {problem}"


def _dest(flag: str) -> str:
    return flag.removeprefix("--").replace("-", "_")


def _name_flag(problem: Problem) -> Problem:
    """Say '--concurrency (stages.inference.concurrency)' rather than the key alone for a bad flag value."""
    flag = _flag_for(problem.key)
    return problem if flag is None else Problem(f"{flag} ({problem.key})", problem.message)


def _flag_for(key: str) -> str | None:
    """The flag that sets `key`, or one item of it (server.allowed_hosts.0: --allowed-host)."""
    head, _, last = key.rpartition(".")
    return FLAG_FOR_KEY.get(key) or (FLAG_FOR_KEY.get(head) if last.isdigit() else None)


# The config key each flag sets; the flag's argparse dest is its name without dashes.
FLAG_FOR_KEY = {
    "stages.inference.worker": "--worker",
    "stages.inference.model": "--model",
    "stages.inference.base_url": "--base-url",
    "stages.inference.delay_ms": "--delay-ms",
    "stages.inference.concurrency": "--concurrency",
    "server.transport": "--transport",
    "server.event_loop": "--loop",
    "server.host": "--host",
    "server.port": "--port",
    "server.allowed_hosts": "--allowed-host",
    "server.allowed_origins": "--allowed-origin",
    "server.oauth_issuer": "--oauth-issuer",
    "server.oauth_audience": "--oauth-audience",
    "observability.metrics_port": "--metrics-port",
    "observability.log_level": "--log-level",
    "observability.log_format": "--log-format",
}
APPENDED_KEYS = frozenset({"server.allowed_hosts", "server.allowed_origins"})
APPENDING_FLAGS = frozenset(FLAG_FOR_KEY[key] for key in APPENDED_KEYS)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = resolve_config(args)
        # Imported late so that --help and config errors stay fast.
        from mcp_orchestrator.orchestrator import Orchestrator, unused_parameter_warnings, worker_from_config
        from mcp_orchestrator.pipeline.context import load_context_source

        worker_from_config(config)  # the worker and the context source are checked before anything starts
        config.distributed.url(os.environ)  # and REDIS_URL, when it is the one in effect
        if config.stages.rag.source is not None:
            load_context_source(config.stages.rag.source)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"mcp-orchestrator: {_where(exc.source, problem, args)}", file=sys.stderr)
        return EXIT_USAGE
    serves_http = config.server.transport == "http" or config.observability.metrics_port is not None
    if serves_http:  # checked before --check-config, which must not approve a refused bind
        from mcp_orchestrator.server.http import auth_refusal, security_settings

        try:
            security_settings(config.server.host, config.server.allowed_hosts, config.server.allowed_origins)
        except BindError as exc:
            print(f"mcp-orchestrator: {exc}", file=sys.stderr)
            return EXIT_USAGE
        token_env = config.server.auth_token_env
        token, oauth = os.environ.get(token_env) or None, config.server.oauth_issuer is not None
        refusal = auth_refusal(config.server.host, token, token_env, args.insecure_no_auth, oauth)
        if refusal is not None:
            print(f"mcp-orchestrator: {refusal}", file=sys.stderr)
            return EXIT_USAGE
    from mcp_orchestrator import supervisor

    workers = 1 if args.workers is None else args.workers
    if (refused := supervisor.refusal(workers, config)) is not None:
        print(f"mcp-orchestrator: {refused}", file=sys.stderr)
        return EXIT_USAGE
    warnings = unused_parameter_warnings(config)
    if args.check_config:
        for warning in warnings:
            print(f"mcp-orchestrator: warning: {warning}", file=sys.stderr)
        print(json.dumps(redact(config.model_dump(mode="json")), indent=2))
        return 0

    configure_logging(config.observability.log_level, config.observability.log_format)
    for warning in warnings:
        log.warning("%s", warning)
    unauthenticated = not os.environ.get(config.server.auth_token_env) and config.server.oauth_issuer is None
    if serves_http and args.insecure_no_auth and unauthenticated:
        log.warning(
            "--insecure-no-auth: serving HTTP on %s without authentication; anyone who reaches the port can "
            "use the server and its API keys",
            config.server.host,
        )
    # SIGHUP reloads the file, with the same flags on top (flags still win).
    reload_from = functools.partial(resolve_config, args) if args.config else None
    slot = supervisor.inherited() if workers > 1 else None  # this process is one of a supervisor's workers
    if workers > 1 and slot is None:
        return _supervise(list(sys.argv[1:] if argv is None else argv), workers, config)
    listener = metrics_listener = None
    try:
        # Bound before anything starts, so a taken port is one clear line, not a traceback.
        if slot is not None:
            listener, metrics_listener = slot.listener(), slot.metrics_listener()
        elif config.server.transport == "http":
            listener = _bind(config.server.host, config.server.port, "--port / server.port")
        if config.observability.metrics_port is not None and slot is None:
            where = "--metrics-port / observability.metrics_port"
            metrics_listener = _bind(config.server.host, config.observability.metrics_port, where)
    except _CannotListen as exc:
        print(f"mcp-orchestrator: {exc}", file=sys.stderr)
        for sock in (listener, metrics_listener):
            if sock is not None:
                sock.close()
        return EXIT_FAILURE
    try:
        anyio.run(
            serve,
            Orchestrator(config),
            reload_from,
            args.config,
            listener,
            metrics_listener,
            backend_options=backend_options(config.server.event_loop),
        )
    except KeyboardInterrupt:
        pass
    finally:
        for sock in (listener, metrics_listener):
            if sock is not None:
                sock.close()
    return 0


class _CannotListen(Exception):
    pass


def _bind(host: str, port: int, setting: str) -> socket.socket:
    try:
        return _listening_socket(host, port)
    except OSError as exc:
        raise _CannotListen(f"cannot listen on {host}:{port}: {exc.strerror or exc} ({setting})") from None


def _supervise(argv: list[str], workers: int, config: Config) -> int:
    """`--workers N`: bind the port (and worker i's metrics port, metrics_port + i) once, then
    run the supervisor, which serves it with N worker processes (supervisor.py)."""
    from mcp_orchestrator.supervisor import Supervisor, session_warning

    if (warning := session_warning(workers, config)) is not None:
        log.warning("%s", warning)
    host, metrics_port = config.server.host, config.observability.metrics_port
    sockets: list[socket.socket] = []
    try:
        sockets.append(_bind(host, config.server.port, "--port / server.port"))
        if metrics_port is not None:
            for index in range(workers):
                where = f"--metrics-port / observability.metrics_port, + {index} for worker {index}"
                sockets.append(_bind(host, metrics_port + index, where))
    except _CannotListen as exc:
        print(f"mcp-orchestrator: {exc}", file=sys.stderr)
        for sock in sockets:
            sock.close()
        return EXIT_FAILURE
    port = sockets[0].getsockname()[1]
    shown_host = f"[{host}]" if ":" in host else host
    print(
        f"mcp-orchestrator {__version__}: supervisor (pid {os.getpid()}) serving http://{shown_host}:{port} "
        f"with {workers} worker processes",
        file=sys.stderr,
        flush=True,
    )
    try:
        return Supervisor(argv, workers, sockets[0], sockets[1:], config.server.shutdown_grace_s).run()
    finally:
        for sock in sockets:
            sock.close()


async def serve(
    orchestrator: Any,
    reload_from: Callable[[], Config] | None = None,
    source: str | None = None,
    listener: socket.socket | None = None,
    metrics_listener: socket.socket | None = None,
) -> None:
    """Run the server until it stops. For HTTP, `listener` is the bound socket (bound here
    when not given); `metrics_listener` likewise for `metrics_port`."""
    from mcp_orchestrator.server.draining import StdioEdge
    from mcp_orchestrator.server.stdio import serve_stdio
    from mcp_orchestrator.shutdown import Shutdown

    config: Config = orchestrator.config
    log.debug("event loop: %s (server.event_loop %s)", running_loop(), config.server.event_loop)
    metrics = None
    metrics_done = anyio.Event()
    async with orchestrator, anyio.create_task_group() as tg:
        shutdown = Shutdown(orchestrator.pipeline, config.server.shutdown_grace_s, orchestrator.jobs)
        if sys.platform != "win32":  # before anything is served: from now on SIGTERM drains
            await tg.start(shutdown.on_signals)
        if config.observability.metrics_port is not None:
            sock = metrics_listener or _listening_socket(config.server.host, config.observability.metrics_port)
            metrics = _metrics_server(orchestrator)
            tg.start_soon(_serve_on, metrics, sock, metrics_done)
        if reload_from is not None and hasattr(signal, "SIGHUP"):
            from mcp_orchestrator.reload import reload_on_sighup

            tg.start_soon(reload_on_sighup, orchestrator, reload_from, source or "config")
        if config.server.transport == "stdio":
            log.info("serving MCP over stdio with worker %s", orchestrator.pipeline.worker.describe())
            await serve_stdio(orchestrator.server, config.server.max_message_bytes, edge=StdioEdge(shutdown))
        else:
            await _serve_http(orchestrator, shutdown, listener)
        if metrics is not None:  # asked to stop, not cancelled: uvicorn logs a traceback when cancelled
            metrics.should_exit = True
            with anyio.move_on_after(STOP_TIMEOUT_S):
                await metrics_done.wait()
        tg.cancel_scope.cancel()


async def _serve_http(orchestrator: Any, shutdown: Shutdown, listener: socket.socket | None = None) -> None:
    import uvicorn

    from mcp_orchestrator.server.draining import DrainGate, Uvicorn
    from mcp_orchestrator.server.http import HTTP_PROTOCOL, MCP_PATH, build_http_app

    server_config = orchestrator.config.server
    token = os.environ.get(server_config.auth_token_env) or None
    app = build_http_app(
        orchestrator, server_config.host, server_config.allowed_hosts, server_config.allowed_origins, token
    )
    # Outermost: counts what is in flight, refuses new work once stopping.
    app = DrainGate(app, shutdown, MCP_PATH, server_config.max_message_bytes)
    uv_config = uvicorn.Config(
        app,
        host=server_config.host,
        port=server_config.port,
        log_config=None,
        log_level=orchestrator.config.observability.log_level,
        access_log=False,
        lifespan="on",
        http=HTTP_PROTOCOL,
        timeout_graceful_shutdown=int(STOP_TIMEOUT_S),  # once drained: GET streams (ended at once), late requests
    )
    # Bound by us rather than by uvicorn so the banner shows the real port (`--port 0` picks one).
    sock = listener or _listening_socket(server_config.host, server_config.port)
    port = sock.getsockname()[1]
    shown_host = f"[{server_config.host}]" if ":" in server_config.host else server_config.host
    print(
        f"mcp-orchestrator {__version__}: MCP at http://{shown_host}:{port}{MCP_PATH} "
        f"(also /healthz, /metrics){' with bearer token' if token else ''}"
        f"{f' with OAuth tokens from {server_config.oauth_issuer}' if orchestrator.oauth else ''}",
        file=sys.stderr,
        flush=True,
    )
    server = Uvicorn(uv_config)
    async with anyio.create_task_group() as tg:
        tg.start_soon(_exit_when_drained, server, shutdown.drained)
        with sock:
            await server.serve(sockets=[sock])
        tg.cancel_scope.cancel()


async def _exit_when_drained(server: uvicorn.Server, drained: anyio.Event) -> None:
    """uvicorn is asked to stop (not cancelled) once every call in flight is answered."""
    await drained.wait()
    server.should_exit = True


def _listening_socket(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[
        0
    ]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except BaseException:
        sock.close()
        raise
    return sock


def _metrics_server(orchestrator: Any) -> Any:
    """A uvicorn server for /metrics on its own port (stdio mode has no other way to show them)."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from mcp_orchestrator.server.draining import Uvicorn
    from mcp_orchestrator.server.http import HEALTH_PATH, MCP_PATH, PROMETHEUS_CONTENT_TYPE, Guard, security_settings
    from mcp_orchestrator.server.oauth import protect

    async def metrics(request: Request) -> PlainTextResponse:
        return PlainTextResponse(orchestrator.pipeline.metrics.render(), media_type=PROMETHEUS_CONTENT_TYPE)

    server_config = orchestrator.config.server
    # The same Host/Origin checks and optional bearer token as the main HTTP endpoints.
    settings = security_settings(server_config.host, server_config.allowed_hosts, server_config.allowed_origins)
    token = os.environ.get(server_config.auth_token_env) or None
    routes = Starlette(routes=[Route("/metrics", metrics)])
    app = Guard(protect(routes, orchestrator.oauth, MCP_PATH, HEALTH_PATH), settings, token)
    return Uvicorn(uvicorn.Config(app, log_config=None, access_log=False, lifespan="off"))


async def _serve_on(server: Any, sock: socket.socket, done: anyio.Event) -> None:
    try:
        await server.serve(sockets=[sock])
    finally:
        done.set()
