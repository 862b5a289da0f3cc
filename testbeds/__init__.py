"""Real servers the tests and the benchmarks start on loopback: a llama.cpp model server today.

Not part of the installed package; run from the repository root (pytest and `python -m bench.*` do).
"""
