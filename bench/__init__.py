"""Benchmarks (run from the repository root, figures go into BENCHMARKS.md).

    .venv/bin/python -m bench.pipeline       # throughput vs five bare memory-stream hops
    .venv/bin/python -m bench.mcp_overhead   # infer vs a no-op tool over stdio and HTTP
    .venv/bin/python -m bench.coalesce       # 1,000 identical calls: backend calls, waiter overhead
    .venv/bin/python -m bench.ratelimit      # 10 s at 100 rps / burst 20 under 4x overload
    .venv/bin/python -m bench.memory         # RSS growth over 100,000 unique requests
    .venv/bin/python -m bench.gateway        # HTTP infer vs a naive MCP bridge and LiteLLM (--litellm), 20 ms mock backend

Each prints its figures next to a baseline measured in the same run, and PASS/MISS per target.
Timing lives here only: the tests assert behaviour, never speed.
"""
