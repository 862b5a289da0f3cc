"""Shared helpers for the benchmarks: percentiles, memory readings, printing.

Every benchmark prints its figures next to a baseline measured in the same run (these
2-core machines are noisy, so ratios travel better than absolute numbers).
"""

from __future__ import annotations

import gc
import math
import os
import platform
import random
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from testbeds.processes import rss_bytes


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 1]) of a non-empty sequence."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def rss_mb() -> float:
    """Resident set size of this process in MiB (Linux /proc; the benchmarks run there)."""
    gc.collect()
    return rss_bytes() / (1024 * 1024)


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


BOOTSTRAP_SAMPLES = 2000
BOOTSTRAP_SEED = 20261202


def bootstrap(values: Sequence[float], statistic: Callable[[Sequence[float]], float]) -> tuple[float, float]:
    """A 95% percentile-bootstrap interval of `statistic` over `values` (fixed seed: the same
    figures give the same interval)."""
    rand = random.Random(BOOTSTRAP_SEED)
    return _central_95([statistic(rand.choices(values, k=len(values))) for _ in range(BOOTSTRAP_SAMPLES)])


def bootstrap_ratio(
    numerator: Sequence[float], denominator: Sequence[float], statistic: Callable[[Sequence[float]], float]
) -> tuple[float, float]:
    """A 95% percentile-bootstrap interval of statistic(numerator) / statistic(denominator),
    resampling the two samples independently."""
    rand = random.Random(BOOTSTRAP_SEED)
    return _central_95(
        [
            statistic(rand.choices(numerator, k=len(numerator)))
            / statistic(rand.choices(denominator, k=len(denominator)))
            for _ in range(BOOTSTRAP_SAMPLES)
        ]
    )


def _central_95(estimates: list[float]) -> tuple[float, float]:
    """The middle 95% of bootstrap estimates."""
    ordered = sorted(estimates)
    return ordered[int(0.025 * len(ordered))], ordered[int(0.975 * len(ordered)) - 1]


def median_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """A distribution-free interval for the median of a few values (one per round): the k-th
    smallest and k-th largest, k as large as keeps the coverage at 95% or more (for 7 rounds,
    the extremes: 98.4%). Returns (low, high, coverage); fewer than 6 values cannot reach 95%."""
    ordered = sorted(values)
    n = len(ordered)
    best, coverage = 1, 1 - 2 / 2**n
    for k in range(1, n // 2 + 1):
        # P(X(k) <= median <= X(n-k+1)) = 1 - 2 * P(Binomial(n, 1/2) <= k - 1)
        covered = 1 - 2 * sum(math.comb(n, i) for i in range(k)) / 2**n
        if covered >= 0.95:
            best, coverage = k, covered
    return ordered[best - 1], ordered[n - best], coverage


def at_most(
    name: str, estimate: float, interval: tuple[float, float], target: float, unit: str = "", coverage: float = 0.95
) -> None:
    """PASS only when the whole interval is within the target: a noisy run cannot pass by luck."""
    low, high = interval
    verdict(
        f"{name} <= {target:g}{unit}",
        high <= target,
        f"{estimate:.3f}{unit} ({coverage:.0%} {low:.3f} .. {high:.3f}; the upper end must meet the target)",
    )


def at_least(
    name: str, estimate: float, interval: tuple[float, float], target: float, unit: str = "", coverage: float = 0.95
) -> None:
    """PASS only when the whole interval is within the target (its lower end reaches it)."""
    low, high = interval
    verdict(
        f"{name} >= {target:g}{unit}",
        low >= target,
        f"{estimate:.3f}{unit} ({coverage:.0%} {low:.3f} .. {high:.3f}; the lower end must meet the target)",
    )
