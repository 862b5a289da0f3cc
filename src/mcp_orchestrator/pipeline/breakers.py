"""The pipeline's circuit breakers: one per backend name, kept across worker swaps so a
backend's history survives a swap or a reload, shown in status and metrics."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, ValuesView
from dataclasses import asdict

from prometheus_client.core import Metric

from mcp_orchestrator.config import ResilienceSection
from mcp_orchestrator.metrics import Metrics, counter, gauge
from mcp_orchestrator.models import BreakerStatus
from mcp_orchestrator.pipeline.guard import GuardedWorker, guard, leaves
from mcp_orchestrator.resilience.breaker import BreakerSettings, BreakerState, CircuitBreaker
from mcp_orchestrator.resilience.retry import Clock
from mcp_orchestrator.workers.base import Worker

log = logging.getLogger(__name__)

_STATE_VALUE = {BreakerState.closed: 0, BreakerState.half_open: 1, BreakerState.open: 2}


class Breakers:
    def __init__(self, settings: Callable[[], ResilienceSection], clock: Clock, metrics: Metrics) -> None:
        self._settings = settings
        """Read at use: a config reload changes the section the pipeline holds."""
        self._clock = clock
        self._metrics = metrics
        self._by_name: dict[str, CircuitBreaker] = {}

    def values(self) -> ValuesView[CircuitBreaker]:
        return self._by_name.values()

    def breaker_for(self, name: str) -> CircuitBreaker:
        breaker = self._by_name.get(name)
        if breaker is None:
            breaker = CircuitBreaker(name, self._breaker_settings(), now=self._clock.now, on_change=self._moved)
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

    def apply_settings(self) -> None:
        """Push the current [resilience] settings into the live breakers (config reload)."""
        settings = self._breaker_settings()
        for breaker in self._by_name.values():
            breaker.update(settings)

    def status(self, guarded: Worker) -> list[BreakerStatus]:
        """The breakers of `guarded`'s backends, as status pages show them."""
        statuses = []
        for leaf in leaves(guarded):
            snap = asdict(leaf.breaker.snapshot())
            statuses.append(BreakerStatus(**{**snap, "state": snap["state"].value}))
        return statuses

    @staticmethod
    def gauges(members: list[GuardedWorker]) -> Iterable[Metric]:
        snaps = [leaf.breaker.snapshot() for leaf in members]
        yield gauge(
            "orchestrator_circuit_breaker_state",
            "Circuit breaker state per backend: 0 closed, 1 half-open, 2 open",
            ["worker"],
            (([snap.name], float(_STATE_VALUE[snap.state])) for snap in snaps),
        )
        yield gauge(
            "orchestrator_circuit_breaker_consecutive_failures",
            "Consecutive retryable failures counted by each closed breaker",
            ["worker"],
            (([snap.name], float(snap.consecutive_failures)) for snap in snaps),
        )
        yield counter(
            "orchestrator_circuit_breaker_rejections",
            "Calls refused by an open breaker without touching the backend",
            ["worker"],
            (([snap.name], float(snap.rejected)) for snap in snaps),
        )

    def _breaker_settings(self) -> BreakerSettings:
        section = self._settings()
        return BreakerSettings(
            section.circuit_breaker_threshold,
            section.circuit_breaker_timeout_s,
            section.circuit_breaker_success_rate,
            section.circuit_breaker_probes,
        )

    def _moved(self, name: str, old: BreakerState, new: BreakerState) -> None:
        self._metrics.breaker_transitions.labels(name, new.value).inc()
        breaker = self._by_name.get(name)
        if new is BreakerState.open and breaker is not None:
            log.warning(
                "circuit breaker for %s opened (was %s): failing fast for %g s",
                name,
                old.value,
                breaker.settings.timeout_s,
            )
        else:
            log.warning("circuit breaker for %s: %s -> %s", name, old.value, new.value)
