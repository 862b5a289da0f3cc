"""Shared helpers for the benchmarks: percentiles, memory readings, printing.

Every benchmark prints its figures next to a baseline measured in the same run (these
2-core machines are noisy, so ratios travel better than absolute numbers).
"""

from __future__ import annotations

import gc
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 1]) of a non-empty sequence."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def rss_mb() -> float:
    """Resident set size of this process in MiB (Linux /proc; the benchmarks run there)."""
    gc.collect()
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("VmRSS not found in /proc/self/status")


def machine() -> str:
    return (
        f"{platform.python_implementation()} {platform.python_version()}, {os.cpu_count()} CPUs, {platform.machine()}"
    )


def header(title: str) -> None:
    print(f"== {title}")
    print(f"   command: .venv/bin/python -m bench.{Path(sys.argv[0]).stem} {' '.join(sys.argv[1:])}".rstrip())
    print(f"   machine: {machine()}")


def row(label: str, value: str) -> None:
    print(f"   {label:<44} {value}")


def verdict(name: str, ok: bool, detail: str) -> None:
    print(f"   {'PASS' if ok else 'MISS'} {name}: {detail}")
