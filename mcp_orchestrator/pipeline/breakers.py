"""The pipeline's circuit breakers: one per backend name, kept across worker swaps so a
backend's history survives a swap or a reload, shown in status and metrics."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator

from prometheus_client.core import Metric

from mcp_orchestrator.metrics import Metrics, counter, gauge
from mcp_orchestrator.models import BreakerStatus
from mcp_orchestrator.pipeline.guard import guard, leaves
from mcp_orchestrator.resilience.breaker import BreakerSettings, BreakerState, CircuitBreaker
from mcp_orchestrator.resilience.retry import Clock
from mcp_orchestrator.workers.base import Worker

log = logging.getLogger(__name__)

_STATE_VALUE = {"closed": 0, "half_open": 1, "open": 2}


class Breakers:
    def __init__(self, settings: BreakerSettings, clock: Clock, metrics: Metrics) -> None:
        self.settings = settings
        self._clock = clock
        self._metrics = metrics
        self._by_name: dict[str, CircuitBreaker] = {}
        self.on_open: Callable[[str, float], None] | None = None
        """Told when one of our breakers opens by itself (name, seconds): sharing tells other processes."""
        self._forcing = False

    def __iter__(self) -> Iterator[CircuitBreaker]:
        return iter(tuple(self._by_name.values()))

    def breaker_for(self, name: str) -> CircuitBreaker:
        breaker = self._by_name.get(name)
        if breaker is None:
            breaker = CircuitBreaker(name, self.settings, now=self._clock.now, on_change=self._moved)
            self._by_name[name] = breaker
        return breaker

    def guard(self, worker: Worker, still_running: Worker | None) -> Worker:
        """`worker` with each backend behind its breaker; forgets breakers of backends that
        neither it nor the still-running (swapped-out) worker use."""
        guarded = guard(worker, self.breaker_for)
        current = {leaf.name for leaf in leaves(guarded)}
        if still_running is not None:
            current |= {leaf.name for leaf in leaves(still_running)}
        for name in set(self._by_name) - current:
            del self._by_name[name]
        return guarded

    def open_for(self, name: str, seconds: float) -> None:
        """Open `name`'s breaker for `seconds` because another process opened its own (a backend
        we do not use is ignored). Not shared back: that process already told everyone."""
        breaker = self._by_name.get(name)
        if breaker is None:
            return
        self._forcing = True
        try:
            breaker.force_open(seconds)
        finally:
            self._forcing = False

    def update(self, settings: BreakerSettings) -> None:
        """New thresholds for every breaker (a config reload); states and counts are kept."""
        self.settings = settings
        for breaker in self._by_name.values():
            breaker.update(settings)

    @staticmethod
    def status(guarded: Worker) -> list[BreakerStatus]:
        """The breakers of `guarded`'s backends, as status pages show them."""
        return [leaf.breaker.snapshot() for leaf in leaves(guarded)]

    @staticmethod
    def gauges(statuses: list[BreakerStatus]) -> Iterable[Metric]:
        yield gauge(
            "orchestrator_circuit_breaker_state",
            "Circuit breaker state per backend: 0 closed, 1 half-open, 2 open",
            ["worker"],
            (([snap.name], float(_STATE_VALUE[snap.state])) for snap in statuses),
        )
        yield gauge(
            "orchestrator_circuit_breaker_consecutive_failures",
            "Consecutive retryable failures counted by each closed breaker",
            ["worker"],
            (([snap.name], float(snap.consecutive_failures)) for snap in statuses),
        )
        yield counter(
            "orchestrator_circuit_breaker_rejections",
            "Calls refused by an open breaker without touching the backend",
            ["worker"],
            (([snap.name], float(snap.rejected)) for snap in statuses),
        )

    def _moved(self, name: str, old: BreakerState, new: BreakerState) -> None:
        self._metrics.breaker_transitions.labels(name, new.value).inc()
        if new is BreakerState.open:
            if self.on_open is not None and not self._forcing:
                self.on_open(name, self.settings.timeout_s)
            log.warning(
                "circuit breaker for %s opened (was %s): failing fast for %g s",
                name,
                old.value,
                self.settings.timeout_s,
            )
        else:
            log.warning("circuit breaker for %s: %s -> %s", name, old.value, new.value)
