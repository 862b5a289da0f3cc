"""Configuration file and command line: help, version, errors that name the key, flags over file.

Most cases call `cli.main` in process (it returns before serving when the config is bad or
--check-config is given); the installed console script is run for the exit-code contract.
"""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path
from typing import Any

import pytest

from mcp_orchestrator import __version__
from mcp_orchestrator.cli import build_parser, main
from mcp_orchestrator.event_loop import backend_options
from tests.support_processes import DEFAULT_LOOP, python_module, run_cli, write_lines

EXIT_USAGE = 2


def run_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def resolved(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    code, out, err = run_main(capsys, *argv, "--check-config")
    assert code == 0, err
    settings: dict[str, Any] = json.loads(out)
    return settings


# ---------------------------------------------------------------------------- help and version

DOCUMENTED_FLAGS = [
    "--help",
    "--version",
    "--config",
    "--check-config",
    "--worker",
    "--model",
    "--delay-ms",
    "--concurrency",
    "--transport",
    "--host",
    "--port",
    "--allowed-host",
    "--allowed-origin",
    "--metrics-port",
    "--log-level",
    "--log-format",
]


def test_help_lists_every_flag() -> None:
    completed = run_cli("--help")
    assert completed.returncode == 0, completed.stderr
    every_flag = {option for action in build_parser()._actions for option in action.option_strings if "--" in option}
    assert set(DOCUMENTED_FLAGS) <= every_flag
    for flag in every_flag:
        assert flag in completed.stdout, f"{flag} missing from --help"
    assert "stdio" in completed.stdout and "http" in completed.stdout
    assert completed.stderr == ""


def test_version_from_the_console_script_and_python_m() -> None:
    script = run_cli("--version")
    module = python_module("--version")
    assert script.returncode == 0, script.stderr
    assert script.stdout.strip() == f"mcp-orchestrator {__version__}"
    assert module.returncode == 0, module.stderr
    assert module.stdout.strip() == f"mcp-orchestrator {__version__}"


def test_unknown_flag_is_a_usage_error() -> None:
    completed = run_cli("--wroker", "echo")
    assert completed.returncode == EXIT_USAGE
    assert "--wroker" in completed.stderr
    assert completed.stdout == ""


# ---------------------------------------------------------------------------- bad config files

BAD_FILES: list[tuple[str, list[str], list[str]]] = [
    (
        "unknown-key",
        ["[pipeline]", "default_deadline_mss = 5"],
        ["pipeline.default_deadline_mss", "unknown key", "did you mean 'default_deadline_ms'"],
    ),
    ("unknown-section", ["[stagez.rag]", "enabled = true"], ["stagez", "unknown key", "did you mean 'stages'"]),
    (
        "wrong-type",
        ["[stages.inference]", 'concurrency = "many"'],
        ["stages.inference.concurrency", "valid integer", '(got "many")'],
    ),
    ("bad-value", ["[stages.rag]", "channel_capacity = 0"], ["stages.rag.channel_capacity", "greater than 0", "0"]),
    (
        "bad-enum",
        ["[observability]", 'log_level = "loud"'],
        ["observability.log_level", "'debug', 'info', 'warning' or 'error'", '(got "loud")'],
    ),
    (
        "inference-disabled",
        ["[stages.inference]", "enabled = false"],
        ["stages.inference", "cannot be disabled"],
    ),
    ("section-not-a-table", ["pipeline = 3"], ["pipeline", "3"]),
    ("invalid-toml", ["[pipeline", "name = 'x'"], ["invalid TOML"]),
    ("unknown-worker", ["[stages.inference]", 'worker = "gpt-9000"'], ["stages.inference", "gpt-9000", "echo"]),
    # URLs that split but cannot be connected to crashed the start (or a SIGHUP reload) with a traceback.
    *(
        (
            f"base-url-{name}",
            ["[stages.inference]", 'worker = "llama_cpp"', f'base_url = "{url}"'],
            ["stages.inference.base_url", "is not a URL a client can use", "1 to 65535"],
        )
        for name, url in [
            ("port-text", "http://127.0.0.1:abc"),
            ("port-range", "http://h:99999"),
            ("ipv6", "http://[::1"),
        ]
    ),
    *(
        (
            f"base-url-host-{name}",
            ["[stages.inference]", 'worker = "llama_cpp"', f"base_url = {json.dumps(url)}"],
            ["stages.inference.base_url", "has a host a client cannot use"],
        )
        for name, url in [
            ("snowman", "http://ex\u2603.com"),
            ("empty-label", "http://a..b:80"),
            ("space", "http://a b:80"),
        ]
    ),
    (
        "base-url-credentials",
        ["[stages.inference]", 'worker = "llama_cpp"', 'base_url = "http://me:pw@127.0.0.1:8080"'],
        ["stages.inference.base_url", "must not carry a user name or password", "[redacted]"],
    ),
    *(
        (
            f"allowed-host-{name}",
            ["[server]", f"allowed_hosts = [{json.dumps(entry)}]"],
            ["server.allowed_hosts.0", "must be a Host header value"],
        )
        for name, entry in [("empty", ""), ("space", "a b"), ("path", "box.lan/mcp"), ("port", "box.lan:70000")]
    ),
    *(
        (
            f"allowed-origin-{name}",
            ["[server]", f"allowed_origins = [{json.dumps(entry)}]"],
            ["server.allowed_origins.0", "must be an Origin header value"],
        )
        for name, entry in [("bare", "notanorigin"), ("empty", ""), ("path", "https://app.example/x")]
    ),
    *(
        (f"bind-host-{name}", ["[server]", f"host = {json.dumps(host)}"], ["server.host", "IPv6 without brackets"])
        for name, host in [("empty", ""), ("brackets", "[::]"), ("empty-label", "a..b"), ("ipv4-scope", "127.0.0.1%lo")]
    ),
    (
        "http-timeout-inf",
        ["[stages.inference.http]", "read_timeout_s = inf"],
        ["stages.inference.http.read_timeout_s", "finite number"],
    ),
    (
        "default-deadline-over-max",
        ["[pipeline]", "default_deadline_ms = 700000"],
        ["bad.toml: pipeline.max_deadline_ms", "default_deadline_ms (700000) must not be greater than max_deadline_ms"],
    ),
    (
        "concurrency-huge",
        ["[stages.inference]", "concurrency = 1000000"],
        ["stages.inference.concurrency", "less than or equal to 10000"],
    ),
    (
        "redis-url-option",
        ["[distributed]", 'redis_url = "redis://127.0.0.1:6379/0?socket_timeout=abc"'],
        ["distributed.redis_url", "redis-py cannot use it: Invalid value for 'socket_timeout'"],
    ),
    (
        "redis-url-port",
        ["[distributed]", 'redis_url = "redis://u:pw@127.0.0.1:notaport/0"'],
        ["distributed.redis_url", "is not a URL a client can use"],
    ),
]


@pytest.mark.parametrize(
    ("lines", "fragments"), [(lines, f) for _, lines, f in BAD_FILES], ids=[n for n, _, _ in BAD_FILES]
)
def test_bad_config_file_exits_with_one_line_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], lines: list[str], fragments: list[str]
) -> None:
    path = write_lines(tmp_path / "bad.toml", lines)
    code, out, err = run_main(capsys, "--config", str(path))
    assert code == EXIT_USAGE
    assert out == ""
    (line,) = error_lines(err)
    assert line.startswith("mcp-orchestrator: ")
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} missing from {line!r}"


def test_every_problem_of_a_file_gets_its_own_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_lines(
        tmp_path / "many.toml",
        [
            "[pipeline]",
            "dead_letter_capacity = -1",
            "[stages.assemble]",
            "channel_capacity = 'lots'",
            "[rate_limits]",
            "enabeld = true",
        ],
    )
    code, _, err = run_main(capsys, "--config", str(path))
    lines = error_lines(err)
    assert code == EXIT_USAGE
    assert len(lines) == 3, lines
    assert any("pipeline.dead_letter_capacity" in line for line in lines)
    assert any("stages.assemble.channel_capacity" in line for line in lines)
    assert any("rate_limits.enabeld" in line and "did you mean 'enabled'" in line for line in lines)
    assert all(str(path) in line for line in lines)


def test_a_bad_url_in_a_providers_variable_is_named_when_it_is_used(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLAMA_CPP_URL", "http://127.0.0.1:abc")
    code, out, err = run_main(capsys, "--worker", "llama_cpp", "--check-config")
    assert (code, out) == (EXIT_USAGE, "")
    (line,) = error_lines(err)
    assert "stages.inference.base_url: unset, and the environment variable LLAMA_CPP_URL is not a URL" in line
    code, _, err = run_main(capsys, "--worker", "llama_cpp", "--base-url", "http://127.0.0.1:8080", "--check-config")
    assert code == 0, err  # base_url set: the variable is not used


def test_a_pair_out_of_order_is_named_along_with_the_other_problems(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A pair of keys checked together was reported only once the section's other errors were fixed."""
    lines = ["[resilience]", "retry_attempts = 21", "retry_base_ms = 6000", "retry_max_ms = 5000"]
    path = write_lines(tmp_path / "pairs.toml", [*lines, "[tasks]", "max_open = 10", "max_open_per_caller = 20"])
    code, _, err = run_main(capsys, "--config", str(path))
    assert code == EXIT_USAGE
    found = [line.split(": ")[2] for line in error_lines(err)]
    assert found == ["resilience.retry_attempts", "resilience.retry_max_ms", "tasks.max_open_per_caller"], err
    assert "retry_base_ms (6000) must not be greater than retry_max_ms (5000)" in err
    assert "max_open_per_caller (20) must not be greater than max_open (10)" in err


def test_an_unusable_redis_url_variable_is_named_without_its_password(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://:TOPSECRET@localhost:99999/0")
    code, out, err = run_main(capsys, "--check-config")
    assert (code, out) == (EXIT_USAGE, "")
    (line,) = error_lines(err)
    assert line.startswith("mcp-orchestrator: environment: REDIS_URL: is not a URL a client can use"), line
    assert "TOPSECRET" not in line


def test_missing_config_file_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nowhere.toml"
    code, _, err = run_main(capsys, "--config", str(missing))
    assert code == EXIT_USAGE
    (line,) = error_lines(err)
    assert str(missing) in line
    assert "not found" in line


def test_console_script_exits_non_zero_on_a_bad_file(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "bad.toml", ["[stages.inference]", "concurrency = 0", "temprature = 0.2"])
    completed = run_cli("--config", str(path))
    assert completed.returncode == EXIT_USAGE
    assert completed.stdout == ""
    lines = error_lines(completed.stderr)
    assert len(lines) == 2, lines
    assert any("stages.inference.concurrency" in line for line in lines)
    assert any("stages.inference.temprature" in line and "did you mean 'temperature'" in line for line in lines)


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (["--concurrency", "0"], ["--concurrency", "greater than or equal to 1"]),
        (["--port", "70000"], ["--port", "65535"]),
        (["--delay-ms", "-1"], ["--delay-ms", "greater than or equal to 0"]),
        (["--worker", "gpt-9000"], ["gpt-9000", "echo"]),
        (
            ["--oauth-issuer", "https://me:pw@idp.test", "--oauth-audience", "https://m.test/mcp"],
            ["--oauth-issuer", "must not carry a user name or password"],
        ),
        (
            ["--oauth-issuer", "https://idp.test", "--oauth-audience", "https://m.test:abc/mcp"],
            ["--oauth-audience", "is not a URL a client can use"],
        ),
    ],
)
def test_bad_flag_values_are_named(capsys: pytest.CaptureFixture[str], argv: list[str], fragments: list[str]) -> None:
    code, out, err = run_main(capsys, *argv)
    assert code == EXIT_USAGE
    assert out == ""
    (line,) = error_lines(err)
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} missing from {line!r}"


def test_loop_uvloop_is_refused_when_it_cannot_be_imported(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # what an install without uvloop looks like to import
    code, out, err = run_main(capsys, "--loop", "uvloop", "--check-config")
    assert (code, out) == (EXIT_USAGE, "")
    (line,) = error_lines(err)
    assert "--loop (server.event_loop)" in line and "uvloop cannot be imported" in line, line
    config = write_lines(tmp_path / "loop.toml", ["[server]", 'event_loop = "uvloop"'])
    code, out, err = run_main(capsys, "--config", str(config), "--check-config")
    assert (code, out) == (EXIT_USAGE, "")
    (line,) = error_lines(err)
    assert "server.event_loop" in line and "choose asyncio" in line, line
    code, out, _ = run_main(capsys, "--loop", "auto", "--check-config")  # auto falls back to asyncio
    assert code == 0 and json.loads(out)["server"]["event_loop"] == "auto"
    assert backend_options("auto") == {"use_uvloop": False}
    monkeypatch.undo()
    assert backend_options("auto") == {"use_uvloop": DEFAULT_LOOP == "uvloop"}


UNUSED_PARAMETERS = [
    ("echo", ['worker = "echo"', 'stop = ["STOP"]', "seed = 7", "max_tokens = 10"], ["seed", "stop"], "'echo'"),
    ("anthropic", ['worker = "anthropic"', "seed = 7", "temperature = 0.2"], ["seed"], "'anthropic'"),
    (
        "pool-of-echo",
        ['worker = "pool"', "top_p = 0.5", "[[stages.inference.replicas]]", 'kind = "echo"'],
        ["top_p"],
        "'echo'",
    ),
    (
        "fallback-one-uses-it",
        [
            'worker = "fallback"',
            "seed = 7",
            "[[stages.inference.members]]",
            'kind = "anthropic"',
            "[[stages.inference.members]]",
            'kind = "open_ai"',
            'base_url = "http://127.0.0.1:9"',
        ],
        [],
        "",
    ),
    ("open_ai", ['worker = "open_ai"', 'base_url = "http://127.0.0.1:9"', 'stop = ["x"]', "seed = 1"], [], ""),
]


@pytest.mark.parametrize(
    ("lines", "unused", "kinds"), [case[1:] for case in UNUSED_PARAMETERS], ids=[c[0] for c in UNUSED_PARAMETERS]
)
def test_a_parameter_no_backend_uses_is_accepted_with_a_warning(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, lines: list[str], unused: list[str], kinds: str
) -> None:
    """A parameter default a kind has no use for is kept (a worker configure_worker swaps in
    gets it) but said, so that nobody expects it to act on the configured worker."""
    config = write_lines(tmp_path / "params.toml", ["[stages.inference]", *lines])
    code, out, err = run_main(capsys, "--config", str(config), "--check-config")
    assert code == 0, err
    assert json.loads(out)["stages"]["inference"]["worker"] == lines[0].split('"')[1]
    warnings = error_lines(err)
    assert [line.split(" is set")[0] for line in warnings] == [
        f"mcp-orchestrator: warning: stages.inference.{name}" for name in unused
    ]
    for line in warnings:
        assert f"worker kind {kinds}" in line and "configure_worker swaps in" in line, line


# ---------------------------------------------------------------------------- resolution


def test_check_config_prints_the_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    settings = resolved(capsys)
    assert settings["server"]["transport"] == "stdio"
    assert settings["server"]["host"] == "127.0.0.1"
    assert settings["stages"]["inference"]["worker"] == "echo"
    capacities = [settings["stages"][name]["channel_capacity"] for name in ("rag", "assemble", "inference")]
    assert capacities == [512, 512, 1024]
    assert settings["stages"]["post_process"]["channel_capacity"] == 512
    assert settings["stages"]["stream"]["channel_capacity"] == 256
    assert settings["stages"]["inference"]["concurrency"] == 64
    assert settings["pipeline"]["dead_letter_capacity"] == 1000


def test_flags_override_the_file_and_the_rest_of_the_file_stays(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_lines(
        tmp_path / "settings.toml",
        [
            "[stages.inference]",
            'model = "from-file"',
            "concurrency = 5",
            "channel_capacity = 33",
            "[server]",
            "port = 9000",
            'allowed_hosts = ["file.example"]',
            "[observability]",
            'log_level = "error"',
        ],
    )
    settings = resolved(
        capsys,
        "--config",
        str(path),
        "--model",
        "from-flag",
        "--port",
        "9100",
        "--allowed-host",
        "flag.example",
        "--log-level",
        "debug",
    )
    inference = settings["stages"]["inference"]
    assert inference["model"] == "from-flag"
    assert inference["concurrency"] == 5
    assert inference["channel_capacity"] == 33
    assert settings["server"]["port"] == 9100
    assert settings["server"]["allowed_hosts"] == ["file.example", "flag.example"]
    assert settings["observability"]["log_level"] == "debug"


def test_check_config_through_the_console_script(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "ok.toml", ["[pipeline]", "max_prompt_chars = 1234"])
    completed = run_cli("--config", str(path), "--concurrency", "3", "--check-config")
    assert completed.returncode == 0, completed.stderr
    settings = json.loads(completed.stdout)
    assert settings["pipeline"]["max_prompt_chars"] == 1234
    assert settings["stages"]["inference"]["concurrency"] == 3


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("allowed_hosts", "my_server:8000"),
        ("allowed_hosts", "[::1]:8000"),
        ("allowed_origins", "vscode-webview://abc123"),
        ("allowed_origins", "http://my_app:3000"),
        ("host", "::"),
        ("host", "my_server"),
    ],
)
def test_real_world_addresses_are_accepted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], key: str, value: str
) -> None:
    entry = json.dumps(value) if key == "host" else json.dumps([value])
    path = write_lines(tmp_path / "addr.toml", ["[server]", f"{key} = {entry}"])
    settings = resolved(capsys, "--config", str(path))
    assert settings["server"][key] == (value if key == "host" else [value])


def test_a_bad_entry_of_the_file_is_the_files_even_when_a_flag_adds_to_the_list(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_lines(tmp_path / "hosts.toml", ["[server]", 'allowed_hosts = ["bad host"]'])
    code, _, err = run_main(capsys, "--config", str(path), "--allowed-host", "good.lan")
    assert code == EXIT_USAGE
    (line,) = error_lines(err)
    assert line.startswith(f"mcp-orchestrator: {path}: server.allowed_hosts.0: must be a Host header value"), line


def test_non_loopback_host_needs_allowed_hosts(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(capsys, "--transport", "http", "--host", "0.0.0.0", "--check-config")
    assert code == EXIT_USAGE
    assert out == ""
    (line,) = error_lines(err)
    assert "0.0.0.0" in line
    assert "loopback" in line
    assert "--allowed-host" in line and "server.allowed_hosts" in line  # the file's key too
    code, _, err = run_main(capsys, "--transport", "http", "--host", "0.0.0.0", "--allowed-host", "", "--check-config")
    assert code == EXIT_USAGE and "--allowed-host (server.allowed_hosts.0)" in err  # no empty name passes the rule

    flags = ("--transport", "http", "--host", "0.0.0.0", "--allowed-host", "box.lan", "--insecure-no-auth")
    settings = resolved(capsys, *flags)
    assert settings["server"]["host"] == "0.0.0.0"
    assert settings["server"]["allowed_hosts"] == ["box.lan"]


STRONG_TOKEN = "Zq7rX2pLm9WvK4tN8sB3yH6c"


def test_a_non_loopback_host_without_authentication_is_refused(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Anyone who reaches the port could spend the operator's API keys: a token, or the explicit
    --insecure-no-auth (warned at every start), is required before anything binds."""
    monkeypatch.delenv("MCP_ORCHESTRATOR_TOKEN", raising=False)
    flags = ("--transport", "http", "--host", "0.0.0.0", "--allowed-host", "box.lan")
    code, out, err = run_main(capsys, *flags, "--check-config")
    assert (code, out) == (EXIT_USAGE, "")
    (line,) = error_lines(err)
    assert "no authentication is set" in line
    assert "MCP_ORCHESTRATOR_TOKEN" in line and "--insecure-no-auth" in line
    monkeypatch.setenv("MCP_ORCHESTRATOR_TOKEN", STRONG_TOKEN)
    assert resolved(capsys, *flags)["server"]["host"] == "0.0.0.0"


@pytest.mark.parametrize(
    ("token", "why"),
    [
        ("short-token", "it has 11 characters, at least 16 are needed"),
        ("changeme", "it has 8 characters"),
        ("your-token-here", "at least 16"),
        ("aaaaaaaaaaaaaaaaaaaaaaaa", "a placeholder"),
        ("abababababababababababab", "a placeholder"),
    ],
)
def test_a_weak_token_is_refused_without_being_shown(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, token: str, why: str
) -> None:
    monkeypatch.setenv("MCP_ORCHESTRATOR_TOKEN", token)
    code, out, err = run_main(capsys, "--transport", "http", "--check-config")
    assert (code, out) == (EXIT_USAGE, "")
    (line,) = error_lines(err)
    assert "MCP_ORCHESTRATOR_TOKEN is too weak" in line and why in line
    assert token not in line


def test_non_loopback_refusal_from_the_console_script() -> None:
    completed = run_cli("--transport", "http", "--host", "192.0.2.10", "--port", "0")
    assert completed.returncode == EXIT_USAGE
    assert "--allowed-host" in completed.stderr
    assert completed.stdout == ""


def test_metrics_port_on_a_non_loopback_host_needs_allowed_hosts(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(capsys, "--metrics-port", "9464", "--host", "0.0.0.0", "--check-config")
    assert code == EXIT_USAGE
    assert out == ""
    assert "--allowed-host" in err


def test_a_taken_port_is_one_clear_line_and_exit_1() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        completed = run_cli("--transport", "http", "--port", str(port))
    assert completed.returncode == 1
    assert completed.stderr.strip() == (
        f"mcp-orchestrator: cannot listen on 127.0.0.1:{port}: Address already in use (--port / server.port)"
    )
    assert completed.stdout == ""
