#!/usr/bin/env bash
# Prints the Claude Desktop and Claude Code set-up for this checkout: the server scripts/serve.sh
# installs, by absolute path, so Claude always runs this checkout's current code (an editable
# install: a `git pull` needs no reinstall, only a restart of the server).
#
#   bash scripts/claude-config.sh                      # --worker echo
#   bash scripts/claude-config.sh --config my.toml     # any server flags
#
# Claude starts the server from a directory of its own, so a relative --config path is made
# absolute (from the directory this script was run in). The arguments are first checked with the
# server's --check-config: when the server refuses them, its error goes to stderr, nothing is
# printed and the exit status is not 0.
set -euo pipefail
here=$(pwd)
cd "$(dirname "$0")/.."
server="$(pwd)/.venv/bin/mcp-orchestrator"
if [ ! -x "$server" ]; then
    echo "Installing the server into .venv first (bash scripts/serve.sh) ..." >&2
    bash scripts/serve.sh --version >&2
fi
if [ "$#" -eq 0 ]; then
    set -- --worker echo
fi
"$(pwd)/.venv/bin/python" - "$here" "$server" "$@" <<'PY'
import json
import os
import shlex
import subprocess
import sys

here, server, given = sys.argv[1], sys.argv[2], sys.argv[3:]
args: list[str] = []
rest = iter(given)
for arg in rest:
    if arg == "--config":
        path = next(rest, None)
        args += [arg] if path is None else [arg, os.path.abspath(os.path.join(here, path))]
    elif arg.startswith("--config="):
        args.append("--config=" + os.path.abspath(os.path.join(here, arg.removeprefix("--config="))))
    else:
        args.append(arg)

# Run from / as Claude Desktop may: only what works from any directory passes.
check = subprocess.run([server, "--check-config", *args], cwd="/", stdout=subprocess.DEVNULL, check=False)
if check.returncode != 0:
    print(
        f"claude-config.sh: the server refuses these arguments (above), so no set-up is printed: {shlex.join(args)}",
        file=sys.stderr,
    )
    sys.exit(check.returncode)

print("Claude Desktop: merge this into claude_desktop_config.json, then restart Claude Desktop:")
print(json.dumps({"mcpServers": {"orchestrator": {"command": server, "args": args}}}, indent=2))
print()
print("Claude Code:")
print(f"claude mcp add orchestrator -- {shlex.join([server, *args])}")
PY
