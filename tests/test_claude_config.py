"""scripts/claude-config.sh, as the README's "Connect Claude" runs it: the printed set-up names the
server and a --config file by absolute path (Claude starts the server from a directory of its own),
and arguments the server refuses print its error and no set-up.

The script runs in a stand-in checkout whose .venv holds this test's Python and the installed
console script, so nothing is installed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support_processes import CLI_TIMEOUT_S, SCRIPT, child_env

ROOT = Path(__file__).resolve().parent.parent
EXIT_USAGE = 2


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    root = tmp_path / "checkout"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "claude-config.sh", root / "scripts")
    (root / ".venv" / "bin").mkdir(parents=True)
    os.symlink(sys.executable, root / ".venv" / "bin" / "python")
    os.symlink(SCRIPT, root / ".venv" / "bin" / "mcp-orchestrator")
    return root


def claude_config(checkout: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(checkout / "scripts" / "claude-config.sh"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        env=child_env(),
        check=False,
    )


def desktop_entry(stdout: str) -> dict[str, object]:
    """The "orchestrator" server of the printed claude_desktop_config.json snippet."""
    snippet = stdout[stdout.index("{") : stdout.index("\n\nClaude Code:")]
    entry: dict[str, object] = json.loads(snippet)["mcpServers"]["orchestrator"]
    return entry


def test_without_arguments_it_prints_the_echo_worker(checkout: Path) -> None:
    done = claude_config(checkout, checkout)
    assert done.returncode == 0, done.stderr
    server = str(checkout / ".venv" / "bin" / "mcp-orchestrator")
    assert desktop_entry(done.stdout) == {"command": server, "args": ["--worker", "echo"]}
    assert f"claude mcp add orchestrator -- {server} --worker echo" in done.stdout


@pytest.mark.parametrize("form", ["--config PATH", "--config=PATH"])
def test_a_relative_config_path_is_printed_absolute(checkout: Path, tmp_path: Path, form: str) -> None:
    """From the directory the script was run in, not the checkout it moves to."""
    here = tmp_path / "elsewhere"
    here.mkdir()
    shutil.copy(ROOT / "examples" / "echo-latency.toml", here / "my.toml")
    absolute = str(here / "my.toml")
    if form == "--config PATH":
        given, printed = ["--config", "my.toml"], ["--config", absolute]
    else:
        given, printed = ["--config=../elsewhere/my.toml"], [f"--config={absolute}"]
    done = claude_config(checkout, here, *given, "--log-level", "info")
    assert done.returncode == 0, done.stderr
    assert desktop_entry(done.stdout)["args"] == [*printed, "--log-level", "info"]
    assert f" {printed[-1]} --log-level info" in done.stdout  # the Claude Code line


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--config", "missing.toml"], "missing.toml: file not found"),
        (["--worker", "nosuch"], "unknown worker kind 'nosuch'"),
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ],
)
def test_arguments_the_server_refuses_print_its_error_and_no_set_up(
    checkout: Path, tmp_path: Path, args: list[str], error: str
) -> None:
    done = claude_config(checkout, tmp_path, *args)
    assert done.returncode == EXIT_USAGE
    assert done.stdout == ""
    assert error in done.stderr
    assert "no set-up is printed" in done.stderr
    if args[0] == "--config":
        assert str(tmp_path / "missing.toml") in done.stderr  # checked by the absolute path it would print
