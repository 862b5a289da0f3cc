#!/usr/bin/env bash
# Installs mcp-orchestrator into .venv (first run only) and starts it; arguments go to the server.
# Without arguments: the echo worker on stdio. Install output goes to stderr: stdout is JSON-RPC.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/mcp-orchestrator ]; then
    "$PY" -m venv .venv >&2
    .venv/bin/python -m pip install --quiet --disable-pip-version-check . >&2
fi
if [ "$#" -eq 0 ]; then
    set -- --worker echo
fi
exec .venv/bin/mcp-orchestrator "$@"
