"""What the pipeline shows: `pipeline_status` and the Prometheus figures read at scrape time.

Counts that change on every request are read from the pipeline's own counters when a
status or a scrape asks (see metrics.py for why), so the two always agree.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client.core import Metric

from mcp_orchestrator.metrics import counter, gauge
from mcp_orchestrator.models import (
    STAGE_ORDER,
    CacheStatus,
    DeadLetterStatus,
    DistributedStatus,
    Outcome,
    Percentiles,
    PipelineStatus,
    StageStatus,
    Totals,
    Usage,
)
from mcp_orchestrator.pipeline.breakers import Breakers

if TYPE_CHECKING:
    from mcp_orchestrator.pipeline.pipeline import Pipeline


def pipeline_status(pipeline: Pipeline) -> PipelineStatus:
    stages, ledger, dispatch = pipeline.stages, pipeline.ledger, pipeline.dispatch
    counters = ledger.counters
    lease = pipeline.lease.current
    return PipelineStatus(
        stages=[
            StageStatus(
                name=stage,
                enabled=stages.enabled(stage),
                depth=stages.depth(stage),
                capacity=stages.capacity(stage),
                processed=stages.counters[stage].processed,
                shed=stages.counters[stage].shed,
            )
            for stage in STAGE_ORDER
        ],
        totals=Totals(
            **vars(counters),
            in_flight=len(ledger.live),
            dead_letters=len(pipeline.dead_letters),
            backend_calls_saved=counters.coalesced + counters.cache_hits,
        ),
        worker={**lease.worker.describe(), "in_flight": lease.active},
        rate_limit=pipeline.admission.limits.status(),
        cache=cache_status(pipeline),
        dead_letters=DeadLetterStatus(
            held=len(pipeline.dead_letters),
            capacity=pipeline.dead_letters.capacity,
            bytes=pipeline.dead_letters.held_bytes,
            max_bytes=pipeline.dead_letters.max_bytes,
            dropped=pipeline.dead_letters.dropped,
        ),
        latency_ms=Percentiles(**ledger.latency_percentiles()),
        tokens=Usage(input_tokens=dispatch.input_tokens, output_tokens=dispatch.output_tokens),
        concurrency={"limit": pipeline.concurrency, "busy": lease.active},
        uptime_s=pipeline.uptime_s(),
        reconciles=ledger.reconciles(),
        event_loop=pipeline.event_loop,
        breakers=Breakers.status(lease.guarded),
        distributed=pipeline.sharing.shared.status() if pipeline.sharing is not None else None,
    )


def cache_status(pipeline: Pipeline) -> CacheStatus:
    cache = pipeline.cache
    return CacheStatus(
        enabled=pipeline.admission.shares_answers(),
        entries=len(cache),
        max_entries=cache.max_entries,
        bytes=cache.held_bytes,
        max_bytes=cache.max_bytes or 0,
        window_s=cache.ttl_s,
        hits=cache.hits,
        misses=cache.misses,
        stored=cache.stored,
        too_large=cache.too_large,
        flights=len(pipeline.trips.flights),
        waiting=sum(len(trip.waiters) - 1 for trip in pipeline.trips.flights.values()),
    )


def live_metrics(pipeline: Pipeline) -> Iterable[Metric]:
    """Every figure read from the pipeline at scrape time."""
    stages, ledger, counters = pipeline.stages, pipeline.ledger, pipeline.ledger.counters
    yield gauge(
        "orchestrator_queue_depth",
        "Requests waiting in each stage queue",
        ["stage"],
        (([stage.value], float(stages.depth(stage))) for stage in STAGE_ORDER),
    )
    yield gauge("orchestrator_in_flight", "Requests submitted and not yet ended", [], [([], float(len(ledger.live)))])
    yield counter(
        "orchestrator_requests",
        "Requests that ended, by outcome",
        ["outcome"],
        [([outcome.name], float(getattr(counters, outcome.name))) for outcome in Outcome],
    )
    yield counter(
        "orchestrator_tokens",
        "Tokens reported by backends",
        ["direction"],
        [(["input"], float(pipeline.dispatch.input_tokens)), (["output"], float(pipeline.dispatch.output_tokens))],
    )
    yield counter(
        "orchestrator_coalesced",
        "Requests answered by another in-flight request",
        [],
        [([], float(counters.coalesced))],
    )
    yield counter(
        "orchestrator_cache_hits", "Requests answered from the result cache", [], [([], float(counters.cache_hits))]
    )
    cache = pipeline.cache
    yield counter("orchestrator_cache_misses", "Cache lookups that found no answer", [], [([], float(cache.misses))])
    yield counter("orchestrator_cache_stored", "Answers put into the result cache", [], [([], float(cache.stored))])
    yield gauge("orchestrator_cache_entries", "Answers held by the result cache", [], [([], float(len(cache)))])
    yield gauge("orchestrator_cache_bytes", "Memory the cached answers hold", [], [([], float(cache.held_bytes))])
    yield gauge(
        "orchestrator_flights",
        "Requests in flight that identical ones may join",
        [],
        [([], float(len(pipeline.trips.flights)))],
    )
    limits = pipeline.admission.limits
    yield gauge(
        "orchestrator_admission_waiting", "Requests waiting for a rate-limit token", [], [([], float(limits.waiting()))]
    )
    letters = pipeline.dead_letters
    yield gauge("orchestrator_dead_letters", "Dead letters held", [], [([], float(len(letters)))])
    yield gauge(
        "orchestrator_dead_letters_bytes", "Memory the dead letters hold", [], [([], float(letters.held_bytes))]
    )
    yield counter(
        "orchestrator_dead_letters_dropped",
        "Dead letters pushed out of the ring by newer ones",
        [],
        [([], float(letters.dropped))],
    )
    yield from Breakers.gauges(Breakers.status(pipeline.lease.current.guarded))
    if pipeline.sharing is not None:
        yield from shared_metrics(pipeline.sharing.shared.status())


def shared_metrics(shared: DistributedStatus) -> Iterable[Metric]:
    """Sharing through Redis: whether it works now, and what it saved."""
    up = 1.0 if shared.state == "ok" else 0.0
    yield gauge("orchestrator_redis_up", "1 while Redis answers, 0 while requests run on local state", [], [([], up)])
    yield counter(
        "orchestrator_redis_errors", "Redis commands that failed or timed out", [], [([], float(shared.redis_errors))]
    )
    yield counter(
        "orchestrator_redis_local_fallbacks",
        "Requests served with this process's own state because Redis could not answer",
        [],
        [([], float(shared.local_fallbacks))],
    )
    yield counter(
        "orchestrator_shared_answers",
        "Answers another process produced: from the shared cache, or by following its flight",
        ["source"],
        [(["cache"], float(shared.shared_cache_hits)), (["flight"], float(shared.flights_followed))],
    )
