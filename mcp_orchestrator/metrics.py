"""Prometheus metrics. Each pipeline owns a registry, so several can live in one process (tests).

Rare events (errors, sheds, retries, swaps, breaker moves) use prometheus_client's own
counters. What happens on every request does not: prometheus_client takes a lock for each
increment (a histogram observation is two), and the ~15 of them per request were about a
tenth of the pipeline's CPU. So per-request counts are read at scrape time from the
pipeline's own counters (see `counter`), and the latency histograms are `EventLoopHistogram`s:
plain bucket counts, exported through prometheus_client's HistogramMetricFamily.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from mcp_orchestrator.models import StageName

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
STAGE_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30)


class _LiveGauges(Collector):
    """Gauges read from the live pipeline at scrape time (queue depths, in flight, ...)."""

    def __init__(self, read: Callable[[], Iterable[Metric]]) -> None:
        self._read = read

    def collect(self) -> Iterable[Metric]:
        return self._read()


class Series:
    """One histogram series: a count per bucket (the last one is +Inf) and the sum."""

    __slots__ = ("_bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # Buckets are "less than or equal": the first bound >= value counts it.
        self.counts[bisect_left(self._bounds, value)] += 1
        self.sum += value


class EventLoopHistogram(Collector):
    """A Prometheus histogram without locks, for values observed on the event loop's thread.

    Scrapes run on that loop too (/metrics and the `metrics_port` server are routes of the
    same process), so a scrape never sees a half-made observation.
    """

    def __init__(self, name: str, documentation: str, buckets: Sequence[float], labelnames: Sequence[str] = ()) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = tuple(float(bound) for bound in buckets)
        if list(self.bounds) != sorted(set(self.bounds)):
            raise ValueError(f"{name}: buckets must be increasing (got {buckets!r})")
        self.labelnames = list(labelnames)
        self._series: dict[tuple[str, ...], Series] = {}

    def labels(self, *values: str) -> Series:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {values!r}")
        series = self._series.get(values)
        if series is None:
            series = self._series[values] = Series(self.bounds)
        return series

    def collect(self) -> Iterable[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        # Bucket edges spelt as prometheus_client spells them (its helper is untyped).
        edges = [floatToGoString(bound) for bound in self.bounds] + ["+Inf"]  # type: ignore[no-untyped-call]
        for values, series in list(self._series.items()):
            cumulative, buckets = 0, []
            for edge, count in zip(edges, list(series.counts), strict=True):
                cumulative += count
                buckets.append((edge, float(cumulative)))
            family.add_metric(list(values), buckets, series.sum)
        yield family


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.shed = Counter("orchestrator_requests_shed", "Requests shed by a full stage queue", ["stage"], registry=r)
        # Series exist at zero from the start, so dashboards and alerts see them before the first event.
        for stage in StageName:
            self.shed.labels(stage.value)
        self.errors = Counter(
            "orchestrator_errors", "Failed requests by stage and reason", ["stage", "reason"], registry=r
        )
        self.stage_duration = EventLoopHistogram(
            "orchestrator_stage_duration_seconds",
            "Time a request spent in each stage, its queue included",
            STAGE_BUCKETS,
            ["stage"],
        )
        for name in [*(stage.value for stage in StageName), "admission"]:
            self.stage_duration.labels(name)
        self.request_duration = EventLoopHistogram(
            "orchestrator_request_duration_seconds", "End-to-end latency of completed requests", LATENCY_BUCKETS
        )
        r.register(self.stage_duration)
        r.register(self.request_duration)
        self.rate_limited = Counter(
            "orchestrator_rate_limited", "Requests refused by admission control, by limit", ["scope"], registry=r
        )
        for scope in ("global", "per-session"):
            self.rate_limited.labels(scope)
        self.worker_swaps = Counter("orchestrator_worker_swaps", "configure_worker swaps", registry=r)
        self.retries = Counter(
            "orchestrator_retries", "Backend calls retried after a retryable failure", ["worker"], registry=r
        )
        self.breaker_transitions = Counter(
            "orchestrator_circuit_breaker_transitions",
            "Circuit breaker state changes, by backend and new state",
            ["worker", "state"],
            registry=r,
        )

    def add_live_gauges(self, read: Callable[[], Iterable[Metric]]) -> None:
        self.registry.register(_LiveGauges(read))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def gauge(name: str, documentation: str, labels: list[str], values: Iterable[tuple[list[str], float]]) -> Metric:
    family = GaugeMetricFamily(name, documentation, labels=labels)
    for label_values, value in values:
        family.add_metric(label_values, value)
    return family


def counter(name: str, documentation: str, labels: list[str], values: Iterable[tuple[list[str], float]]) -> Metric:
    """A counter read at scrape time from a live object (`name` without the _total suffix)."""
    family = CounterMetricFamily(name, documentation, labels=labels)
    for label_values, value in values:
        family.add_metric(label_values, value)
    return family
