#!/usr/bin/env bash
# Installs mcp-orchestrator into .venv (again only when pyproject.toml changed) and starts it;
# arguments go to the server. Without arguments: the echo worker on stdio.
# Install output goes to stderr: in stdio mode stdout carries only JSON-RPC.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STAMP=.venv/.serve-installed
WANT=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv >&2
fi
if [ ! -x .venv/bin/mcp-orchestrator ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
    # Editable, so the server always runs this checkout's code, also after a git pull.
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -e . >&2
    echo "$WANT" > "$STAMP"
fi
if [ "$#" -eq 0 ]; then
    set -- --worker echo
fi
exec .venv/bin/mcp-orchestrator "$@"
