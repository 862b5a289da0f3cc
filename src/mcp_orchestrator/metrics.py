"""Prometheus metrics. Each pipeline owns a registry, so several can live in one process (tests)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mcp_orchestrator.models import Outcome, StageName

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
STAGE_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30)


class _LiveGauges(Collector):
    """Gauges read from the live pipeline at scrape time (queue depths, in flight, ...)."""

    def __init__(self, read: Callable[[], Iterable[Metric]]) -> None:
        self._read = read

    def collect(self) -> Iterable[Metric]:
        return self._read()


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("orchestrator_requests", "Requests that ended, by outcome", ["outcome"], registry=r)
        self.shed = Counter("orchestrator_requests_shed", "Requests shed by a full stage queue", ["stage"], registry=r)
        # Series exist at zero from the start, so dashboards and alerts see them before the first event.
        for stage in StageName:
            self.shed.labels(stage.value)
        for outcome in Outcome:
            self.requests.labels(outcome.name)
        self.errors = Counter(
            "orchestrator_errors", "Failed requests by stage and reason", ["stage", "reason"], registry=r
        )
        self.stage_duration = Histogram(
            "orchestrator_stage_duration_seconds",
            "Time a request spent in each stage, its queue included",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.request_duration = Histogram(
            "orchestrator_request_duration_seconds",
            "End-to-end latency of completed requests",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter("orchestrator_tokens", "Tokens reported by backends", ["direction"], registry=r)
        self.coalesced = Counter("orchestrator_coalesced", "Requests answered by another in-flight request", registry=r)
        self.cache_hits = Counter("orchestrator_cache_hits", "Requests answered from the result cache", registry=r)
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
