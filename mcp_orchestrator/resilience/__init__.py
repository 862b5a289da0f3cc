"""Generic resilience pieces: circuit breaker, retry, rate limiter, result cache.

Nothing here knows about MCP, the pipeline's stages or any provider; each module is
usable on its own.
"""
