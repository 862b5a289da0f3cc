#!/usr/bin/env bash
# Prints the Claude Desktop and Claude Code set-up for this checkout: the server scripts/serve.sh
# installs, by absolute path, so Claude always runs this checkout's current code (an editable
# install: a `git pull` needs no reinstall, only a restart of the server).
#
#   bash scripts/claude-config.sh                      # --worker echo
#   bash scripts/claude-config.sh --config /abs/path/to/my.toml
set -euo pipefail
cd "$(dirname "$0")/.."
server="$(pwd)/.venv/bin/mcp-orchestrator"
if [ ! -x "$server" ]; then
    echo "Installing the server into .venv first (bash scripts/serve.sh) ..." >&2
    bash scripts/serve.sh --version >&2
fi
if [ "$#" -eq 0 ]; then
    set -- --worker echo
fi
"$(pwd)/.venv/bin/python" - "$server" "$@" <<'PY'
import json
import shlex
import sys

server, args = sys.argv[1], sys.argv[2:]
print("Claude Desktop: merge this into claude_desktop_config.json, then restart Claude Desktop:")
print(json.dumps({"mcpServers": {"orchestrator": {"command": server, "args": args}}}, indent=2))
print()
print("Claude Code:")
print(f"claude mcp add orchestrator -- {shlex.join([server, *args])}")
PY
